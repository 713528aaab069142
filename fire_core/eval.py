"""Evaluation: answer accuracy, the teacher's fixed-dialogue scores, and the metric command line.

    rows = eval.qa_predictions(model, processor, records, max_new_tokens=64)
    table = eval.accuracy_table(rows)        # per split and family, with counts
    metrics.free_metrics([[3, 5, 9], [9], [2, 2, 2, 2, 2]], threshold=8, max_turns=5)
    metrics.text_metrics({"a": "look left"}, {"a": "look at the left"})   # BLEU_1..4, CIDEr

From the shell (one JSON object on stdout; a malformed line is rejected, naming its number):

    python -m fire_core.eval free --dialogues d.jsonl [--threshold 8] [--max-turns 5]
        # lines {"id": ..., "scores": [s1, s2, ...], "correct": [true, ...] (optional)}
    python -m fire_core.eval text --predictions p.jsonl --references r.jsonl
        # lines {"id": ..., "text": ...}; several reference lines may share an id

The metrics themselves, and their definitions, live in ``fire_core.metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from fire_core import checker, feedback, models, prompts
from fire_core.files import jsonl_lines
from fire_core.metrics import chair, free_metrics, text_metrics, truth_metrics

PROMPTS = ("base", "student", "dress")


def single_turn(question: str, prompt: str) -> list[dict[str, Any]]:
    """The chat that asks ``question`` once: 'base' (the base VLM's chat), 'student' (a FIRE
    student's first turn) or 'dress' (a DRESS model under the best condition)."""
    if prompt == "base":
        return prompts.base_messages([(question, "")])[:-1]
    if prompt == "student":
        return prompts.student_prompt(question, [])
    if prompt == "dress":
        return prompts.dress_prompt(question, [])
    raise ValueError(f"prompt must be one of {PROMPTS}, got '{prompt}'")


def ask(model, processor, questions: Sequence[str], images: Sequence[Any], prompt: str = "base",
        max_new_tokens: int = 64, batch_size: int = 32, desc: str = "answering") -> list[str]:
    """Greedy single-turn answers to any questions about the images, in batches."""
    convs = [single_turn(q, prompt) for q in questions]
    out: list[str] = []
    for start in tqdm(range(0, len(convs), batch_size), desc=desc, unit="batch"):
        out += models.generate(model, processor, convs[start:start + batch_size], images[start:start + batch_size],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return out


def qa_predictions(model, processor, records: Sequence[dict[str, Any]], max_new_tokens: int = 64,
                   batch_size: int = 32, desc: str = "answering", prompt: str = "base") -> list[dict[str, Any]]:
    """Greedy single-turn answers for world records, judged by the answer checker. ``prompt``
    as in :func:`single_turn`."""
    single_turn("", prompt)  # an unknown prompt fails before any work
    out: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        chunk = records[start:start + batch_size]
        preds = models.generate(model, processor, [single_turn(r["question"], prompt) for r in chunk],
                                [r["image"] for r in chunk], max_new_tokens=max_new_tokens, batch_size=batch_size)
        for r, p in zip(chunk, preds, strict=True):
            out.append({"id": r["id"], "split": r["split"], "family": r["family"], "question": r["question"],
                        "answer": r["answer"], "prediction": p,
                        "correct": checker.is_correct(r["family"], p, r["answer"])})
    return out


def accuracy_table(rows: Sequence[dict[str, Any]]):
    """Accuracy per split and family, plus an 'all' row per split."""
    import pandas as pd

    df = pd.DataFrame(rows)
    per = df.groupby(["split", "family"]).agg(n=("correct", "size"), accuracy=("correct", "mean")).reset_index()
    total = df.groupby("split").agg(n=("correct", "size"), accuracy=("correct", "mean")).reset_index()
    total["family"] = "all"
    return pd.concat([per, total[per.columns]], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# The teacher in fixed dialogues: each gold teacher turn predicted from the gold history


def fixed_turns(model, processor, dialogues: Sequence[dict[str, Any]], images: dict[str, Any], prompt_of,
                max_new_tokens: int, batch_size: int, desc: str):
    """Fixed-dialogue generation: for every gold turn k of every dialogue, the model's reply to
    ``prompt_of(dialogue, gold_history, k)``; yields (k, dialogue, text). Turns run in order, so
    each dialogue's KV cache carries over from one turn to the next."""
    from tqdm.auto import tqdm

    gen = models.PrefixCachedGenerator(model, processor, max_new_tokens)
    max_t = max((len(d["turns"]) for d in dialogues), default=0)
    jobs = [(k, d) for k in range(max_t) for d in dialogues if k < len(d["turns"])]
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc=desc, unit="batch"):
            chunk = jobs[start:start + batch_size]
            convs = [prompt_of(d, prompts.record_turns(d["turns"][:k]), k) for k, d in chunk]
            texts = gen([d["id"] for _, d in chunk], convs, [images[d["id"]] for _, d in chunk])
            yield from ((k, d, text) for (k, d), text in zip(chunk, texts, strict=True))
    finally:
        gen.cache.clear()


def teacher_fixed(model, processor, dialogues: Sequence[dict[str, Any]], images: dict[str, Any],
                  max_new_tokens: int = 48, batch_size: int = 32, score_min: int = 1, score_max: int = 10,
                  desc: str = "teacher turns") -> list[dict[str, Any]]:
    """One row per gold teacher turn: the predicted score and feedback against the gold ones.
    ``images`` maps dialogue id to its image."""

    rows: list[dict[str, Any]] = []
    for k, d, text in fixed_turns(model, processor, dialogues, images,
                                  lambda d, hist, k: prompts.teacher_prompt(d["question"], d["answer"], hist,
                                                                            d["turns"][k]["response"]),
                                  max_new_tokens, batch_size, desc):
        gold = d["turns"][k]
        p = prompts.parse_teacher(text, score_min, score_max)
        rows.append({
            "id": d["id"], "family": d["task"], "turn": k + 1, "gold_score": gold["score"],
            "score": p.score, "parsable": p.parsable, "verdict": p.verdict,
            "abs_error": abs(p.score - gold["score"]) if p.parsable else 10,
            "gold_feedback": gold["feedback"], "feedback": p.feedback, "raw": text,
            "leaked": (not gold.get("correct", False))
            and feedback.leaks_answer(p.feedback, d["answer"], d["task"], d["question"])})
    return rows


def teacher_probe(model, processor, rows: Sequence[dict[str, Any]], seed: int, threshold: int = 8,
                  max_new_tokens: int = 48, batch_size: int = 32) -> list[dict[str, Any]]:
    """Does the teacher judge the answer? For each world row (with its image), the reference
    response and the same response with the answer swapped for a wrong one
    (``feedback.wrong_answer``), each judged on its own as a first turn. One row per sample: the
    two scores and ``ok`` (right at or above ``threshold``, wrong below it). A teacher that
    scores by task family or turn position gives both the same score."""
    import random


    rng = random.Random(seed)
    convs, images, meta = [], [], []
    for r in rows:
        wrong = feedback.respond(r, feedback.wrong_answer(r, rng))  # both read family, answer, response
        for resp in (r["response"], wrong):
            convs.append(prompts.teacher_prompt(r["question"], r["answer"], [], resp))
            images.append(r["image"])
        meta.append((r, wrong))
    texts = models.generate(model, processor, convs, images, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = []
    for k, (r, wrong) in enumerate(meta):
        right_score = prompts.parse_teacher(texts[2 * k]).score
        wrong_score = prompts.parse_teacher(texts[2 * k + 1]).score
        out.append({"id": r["id"], "family": r["family"], "answer": r["answer"], "wrong_response": wrong,
                    "right_score": right_score, "wrong_score": wrong_score,
                    "ok": right_score is not None and wrong_score is not None
                    and right_score >= threshold > wrong_score})
    return out


def student_fixed(model, processor, dialogues: Sequence[dict[str, Any]], images: dict[str, Any],
                  max_new_tokens: int = 64, batch_size: int = 32, desc: str = "student turns") -> list[dict[str, Any]]:
    """One row per gold student turn: the response generated from the gold history."""
    return [{"id": d["id"], "family": d["task"], "turn": k + 1, "prediction": text,
             "reference": d["turns"][k]["response"]}
            for k, d, text in fixed_turns(model, processor, dialogues, images,
                                          lambda d, hist, k: prompts.student_prompt(d["question"], hist),
                                          max_new_tokens, batch_size, desc)]


def teacher_summary(rows: Sequence[dict[str, Any]], threshold: int = 8) -> dict[str, float]:
    """Score MAE (an unparsable score is an error of 10, as in FIRE's evaluation), the share
    and count of unparsable replies ("failed to follow"), the share of turns where teacher and
    gold agree on "satisfied" (score >= threshold), the share of feedback that states the
    answer, and BLEU/CIDEr of the feedback text."""
    n = len(rows)
    if n == 0:
        raise ValueError("no teacher turns to summarise")
    text = text_metrics({f"{r['id']}#{r['turn']}": r["feedback"] for r in rows},
                        {f"{r['id']}#{r['turn']}": r["gold_feedback"] for r in rows})
    return {"n": n, "score_mae": sum(r["abs_error"] for r in rows) / n,
            "failed_to_follow": sum(not r["parsable"] for r in rows),
            "unparsable_share": sum(not r["parsable"] for r in rows) / n,
            "satisfied_agreement": sum((r["score"] is not None and r["score"] >= threshold) == (r["gold_score"] >= threshold)
                                       for r in rows) / n,
            "leak_share": sum(bool(r["leaked"]) for r in rows) / n,
            # world teachers state "Same answer: yes|no" before the score: how often that line is
            # there, and agrees with the gold on "satisfied" where it is (NaN without any)
            "verdict_share": sum(r.get("verdict") is not None for r in rows) / n,
            "verdict_agreement": _mean([r["verdict"] == (r["gold_score"] >= threshold) for r in rows
                                        if r.get("verdict") is not None]), **text}


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")



# ---------------------------------------------------------------------------------------------
# Command line


class InputError(ValueError):
    """A metrics input file that does not fit its format; the message names the line."""


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, obj in jsonl_lines(path, InputError):
        if not isinstance(obj, dict) or "id" not in obj:
            raise InputError(f"{path}: line {n}: expected an object with an 'id'")
        yield n, obj


def read_dialogues(path: str, threshold: int, max_turns: int) -> tuple[list[list[int]], list[list[bool]] | None]:
    """Score lists (and correctness lists when every line has them) from a dialogues file."""
    scores, correct, seen = [], [], set()
    for n, obj in _jsonl(path):
        s = obj.get("scores")
        if not isinstance(s, list) or not s or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in s):
            raise InputError(f"{path}: line {n}: 'scores' must be a non-empty list of numbers")
        if len(s) > max_turns:
            raise InputError(f"{path}: line {n}: {len(s)} scores but --max-turns is {max_turns}")
        hit = next((t for t, x in enumerate(s, 1) if x >= threshold), None)
        if hit is not None and hit < len(s):
            raise InputError(f"{path}: line {n}: the dialogue goes on after reaching the threshold at turn {hit}")
        if obj["id"] in seen:
            raise InputError(f"{path}: line {n}: duplicate id {obj['id']!r}")
        seen.add(obj["id"])
        c = obj.get("correct")
        if c is not None and (not isinstance(c, list) or len(c) != len(s) or not all(isinstance(x, bool) for x in c)):
            raise InputError(f"{path}: line {n}: 'correct' must be a list of booleans as long as 'scores'")
        scores.append(s)
        correct.append(c)
    if not scores:
        raise InputError(f"{path}: no dialogues")
    has = [c is not None for c in correct]
    return scores, (correct if all(has) else None)  # type: ignore[return-value]


def read_texts(path: str, many: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, obj in _jsonl(path):
        if not isinstance(obj.get("text"), str):
            raise InputError(f"{path}: line {n}: 'text' must be a string")
        key = str(obj["id"])
        if many:
            out.setdefault(key, []).append(obj["text"])
        elif key in out:
            raise InputError(f"{path}: line {n}: duplicate id {key!r}")
        else:
            out[key] = obj["text"]
    if not out:
        raise InputError(f"{path}: no lines")
    return out


def read_accuracy(path: str) -> dict[str, Any]:
    """Accuracy of a predictions file, every line judged again by the answer checker."""
    right = []
    for n, obj in _jsonl(path):
        for key in ("family", "prediction", "answer"):
            if not isinstance(obj.get(key), str):
                raise InputError(f"{path}: line {n}: '{key}' must be a string")
        try:
            right.append(checker.is_correct(obj["family"], obj["prediction"], obj["answer"]))
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: line {n}: {exc}") from exc
    if not right:
        raise InputError(f"{path}: no predictions")
    return {"accuracy": sum(right) / len(right), "n": len(right)}


def read_chair(path: str) -> dict[str, Any]:
    """CHAIR of a captions file (point values; the stage tables carry the intervals)."""
    caps, objs = [], []
    for n, obj in _jsonl(path):
        if not isinstance(obj.get("caption"), str):
            raise InputError(f"{path}: line {n}: 'caption' must be a string")
        if not isinstance(obj.get("objects"), list) or not all(isinstance(o, str) for o in obj["objects"]):
            raise InputError(f"{path}: line {n}: 'objects' must be a list of object names")
        caps.append(obj["caption"])
        objs.append(obj["objects"])
    if not caps:
        raise InputError(f"{path}: no captions")
    out = chair(caps, objs, n_bootstrap=1)
    return {k: out[k] for k in ("CHAIR_i", "CHAIR_s", "mentions", "hallucinated", "n")}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m fire_core.eval", description="FIRE-Bench metrics from files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("free", help="free-dialogue metrics (AT, ADR, ATR, RR, RR_conditional)")
    f.add_argument("--dialogues", required=True, help='JSONL: {"id": ..., "scores": [...], "correct": [...]}')
    f.add_argument("--threshold", type=float, default=8)
    f.add_argument("--max-turns", type=int, default=5)
    a = sub.add_parser("accuracy", help="answer accuracy, each prediction judged again by the answer checker")
    a.add_argument("--predictions", required=True,
                   help='JSONL: {"id": ..., "family": ..., "prediction": ..., "answer": ...}')
    c = sub.add_parser("chair", help="CHAIR_i and CHAIR_s of captions against their images' objects")
    c.add_argument("--captions", required=True, help='JSONL: {"id": ..., "caption": ..., "objects": ["star", ...]}')
    t = sub.add_parser("text", help="BLEU_1..4, CIDEr, METEOR, ROUGE_L")
    t.add_argument("--predictions", required=True, help='JSONL: {"id": ..., "text": ...}')
    t.add_argument("--references", required=True, help="JSONL, same form; several lines may share an id")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "free":
            if args.max_turns < 1:
                raise InputError("--max-turns must be >= 1")
            scores, correct = read_dialogues(args.dialogues, args.threshold, args.max_turns)
            out = free_metrics(scores, args.threshold, args.max_turns)
            if correct is not None:
                out.update(truth_metrics(correct, args.max_turns))
        elif args.cmd == "accuracy":
            out = read_accuracy(args.predictions)
        elif args.cmd == "chair":
            out = read_chair(args.captions)
        else:
            preds = read_texts(args.predictions, many=False)
            refs = read_texts(args.references, many=True)
            missing = sorted(set(preds) ^ set(refs))
            if missing:
                raise InputError(f"predictions and references differ in {len(missing)} ids, e.g. {missing[:3]}")
            out = text_metrics(preds, refs, meteor_rouge=True)
    except InputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
