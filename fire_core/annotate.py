"""Stage 02: FIRE-100K, feedback-refinement dialogues written by an annotator.

    from fire_core import annotate, config
    cfg = config.load("02_generate_fire100k", ["scale=smoke"])
    result = stage_fire100k.run(cfg)   # results/<scale>/02_generate_fire100k/

Each dialogue starts from the base VLM's real first answer (stage 01, batched, greedy), then the
annotator plays teacher (score, feedback, DRESS critique/refinement/rating) and student (later
turns) until the score reaches the threshold or the turn limit. Records are appended to sharded
JSONL files with flush + fsync; a rerun skips finished ids and drops a torn last line, so a run
killed at any moment and rerun gives the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fire_core import checker, client, feedback
from fire_core.client import (
    AnnotatorError,
    Endpoint,
    Outcome,
    Tally,
    Unusable,
    chat_many,
    image_data_url,
)
from fire_core.files import request_id
from fire_core.prompts import TASK_CLOSE, TASK_OPEN
from fire_core.records import dialogue_record

log = logging.getLogger(__name__)
PROMPT_VERSION = "fire100k-v2"  # part of every request id: change it when the prompt changes
TURN_KEYS = ("response", "score", "feedback", "critique", "refinement", "rating")
# the client layer's classes of failed requests, and a written record whose feedback states the answer
FAILURE_CLASSES = (*client.FAILURE_CLASSES, "leaked_answer")
ANNOTATOR_SYSTEM = (
    "You write feedback-refinement dialogues about an image. You play two roles. The student answers "
    "the question; its first response is given. The teacher sees the ground truth and the dense "
    "annotation of the image, and replies to every student response with a score from 1 to 10 and "
    "feedback that says what is wrong and where to look, WITHOUT stating the correct answer; also a "
    "5-7 word critique, a concrete refinement suggestion, and a rating from 1 (bad) to 4 (excellent). "
    "The student improves step by step. Stop when the score reaches the threshold or after the "
    "maximum number of turns. Reply with JSON only: {\"turns\": [{\"response\": str, \"score\": int, "
    "\"feedback\": str, \"critique\": str, \"refinement\": str, \"rating\": int}, ...]}.")



# ---------------------------------------------------------------------------------------------
# Dialogues


def oracle_dialogue(sample: dict[str, Any], first_response: str, threshold: int, max_turns: int,
                    seed: int, fix_prob: float = 0.6) -> list[dict[str, Any]]:
    """Teacher and later student turns by the oracle, from the base VLM's first response."""
    rng = random.Random(request_id(seed, sample["id"], "oracle-dialogue"))
    turns: list[dict[str, Any]] = []
    responses = [first_response]
    for _ in range(max_turns):
        j = feedback.judge(sample, responses[-1], history=responses[:-1], rng=rng)
        turns.append({"response": responses[-1], **j.as_dict()})
        if j.score >= threshold:
            break
        responses.append(feedback.refine(sample, responses, rng, fix_prob=fix_prob))
    return turns


def judgement_dialogues(samples: Sequence[dict[str, Any]], per_sample: int, max_turns: int, seed: int,
                        first_responses: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Teacher training dialogues balanced between right and wrong answers at every turn position.

    In FIRE-100K a dialogue goes on only while the student is wrong, so the turn position alone
    predicts the score (turn 1 mostly wrong, the last turn right), and a small teacher learns the
    position instead of the answer. Here each dialogue has a turn count k drawn uniformly from
    1..``max_turns``: turns 1..k-1 are wrong (as in a real dialogue, which goes on only after a
    wrong answer; taken from ``first_responses[id]`` where given, otherwise written by the oracle
    student) and turn k is the reference-style response with the right answer or with a wrong one,
    half and half. The oracle judges every turn; only turn k's judgement is trained on
    (``trained_turns``), so right and wrong are balanced at every position the loss sees.
    ``samples`` are world sample records (with their scene, see :func:`sample_record`)."""
    out = []
    for s in samples:
        given = [r for r in (first_responses or {}).get(s["id"], []) if not checker.is_correct(s["family"], r, s["answer"])]
        for j in range(per_sample):
            rng = random.Random(request_id(seed, s["id"], "judgement", j))
            k = rng.randint(1, max_turns)
            responses: list[str] = []
            for t in range(k - 1):
                if t < len(given):
                    responses.append(given[t])
                    continue
                prev = checker.extract_answer(responses[-1]) if responses else None
                responses.append(feedback.respond(s, feedback.wrong_answer(s, rng, near=prev)))
            right = rng.random() < 0.5
            prev = checker.extract_answer(responses[-1]) if responses else None
            responses.append(feedback.respond(s, s["answer"] if right else feedback.wrong_answer(s, rng, near=prev)))
            turns = []
            for t, resp in enumerate(responses):
                turns.append({"response": resp, **feedback.judge(s, resp, history=responses[:t], rng=rng).as_dict()})
            rec = dialogue_record(s, turns, request_id(seed, s["id"], "judgement", j), "world/oracle-judgement",
                                  prompt_version=PROMPT_VERSION)
            rec["trained_turns"] = [k - 1]
            out.append(rec)
    return out


def validate(record: dict[str, Any], score_min: int = 1, score_max: int = 10) -> str | None:
    """Why a dialogue record is malformed, or None."""
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        return "no turns"
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            return f"turn {k} is not an object"
        if not isinstance(t.get("response"), str) or not t["response"].strip():
            return f"turn {k} has no response"
        if not isinstance(t.get("score"), int) or not score_min <= t["score"] <= score_max:
            return f"turn {k} has no score on the scale"
        if not isinstance(t.get("feedback"), str):
            return f"turn {k} has no feedback"
    return None


def filter_reason(record: dict[str, Any], threshold: int) -> str | None:
    """Why FIRE's filter drops a dialogue: malformed, leaked answer, or no improvement."""
    bad = validate(record)
    if bad:
        return "malformed"
    if feedback.dialogue_leaks_answer(record):
        return "leaked_answer"
    scores = [t["score"] for t in record["turns"]]
    if len(scores) < 2 or max(scores[1:]) <= scores[0]:
        return "no_improvement"
    return None


def apply_filter(records: Iterable[dict[str, Any]], reason) -> tuple[list[dict[str, Any]], Counter]:
    """The records that ``reason(record)`` lets through (it returns None), and the count of the
    others by the reason it gave."""
    kept, dropped = [], Counter()
    for rec in records:
        why = reason(rec)
        if why:
            dropped[why] += 1
        else:
            kept.append(rec)
    return kept, dropped



# ---------------------------------------------------------------------------------------------
# The openai backend: any OpenAI-compatible endpoint (GPT-4o, vLLM, fire_core.serve)



def annotator_messages(sample: dict[str, Any], first: str, image, threshold: int, max_turns: int, seed: int,
                       fix_prob: float) -> list[dict[str, Any]]:
    """The same content for every backend: image, question, ground truth, dense annotation, the
    first student response, and (for the oracle) the task as JSON."""

    task = {"sample": sample, "first_response": first, "threshold": threshold, "max_turns": max_turns,
            "seed": seed, "fix_prob": fix_prob}
    text = (f"Question: {sample['question']}\nGround truth: {sample['answer']}\n"
            f"Dense annotation: {sample['annotation']}\nFirst student response: {first}\n"
            f"Satisfaction threshold: {threshold}; at most {max_turns} student turns.\n"
            f"{TASK_OPEN}{json.dumps(task, sort_keys=True)}{TASK_CLOSE}")
    return [{"role": "system", "content": ANNOTATOR_SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                         {"type": "text", "text": text}]}]


def parse_dialogue(text: str, sample: dict[str, Any], first: str, score_min: int = 1,
                   score_max: int = 10) -> list[dict[str, Any]]:
    """The annotator's JSON reply as turns; raises ValueError when it does not fit the schema."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise ValueError("no JSON object in the reply")
    data = json.loads(m.group(0))
    turns = data.get("turns") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError("reply has no 'turns' list")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or any(key not in t for key in TURN_KEYS):
            raise ValueError(f"turn {k} lacks one of {TURN_KEYS}")
        if not isinstance(t["score"], int) or not score_min <= t["score"] <= score_max:
            raise ValueError(f"turn {k} score {t['score']!r} is not an integer in [{score_min}, {score_max}]")
        if not isinstance(t["rating"], int) or not 1 <= t["rating"] <= 4:
            raise ValueError(f"turn {k} rating {t['rating']!r} is not an integer in [1, 4]")
        turn = {key: t[key] for key in TURN_KEYS}
        turn["correct"] = world_is_correct(sample, turn["response"])
        out.append(turn)
    out[0]["response"] = first  # the base VLM's answer is fixed; annotators may not rewrite it
    return out


def world_is_correct(sample: dict[str, Any], response: str) -> bool:

    return checker.is_correct(sample["family"], response, sample["answer"])



def annotator_endpoint(acfg) -> Endpoint:
    return Endpoint(acfg.base_url, acfg.model, acfg.api_key_env, acfg.timeout_s, acfg.max_retries, acfg.concurrency,
                    acfg.requests_per_minute)


async def openai_dialogues(jobs: list[tuple[str, dict[str, Any], str, Any]], acfg, dcfg, seed: int,
                           stats: GenStats, on_done) -> list[dict[str, Any]]:
    """Run jobs (request id, sample, first response, image) through the client layer;
    ``on_done(rid, turns)`` is called as each finishes (turns None when the request failed after
    its retries). Returns the reject log: every failed attempt, with the text it left."""
    endpoint = annotator_endpoint(acfg)
    endpoint.api_key("annotator.backend=openai")  # no key: fail before any work
    create_kw = {"temperature": acfg.temperature, "max_tokens": 2048, "response_format": {"type": "json_object"}}
    tally = Tally(failed=stats.failures, retried=stats.retried, attempts=[])  # counted straight into the stats

    def check(k: int, text: str) -> list[dict[str, Any]]:
        _, sample, first, _ = jobs[k]
        try:
            return parse_dialogue(text, sample, first, dcfg.score_min, dcfg.score_max)
        except ValueError as exc:  # json.JSONDecodeError included
            raise Unusable("unparsable", text, str(exc)) from exc

    def done(k: int, out: Outcome) -> None:
        on_done(jobs[k][0], out.value if out.failure is None else None)

    messages = [annotator_messages(sample, first, image, dcfg.threshold, dcfg.max_turns, seed, acfg.fix_prob)
                for _, sample, first, image in jobs]
    await chat_many(endpoint, messages, create_kw, tally, check, who="annotator.backend=openai", on_done=done)
    return [{"id": jobs[a.pop("index")][1]["id"], **a} for a in tally.attempts]


def check_failure_rates(stats: GenStats, max_rate: float) -> None:
    """Stop with a clear message when one class of failed requests (after their retries) is
    too common."""
    if stats.requested == 0:
        return
    for cls in FAILURE_CLASSES:
        rate = stats.failures.get(cls, 0) / max(1, stats.requested - stats.skipped_done)
        if rate > max_rate:
            raise AnnotatorError(f"{stats.failures[cls]} '{cls}' failures for {stats.requested - stats.skipped_done} "
                                 f"requests ({rate:.0%}) exceed annotator.max_failure_rate={max_rate}; see gen_stats.json "
                                 "and rejects.jsonl. Finished dialogues are kept: rerun to resume.")


# ---------------------------------------------------------------------------------------------
# Statistics like the FIRE poster's table


def statistics(records: Iterable[dict[str, Any]]):
    import pandas as pd

    rows = []
    for r in records:
        rows.append({"family": r["task"], "turns": len(r["turns"]),
                     "response_words": sum(len(t["response"].split()) for t in r["turns"]) / len(r["turns"]),
                     "feedback_words": sum(len(t["feedback"].split()) for t in r["turns"]) / len(r["turns"])})
    df = pd.DataFrame(rows, columns=["family", "turns", "response_words", "feedback_words"])

    def agg(g):
        return pd.Series({"dialogues": len(g), "avg_turns": g.turns.mean(),
                          "avg_response_words": g.response_words.mean(), "avg_feedback_words": g.feedback_words.mean()})

    per = df.groupby("family").apply(agg, include_groups=False).reset_index() if len(df) else pd.DataFrame()
    total = agg(df).to_frame().T.assign(family="all")
    return pd.concat([total, per], ignore_index=True)[["family", "dialogues", "avg_turns", "avg_response_words",
                                                        "avg_feedback_words"]]


def score_by_turn(records: Iterable[dict[str, Any]]):
    import pandas as pd

    c: Counter = Counter()
    for r in records:
        for k, t in enumerate(r["turns"], start=1):
            c[(k, t["score"])] += 1
    df = pd.Series(c, dtype=int).rename_axis(["turn", "score"]).unstack(fill_value=0) if c else pd.DataFrame()
    return df


@dataclass
class GenStats:
    """Counts for gen_stats.json."""

    requested: int = 0
    written: int = 0
    skipped_done: int = 0
    failures: Counter = field(default_factory=Counter)  # failed requests (after retries), by class
    retried: Counter = field(default_factory=Counter)  # failed attempts that were retried, by class
    bad_images: list[str] = field(default_factory=list)
    torn_bytes_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The dataset's generation counts. What depends on this particular run (resumed work,
        torn bytes, time) is in ``run_dict`` and goes to the manifest, so that a resumed run
        writes the same file as an uninterrupted one."""
        return {"requested": self.requested, "failures": dict(self.failures), "retried": dict(self.retried),
                "bad_images": self.bad_images}

    def run_dict(self) -> dict[str, Any]:
        return {"written_now": self.written, "skipped_done": self.skipped_done,
                "torn_bytes_dropped": self.torn_bytes_dropped}


# ---------------------------------------------------------------------------------------------
# The stage
