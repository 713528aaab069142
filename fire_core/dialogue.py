"""The dialogue engine: a student and a teacher talk about many images at once (stages 04-06).

    student = dialogue.hf_role("fire100k", model, processor)
    teacher = dialogue.hf_role("teacher", t_model, t_processor)      # or oracle_role(), openai_role(...)
    result = dialogue.run(samples, student, teacher, cfg.dialogue, seed=0, store=ShardStore(d))
    result.records        # one record per finished dialogue; result.timing: student/teacher/other s

Each step, the student answers for every active dialogue in one batched call, then the teacher
judges all of them in one batched call. A dialogue ends at the first score >= ``threshold``
(``satisfied``), after ``max_turns`` student turns (``max_turns``), or when the teacher's reply
has no score (``unparsable``); its slot is refilled from the queue at once, so the batch stays
full. Local models keep each dialogue's KV cache between turns
(:class:`fire_core.models.PrefixCachedGenerator`), so a turn prefills only what is new.

Greedy decoding gives the same dialogues whatever the batch size, and the oracle's randomness is
seeded per dialogue and turn, so a run killed midway and rerun on the unfinished samples gives
the same set (tested). :func:`sequential` runs one dialogue at a time with a full re-encode per
turn, as the official FIRE chat class does: the baseline of ``make bench``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fire_core import checker, feedback, models, prompts
from fire_core.client import Endpoint, Session, Tally, chat_many, image_data_url
from fire_core.files import request_id
from fire_core.records import dialogue_record

log = logging.getLogger(__name__)
STOP_REASONS = ("satisfied", "max_turns", "unparsable")


@dataclass
class Role:
    """Who plays a role. ``kind`` is 'hf' (a local model), 'openai' (an OpenAI-compatible
    endpoint) or 'oracle' (teacher only: the scene-reading annotator)."""

    kind: str
    name: str
    model: Any = None
    processor: Any = None
    base_url: str | None = None
    key_env: str | None = None  # the environment variable with this endpoint's key
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 4
    max_new_tokens: int = 64
    cache_prefix: bool = True
    generator: Any = None  # PrefixCachedGenerator, made on first use
    session: Any = None  # openai: one client.Session per engine run, made on first use
    # the student's prompt from (question, earlier turns); None: FIRE's (prompts.student_prompt).
    # A DRESS model answers under its own prompt (prompts.dress_student_prompt).
    prompt: Callable[[str, list[prompts.Turn]], list[dict[str, Any]]] | None = None

    def tokens(self, text: str) -> int:
        """Generated tokens in ``text`` (+1 for the end token); words for remote roles."""
        if self.processor is not None:
            return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        return len(text.split()) + 1


def hf_role(name: str, model, processor, max_new_tokens: int = 64, cache_prefix: bool = True) -> Role:
    return Role("hf", name, model=model, processor=processor, max_new_tokens=max_new_tokens,
                cache_prefix=cache_prefix)


def oracle_role() -> Role:
    return Role("oracle", "oracle")


def openai_role(name: str, base_url: str, key_env: str, concurrency: int = 8, timeout_s: float = 60.0,
                max_retries: int = 4, max_new_tokens: int = 64) -> Role:
    return Role("openai", name, base_url=base_url, key_env=key_env, concurrency=concurrency, timeout_s=timeout_s,
                max_retries=max_retries, max_new_tokens=max_new_tokens)


def roles_from_config(dcfg, student_model=None, student_processor=None, teacher_model=None,
                      teacher_processor=None, student_name: str = "student", teacher_name: str = "teacher"):
    """The two roles that ``cfg.dialogue`` asks for; local models are passed in by the caller."""

    def make(role: str, name: str, model, processor) -> Role:
        kind, max_new = getattr(dcfg, role), getattr(dcfg, f"{role}_max_new_tokens")
        if kind == "oracle":
            return oracle_role()
        if kind == "openai":
            return openai_role(getattr(dcfg, f"{role}_model"), getattr(dcfg, f"{role}_endpoint"),
                               getattr(dcfg, f"{role}_api_key_env"), dcfg.concurrency, dcfg.timeout_s,
                               dcfg.max_retries, max_new)
        return hf_role(name, model, processor, max_new, dcfg.cache_prefix)

    return (make("student", student_name, student_model, student_processor),
            make("teacher", teacher_name, teacher_model, teacher_processor))


# ---------------------------------------------------------------------------------------------
# One batched call per role


def _openai_messages(conv: list[dict[str, Any]], data_url: str) -> list[dict[str, Any]]:
    out = []
    for m in conv:
        c = m["content"]
        if isinstance(c, str):
            out.append({"role": m["role"], "content": c})
        else:
            out.append({"role": m["role"], "content": [
                {"type": "image_url", "image_url": {"url": data_url}} if p["type"] == "image"
                else {"type": "text", "text": p["text"]} for p in c]})
    return out


def _endpoint(role: Role) -> Endpoint:
    return Endpoint(role.base_url, role.name, role.key_env, role.timeout_s, role.max_retries, role.concurrency)


def _generate(role: Role, keys: list[Any], convs: list[list[dict[str, Any]]], states: list[_State],
              tally: Tally) -> list[str | None]:
    if role.kind == "hf":
        if role.cache_prefix:
            if role.generator is None:
                role.generator = models.PrefixCachedGenerator(role.model, role.processor, role.max_new_tokens)
            return role.generator(keys, convs, [s.image for s in states])
        return models.generate(role.model, role.processor, convs, [s.image for s in states],
                               max_new_tokens=role.max_new_tokens, batch_size=len(convs))
    if role.kind == "openai":

        messages = [_openai_messages(c, s.data_url()) for c, s in zip(convs, states, strict=True)]
        ep = _endpoint(role)
        if role.session is None:  # one client for the whole run, not one per engine step
            role.session = Session(ep, who=f"the '{role.name}' role")
        outcomes = role.session.run(chat_many(ep, messages, {"temperature": 0.0, "max_tokens": role.max_new_tokens},
                                              tally, who=f"the '{role.name}' role", client=role.session.client))
        return [o.value if o.failure is None else None for o in outcomes]
    raise ValueError(f"role kind '{role.kind}' cannot generate")


def _forget(role: Role, key: Any) -> None:
    if role.generator is not None:
        role.generator.drop(key)


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _State:
    sample: dict[str, Any]
    turns: list[dict[str, Any]] = field(default_factory=list)
    _url: str | None = None

    @property
    def image(self):
        return self.sample["image"]

    @property
    def key(self) -> str:
        return self.sample["request_id"]

    def history(self) -> list[prompts.Turn]:
        return [prompts.Turn(t["response"], t["score"], t["feedback"], verdict=t.get("verdict")) for t in self.turns]

    def data_url(self) -> str:
        if self._url is None:

            self._url = image_data_url(self.image)
        return self._url


@dataclass
class EngineResult:
    records: list[dict[str, Any]]
    timing: dict[str, float]  # seconds: student, teacher, other, total
    steps: int
    student_tokens: int
    teacher_tokens: int
    failures: Counter  # requests that failed after their retries (by class), dialogues abandoned
    stops: Counter
    retried: Counter = field(default_factory=Counter)  # failed attempts that were tried again

    @property
    def dialogues_per_s(self) -> float:
        return len(self.records) / max(self.timing["total"], 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return (self.student_tokens + self.teacher_tokens) / max(self.timing["total"], 1e-9)


def oracle_judge(sample: dict[str, Any], response: str, earlier: list[str], seed: int) -> dict[str, Any]:
    """The oracle teacher's reply, seeded per dialogue and turn (batch-independent)."""

    rng = random.Random(request_id(seed, sample["id"], len(earlier), "oracle-teacher"))
    j = feedback.judge(sample, response, history=earlier, rng=rng)
    return {"score": j.score, "feedback": j.feedback, "parsable": True, "verdict": j.correct,
            "raw": prompts.teacher_reply(prompts.Turn(response, j.score, j.feedback, verdict=j.correct))}


def _chunks(samples: Iterable[dict[str, Any]], size: int | None) -> Iterator[Iterable[dict[str, Any]]]:
    if not size:
        yield samples
        return
    chunk: list[dict[str, Any]] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def judge_turn(sample: dict[str, Any], response: str) -> bool | None:
    """The ground truth's verdict on a turn, chosen per data source: the world's answer checker
    for world samples; ``None`` for real data (``judge: teacher``), judged by the teacher's
    score alone, as the paper does."""
    if sample.get("judge", "checker") != "checker":
        return None
    return checker.is_correct(sample["family"], response, sample["answer"])


def run(samples: Iterable[dict[str, Any]], student: Role, teacher: Role, dcfg, seed: int, store=None,
        source: str | None = None, progress: bool = True, total: int | None = None,
        on_record: Callable[[dict[str, Any]], None] | None = None, done: set[str] | None = None,
        chunk: int | None = None) -> EngineResult:
    """Run student x teacher dialogues over ``samples`` (dicts with id, request_id, question,
    answer, family, image (PIL), and for the oracle scene/response). Finished dialogues go to
    ``store`` (a ShardStore) as they end.

    Resuming exactly: with ``chunk``, the samples are taken in fixed consecutive chunks and a
    freed batch slot is refilled only from the same chunk, so which dialogues share a batch
    depends on the sample list alone. A rerun passes every sample and the request ids already in
    the store as ``done``: chunks that are all done are skipped, and an unfinished chunk is run
    whole again (in the same batches, so with the same float rounding) and only its missing
    dialogues are stored. Floating-point results of a batch depend on its other rows, so a rerun
    that batched only the missing samples could give other dialogues than an uninterrupted run.
    """
    from tqdm.auto import tqdm

    source = source or f"{student.name}x{teacher.name}"
    done = done or set()
    active: list[_State] = []
    records: list[dict[str, Any]] = []
    timing = {"student": 0.0, "teacher": 0.0, "other": 0.0}
    tally = Tally()
    failures = tally.failed  # failed requests (after retries), and dialogues abandoned for them
    stops: Counter = Counter()
    tokens = {"student": 0, "teacher": 0}
    steps = 0
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc=f"dialogues {source}", unit="dlg", disable=not progress)
    make_prompt = student.prompt or prompts.student_prompt
    try:
        for part in _chunks(samples, chunk):
            if chunk and all(x["request_id"] in done for x in part):
                bar.update(len(part))  # type: ignore[arg-type]
                continue
            queue: Iterator[dict[str, Any]] = iter(part)
            exhausted = False
            while True:
                while not exhausted and len(active) < dcfg.batch_size:
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                    else:
                        active.append(_State(nxt))
                if not active:
                    break
                steps += 1
                keys = [s.key for s in active]
                # the student answers for every active dialogue
                t0 = time.perf_counter()
                convs = [make_prompt(s.sample["question"], s.history()) for s in active]
                responses = _generate(student, keys, convs, active, tally)
                t1 = time.perf_counter()
                timing["student"] += t1 - t0
                # the teacher judges all of them
                ok = [i for i, r in enumerate(responses) if r is not None]
                replies: list[dict[str, Any] | None] = [None] * len(active)
                if teacher.kind == "oracle":
                    for i in ok:
                        s = active[i]
                        replies[i] = oracle_judge(s.sample, responses[i], [t["response"] for t in s.turns], seed)
                else:
                    tconvs = [prompts.teacher_prompt(active[i].sample["question"], active[i].sample["answer"],
                                                     active[i].history(), responses[i]) for i in ok]
                    texts = _generate(teacher, [keys[i] for i in ok], tconvs, [active[i] for i in ok], tally)
                    for i, text in zip(ok, texts, strict=True):
                        if text is not None:
                            p = prompts.parse_teacher(text, dcfg.score_min, dcfg.score_max)
                            replies[i] = {"score": p.score, "feedback": p.feedback, "parsable": p.parsable,
                                          "verdict": p.verdict, "raw": text}
                t2 = time.perf_counter()
                timing["teacher"] += t2 - t1
                still = []
                for i, s in enumerate(active):
                    if replies[i] is None:  # a remote request failed for good: not written, rerun retries it
                        failures["dialogues_abandoned"] += 1
                        _forget(student, s.key)
                        _forget(teacher, s.key)
                        bar.update(1)
                        continue
                    r, rep = responses[i], replies[i]
                    tokens["student"] += student.tokens(r)
                    tokens["teacher"] += teacher.tokens(rep["raw"]) if teacher.kind != "oracle" else 0
                    s.turns.append({"response": r, "score": rep["score"], "feedback": rep["feedback"],
                                    "parsable": rep["parsable"], "verdict": rep["verdict"], "raw": rep["raw"],
                                    "correct": judge_turn(s.sample, r)})
                    stop = ("unparsable" if not rep["parsable"] else "satisfied" if rep["score"] >= dcfg.threshold
                            else "max_turns" if len(s.turns) >= dcfg.max_turns else None)
                    if stop is None:
                        still.append(s)
                        continue
                    rec = dialogue_record(s.sample, s.turns, s.sample["request_id"], source, stop=stop,
                                          student=student.name, teacher=teacher.name)
                    if store is not None and rec["request_id"] not in done:
                        store.append(rec)
                    if on_record is not None:
                        on_record(rec)
                    records.append(rec)
                    stops[stop] += 1
                    _forget(student, s.key)
                    _forget(teacher, s.key)
                    bar.update(1)
                active = still
                timing["other"] += time.perf_counter() - t2
    finally:
        bar.close()
        for s in active:  # interrupted: nothing cached survives
            _forget(student, s.key)
            _forget(teacher, s.key)
        for role in (student, teacher):
            if role.session is not None:
                role.session.close()
                role.session = None
    timing["total"] = time.perf_counter() - t_start
    timing["other"] = timing["total"] - timing["student"] - timing["teacher"]
    return EngineResult(records=records, timing=timing, steps=steps, student_tokens=tokens["student"],
                        teacher_tokens=tokens["teacher"], failures=failures, stops=stops,
                        retried=tally.retried)


def sequential(samples: Iterable[dict[str, Any]], student: Role, teacher: Role, dcfg, seed: int) -> EngineResult:
    """One dialogue at a time, batch 1, the whole conversation re-encoded every turn (how the
    official FIRE chat class runs): the baseline the engine is measured against."""
    from dataclasses import replace

    one = replace(dcfg, batch_size=1)
    plain_s = replace(student, cache_prefix=False, generator=None)
    plain_t = replace(teacher, cache_prefix=False, generator=None)
    return run(samples, plain_s, plain_t, one, seed, progress=False)


# ---------------------------------------------------------------------------------------------
# FIRE-1M's filter and records


def filter_reason(record: dict[str, Any], family: str | None = None) -> str | None:
    """Why the simulation filter drops a dialogue: a teacher reply without a score
    (``unparsable``), feedback that states the answer (``leaked_answer``), or scores that stop
    increasing: fewer than two turns, or a turn that does not score above the one before
    (``not_increasing``)."""
    turns = record["turns"]
    if any(not t.get("parsable", True) or t.get("score") is None for t in turns):
        return "unparsable"
    if feedback.dialogue_leaks_answer(record, family):
        return "leaked_answer"
    scores = [t["score"] for t in turns]
    if len(scores) < 2 or any(b <= a for a, b in zip(scores, scores[1:], strict=False)):
        return "not_increasing"
    return None



# ---------------------------------------------------------------------------------------------
# Stage 05: FIRE-1M and the FIRE student
