"""Stage 02: FIRE-100K, feedback-refinement dialogues written by an annotator.

    from fire_core import annotate, config
    cfg = config.load("02_generate_fire100k", ["scale=smoke"])
    result = annotate.build_fire100k(cfg)   # results/<scale>/02_generate_fire100k/

Each dialogue starts from the base VLM's real first answer (stage 01, batched, greedy), then the
annotator plays teacher (score, feedback, DRESS critique/refinement/rating) and student (later
turns) until the score reaches the threshold or the turn limit. Records are appended to sharded
JSONL files with flush + fsync; a rerun skips finished ids and drops a torn last line, so a run
killed at any moment and rerun gives the same dataset as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fire_core import feedback, world

log = logging.getLogger(__name__)
PROMPT_VERSION = "fire100k-v2"  # part of every request id: change it when the prompt changes
TURN_KEYS = ("response", "score", "feedback", "critique", "refinement", "rating")
FAILURE_CLASSES = ("transient", "bad_request", "unparsable", "truncated", "leaked_answer")
ANNOTATOR_SYSTEM = (
    "You write feedback-refinement dialogues about an image. You play two roles. The student answers "
    "the question; its first response is given. The teacher sees the ground truth and the dense "
    "annotation of the image, and replies to every student response with a score from 1 to 10 and "
    "feedback that says what is wrong and where to look, WITHOUT stating the correct answer; also a "
    "5-7 word critique, a concrete refinement suggestion, and a rating from 1 (bad) to 4 (excellent). "
    "The student improves step by step. Stop when the score reaches the threshold or after the "
    "maximum number of turns. Reply with JSON only: {\"turns\": [{\"response\": str, \"score\": int, "
    "\"feedback\": str, \"critique\": str, \"refinement\": str, \"rating\": int}, ...]}.")


def request_id(*parts: Any) -> str:
    """A deterministic id from what defines a request (image hash, template, model, sampling,
    turn, sample index): the same request always gets the same id."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ShardStore:
    """Append-only JSONL shards. A record's shard is fixed by its id, so reruns append to the
    same files; reading skips (and repairs) a torn last line left by a kill."""

    def __init__(self, root: Path, n_shards: int = 4):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n_shards = n_shards

    def path(self, k: int) -> Path:
        return self.root / f"part-{k:05d}.jsonl"

    def shard_of(self, rid: str) -> int:
        return int(hashlib.sha256(rid.encode()).hexdigest(), 16) % self.n_shards

    def shards(self) -> list[Path]:
        """Every shard on disk, also those of a run with another ``n_shards``."""
        return sorted(self.root.glob("part-*.jsonl"))

    def repair(self) -> int:
        """Cut every shard back to its last complete line; returns how many bytes were dropped."""
        dropped = 0
        for p in self.shards():
            data = p.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(p, "r+b") as fh:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
                dropped += len(data) - keep
        return dropped

    def records(self) -> Iterator[dict[str, Any]]:
        for p in self.shards():
            with open(p) as fh:
                for line in fh:
                    if line.endswith("\n"):
                        yield json.loads(line)

    def done_ids(self) -> set[str]:
        return {r["request_id"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path(self.shard_of(record["request_id"])), "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def all_sorted(self) -> list[dict[str, Any]]:
        return sorted(self.records(), key=lambda r: r["id"])


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
        given = [r for r in (first_responses or {}).get(s["id"], []) if not world.is_correct(s["family"], r, s["answer"])]
        for j in range(per_sample):
            rng = random.Random(request_id(seed, s["id"], "judgement", j))
            k = rng.randint(1, max_turns)
            responses: list[str] = []
            for t in range(k - 1):
                if t < len(given):
                    responses.append(given[t])
                    continue
                prev = world.extract_answer(responses[-1]) if responses else None
                responses.append(feedback.respond(s, feedback.wrong_answer(s, rng, near=prev)))
            right = rng.random() < 0.5
            prev = world.extract_answer(responses[-1]) if responses else None
            responses.append(feedback.respond(s, s["answer"] if right else feedback.wrong_answer(s, rng, near=prev)))
            turns = []
            for t, resp in enumerate(responses):
                turns.append({"response": resp, **feedback.judge(s, resp, history=responses[:t], rng=rng).as_dict()})
            rec = dialogue_record(s, turns, request_id(seed, s["id"], "judgement", j), source="world/oracle-judgement")
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
    fam, answer = record["task"], record["answer"]
    q = record.get("question", "")
    if any(feedback.leaks_answer(t["feedback"], answer, fam, q) for t in record["turns"] if not t.get("correct")):
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


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# The openai backend: any OpenAI-compatible endpoint (GPT-4o, vLLM, fire_core.serve)


class AnnotatorError(RuntimeError):
    """A generation run that cannot go on (too many failures of one class, no API key)."""


def image_data_url(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def annotator_messages(sample: dict[str, Any], first: str, image, threshold: int, max_turns: int, seed: int,
                       fix_prob: float) -> list[dict[str, Any]]:
    """The same content for every backend: image, question, ground truth, dense annotation, the
    first student response, and (for the oracle) the task as JSON."""
    from fire_core.serve import TASK_CLOSE, TASK_OPEN

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
    from fire_core import world

    return world.is_correct(sample["family"], response, sample["answer"])


class RateLimiter:
    """At most ``rpm`` request starts per minute (evenly spaced)."""

    def __init__(self, rpm: int):
        self.interval = 60.0 / rpm
        self.next = 0.0
        self.lock = None

    async def wait(self) -> None:
        import asyncio
        import time

        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


async def _one_request(client, acfg, dcfg, sample, first, image, seed, stats: GenStats, rejects: list,
                       limiter: RateLimiter, sem) -> list[dict[str, Any]] | None:
    """One dialogue with our retry layer; returns turns, or None after classifying the failure."""
    import asyncio

    import openai

    messages = annotator_messages(sample, first, image, dcfg.threshold, dcfg.max_turns, seed, acfg.fix_prob)
    backoff = 0.5
    for attempt in range(acfg.max_retries + 1):
        await limiter.wait()
        wait = backoff * (2 ** attempt)
        try:
            async with sem:
                resp = await client.chat.completions.create(
                    model=acfg.model, messages=messages, temperature=acfg.temperature, max_tokens=2048,
                    response_format={"type": "json_object"})
        except openai.RateLimitError as exc:
            stats.failures["transient"] += 1
            ra = exc.response.headers.get("retry-after") if exc.response is not None else None
            wait = float(ra) if ra else wait
        except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError):
            stats.failures["transient"] += 1
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                stats.failures["transient"] += 1
            else:
                stats.failures["bad_request"] += 1
                rejects.append({"id": sample["id"], "class": "bad_request", "raw": str(exc)[:2000]})
                return None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as exc:
            stats.failures["transient"] += 1  # a malformed HTTP body: the server's fault, try again
            rejects.append({"id": sample["id"], "class": "malformed_body", "raw": str(exc)[:2000]})
        else:
            choice = resp.choices[0]
            text = choice.message.content or ""
            if choice.finish_reason == "length":
                stats.failures["truncated"] += 1
                rejects.append({"id": sample["id"], "class": "truncated", "raw": text})
            else:
                try:
                    return parse_dialogue(text, sample, first, dcfg.score_min, dcfg.score_max)
                except (ValueError, json.JSONDecodeError) as exc:
                    stats.failures["unparsable"] += 1
                    rejects.append({"id": sample["id"], "class": "unparsable", "error": str(exc), "raw": text})
        if attempt < acfg.max_retries:
            await asyncio.sleep(min(wait, 30.0))
    return None


async def openai_dialogues(jobs: list[tuple[str, dict[str, Any], str, Any]], acfg, dcfg, seed: int,
                           stats: GenStats, on_done) -> list[dict[str, Any]]:
    """Run jobs (request id, sample, first response, image) concurrently; ``on_done(rid, turns)``
    is called as each finishes (turns None on failure). Returns the reject log."""
    import asyncio

    import openai

    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise AnnotatorError("annotator.backend=openai needs the OPENAI_API_KEY environment variable "
                             "(never put keys in configs or notebook parameters)")
    client = openai.AsyncOpenAI(base_url=acfg.base_url, api_key=key, timeout=acfg.timeout_s,
                                max_retries=0)  # our retry layer honours Retry-After and backs off longer
    sem = asyncio.Semaphore(acfg.concurrency)
    limiter = RateLimiter(acfg.requests_per_minute)
    rejects: list[dict[str, Any]] = []

    async def run(job):
        rid, sample, first, image = job
        turns = await _one_request(client, acfg, dcfg, sample, first, image, seed, stats, rejects, limiter, sem)
        on_done(rid, turns)

    try:
        await asyncio.gather(*(run(j) for j in jobs))
    finally:
        await client.close()
    return rejects


def check_failure_rates(stats: GenStats, max_rate: float) -> None:
    """Stop with a clear message when one failure class is too common."""
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
    failures: Counter = field(default_factory=Counter)  # class -> count
    bad_images: list[str] = field(default_factory=list)
    torn_bytes_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The dataset's generation counts. What depends on this particular run (resumed work,
        torn bytes, time) is in ``run_dict`` and goes to the manifest, so that a resumed run
        writes the same file as an uninterrupted one."""
        return {"requested": self.requested, "failures": dict(self.failures), "bad_images": self.bad_images}

    def run_dict(self) -> dict[str, Any]:
        return {"written_now": self.written, "skipped_done": self.skipped_done,
                "torn_bytes_dropped": self.torn_bytes_dropped}


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class Fire100kResult:
    dir: Path
    kept: list[dict[str, Any]]
    dropped: Counter
    stats: Any  # DataFrame
    gen_stats: GenStats
    seconds: float


def sample_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "split": row["split"], "family": row["family"], "question": row["question"],
            "answer": row["answer"], "response": row["response"], "scene": json.loads(row["scene"]),
            "annotation": row["annotation"]}


def _image_ok(row: dict[str, Any]):
    """The decoded image, or None when it is missing or corrupt (rows are read undecoded, so a
    bad image cannot stop the run before this check)."""
    import io

    from PIL import Image, UnidentifiedImageError

    value = row.get("image")
    try:
        if isinstance(value, dict):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                img = Image.open(value["path"])
            else:
                return None
        elif value is None:
            return None
        else:
            img = value
        img.load()
        return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def _save_failures(out: Path, stats: GenStats, rejects: list[dict[str, Any]]) -> None:
    """Raw text of every failed reply (appended to rejects.jsonl, so a rerun keeps the earlier
    ones) and the counts of this run (gen_stats.json)."""
    from fire_core import provenance

    with open(out / "rejects.jsonl", "a") as fh:
        for rej in rejects:
            fh.write(json.dumps(rej) + "\n")
    provenance.write_json_atomic(out / "gen_stats.json", stats.as_dict())


def run_async(coro):
    """Run a coroutine to completion, also inside Jupyter (whose kernel already runs a loop)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _write(store: ShardStore, stats: GenStats, row: dict[str, Any], turns: list[dict[str, Any]], rid: str,
           model_name: str, d) -> None:
    rec = dialogue_record(row, turns, rid, source=f"world/{model_name}")
    bad = validate(rec, d.score_min, d.score_max)
    if bad:  # never write a malformed record
        stats.failures["unparsable"] += 1
        return
    if any(feedback.leaks_answer(t["feedback"], rec["answer"], rec["task"], rec["question"])
           for t in turns if not t.get("correct")):
        stats.failures["leaked_answer"] += 1  # written, then dropped by the filter with its reason
    store.append(rec)
    stats.written += 1


def dialogue_record(row: dict[str, Any], turns: list[dict[str, Any]], rid: str, source: str) -> dict[str, Any]:
    return {"id": row["id"], "request_id": rid, "image": f"world/train/{row['id']}", "question": row["question"],
            "answer": row["answer"], "task": row["family"], "split": row["split"], "source": source,
            "turns": turns, "meta": {"prompt_version": PROMPT_VERSION}}


def first_responses(model, processor, rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str]:
    """The base VLM's greedy first answers (its base prompt), as stage 02 starts its dialogues."""
    from fire_core import models, prompts

    convs = [prompts.base_messages([(r["question"], "")])[:-1] for r in rows]
    out = models.generate(model, processor, convs, [r["image"].convert("RGB") for r in rows],
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [f if f.strip() else "I am not sure." for f in out]


def gold_dialogues(rows, model, processor, cfg) -> list[dict[str, Any]]:
    """Oracle dialogues on held-out world rows (val/test/unseen), starting from the base VLM's
    first answers: the gold dialogues of fixed-dialogue evaluation. Never used for training."""
    rows = list(rows)
    firsts = first_responses(model, processor, rows, cfg.train.max_new_tokens, cfg.dialogue.batch_size)
    out = []
    for r, first in zip(rows, firsts, strict=True):
        turns = oracle_dialogue(sample_record(r), first, cfg.dialogue.threshold, cfg.dialogue.max_turns,
                                cfg.seed, cfg.annotator.fix_prob)
        rec = dialogue_record(r, turns, request_id(r["id"], "gold", cfg.seed), source="world/oracle-gold")
        rec["image"] = f"world/{r['split']}/{r['id']}"
        out.append(rec)
    return out


def build_fire100k(cfg) -> Fire100kResult:
    """Stage 02: generate, filter and describe the FIRE-100K analog."""
    import time

    import datasets
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from fire_core import models, plots, prompts, provenance, world
    from fire_core.train import select_per_family

    t0 = time.time()
    world_dir = provenance.require_stage(cfg, "00_build_world")
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    ds = world.load(cfg)["train"]
    a, d = cfg.annotator, cfg.dialogue
    idx = sorted(select_per_family(ds, cfg.world.seen_families, a.samples_per_family, cfg.seed + 2))
    rows = ds.select(idx).cast_column("image", datasets.Image(decode=False))  # decoded by _image_ok
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset", base_dir / "model"]) as run:
        store = ShardStore(run.dir / "raw", a.n_shards)
        stats = GenStats(requested=len(rows), torn_bytes_dropped=store.repair())
        done = store.done_ids()
        model_name = a.model if a.backend == "openai" else "oracle"
        # the world's ids are stable hashes of seed/family/split/index, so they stand for the image
        ids = rows["id"]
        rid_of = {i: request_id(i, PROMPT_VERSION, model_name, a.temperature, d.max_turns, cfg.seed) for i in ids}
        stats.skipped_done = sum(rid_of[i] in done for i in ids)
        model, processor = models.load(base_dir / "model")
        bs = d.batch_size
        rejects: list[dict[str, Any]] = []
        # Batches are fixed slices of all samples, not of the unfinished ones: a batch's float
        # rounding depends on its other rows, so a rerun recomputes an unfinished batch whole
        # (the same first answers as an uninterrupted run) and writes only what is missing.
        for start in tqdm(range(0, len(ids), bs), desc="FIRE-100K dialogues", unit="batch"):
            if all(rid_of[i] in done for i in ids[start:start + bs]):
                continue
            batch = [rows[i] for i in range(start, min(start + bs, len(ids)))]
            good = []
            for r in batch:
                img = _image_ok(r)
                if img is None:
                    stats.bad_images.append(r["id"])
                    continue
                good.append((r, img))
            if not good:
                continue
            convs = [prompts.base_messages([(r["question"], "")])[:-1] for r, _ in good]
            firsts = models.generate(model, processor, convs, [im for _, im in good],
                                     max_new_tokens=cfg.train.max_new_tokens, batch_size=bs)
            firsts = [f if f.strip() else "I am not sure." for f in firsts]
            missing = [k for k, (r, _) in enumerate(good) if rid_of[r["id"]] not in done]
            good, firsts = [good[k] for k in missing], [firsts[k] for k in missing]
            if a.backend == "oracle":
                for (r, _), first in zip(good, firsts, strict=True):
                    turns = oracle_dialogue(sample_record(r), first, d.threshold, d.max_turns, cfg.seed, a.fix_prob)
                    _write(store, stats, r, turns, rid_of[r["id"]], model_name, d)
            else:
                by_rid = {rid_of[r["id"]]: r for r, _ in good}
                jobs = [(rid_of[r["id"]], sample_record(r), first, img) for (r, img), first in zip(good, firsts, strict=True)]

                def on_done(rid, turns, by_rid=by_rid):
                    if turns is not None:
                        _write(store, stats, by_rid[rid], turns, rid, model_name, d)

                rejects += run_async(openai_dialogues(jobs, a, d, cfg.seed, stats, on_done))
                try:
                    check_failure_rates(stats, a.max_failure_rate)
                except AnnotatorError:
                    _save_failures(run.dir, stats, rejects)  # what failed, for the user to read
                    raise
        _save_failures(run.dir, stats, rejects)
        # only this plan's requests: shards may still hold records of an older prompt or config
        wanted = set(rid_of.values())
        records = [r for r in store.all_sorted() if r["request_id"] in wanted]
        kept, dropped = apply_filter(records, lambda rec: filter_reason(rec, d.threshold))
        write_jsonl(run.dir / "fire100k.jsonl", kept)
        table = statistics(kept)
        table.to_csv(run.dir / "fire100k_stats.csv", index=False, float_format="%.2f")
        score_by_turn(kept).to_csv(run.dir / "score_by_turn.csv")
        provenance.write_json_atomic(run.dir / "gen_stats.json", {
            **stats.as_dict(), "generated": len(records), "kept": len(kept), "dropped": dict(dropped)})
        run.extra["generation_run"] = {**stats.run_dict(), "seconds": round(time.time() - t0, 1)}
        # a few example dialogues, image plus turns
        shown = kept[:3] or records[:3]  # the kept ones if any
        fig, axes = plt.subplots(max(1, len(shown)), 2, figsize=(11, 2.2 * max(1, len(shown))), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 4]})
        by_id = {rid: i for i, rid in enumerate(ids)}
        for ax_row, rec in zip(axes, shown, strict=False):
            img = _image_ok(rows[by_id[rec["id"]]])
            if img is not None:
                ax_row[0].imshow(img, interpolation="nearest")
            ax_row[0].axis("off")
            lines = [f"Q: {rec['question'].splitlines()[0]}  (truth: {rec['answer']})"]
            for k, t in enumerate(rec["turns"], 1):
                lines.append(f"S{k}: {t['response'][:95]}")
                lines.append(f"T{k}: Score {t['score']}. {t['feedback'][:90]}")
            ax_row[1].text(0, 0.5, "\n".join(lines), va="center", fontsize=7, family="monospace")
            ax_row[1].axis("off")
        if not shown:
            for ax in axes[0]:
                ax.axis("off")
            axes[0][1].text(0, 0.5, "no dialogues were generated", va="center")
        fig.tight_layout()
        plots.save(fig, run.dir / "example_dialogues", sources=[run.dir / "fire100k.jsonl"], cfg=cfg)
        run.extra.update({"kept": len(kept), "generated": len(records), "dropped": dict(dropped),
                          "bad_images": len(stats.bad_images)})
    return Fire100kResult(dir=run.dir, kept=kept, dropped=dropped, stats=table, gen_stats=stats,
                          seconds=time.time() - t0)
