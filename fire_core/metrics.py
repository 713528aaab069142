"""The free-dialogue and text metrics (FIRE's AT, ADR, ATR, RR; BLEU, CIDEr), with bootstrap intervals.

Free-dialogue metrics (FIRE; score scale 1-10, threshold tau = 8, at most N = 5 turns). A
dialogue d has scores s_1..s_T, T <= N, and stops at the first s_t >= tau:

- AT, average turn (lower is better): mean of t*, the first turn with s_t >= tau, or N + 1 when
  no turn reaches tau.
- ADR, average dialogue refinement: mean of s_T - s_1.
- ATR, average turn refinement: mean over dialogues with T > 1 of (s_T - s_1) / (T - 1).
- RR, refinement ratio: share of all dialogues with s_1 < tau and s_T >= tau.
  RR_conditional: the same count over the dialogues with s_1 < tau.
A teacher reply whose score could not be read ends the dialogue; its score counts as the
bottom of the scale (it is not satisfied) and is reported separately as ``unparsable``.
With ground truth, ``truth_metrics`` uses "the answer is correct" in place of s_t >= tau.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def free_metrics(dialogues: Sequence[Sequence[int | None]], threshold: int = 8, max_turns: int = 5,
                 score_min: int = 1) -> dict[str, float]:
    """AT, ADR, ATR, RR, RR_conditional and n over dialogues given as score lists (see the
    module docstring). ``None`` (an unparsable score) counts as ``score_min``."""
    n = len(dialogues)
    if n == 0:
        raise ValueError("no dialogues to score")
    at = adr = 0.0
    atr: list[float] = []
    refined = first_below = unparsable = 0
    for k, raw in enumerate(dialogues):
        if len(raw) == 0:
            raise ValueError(f"dialogue {k} has no scores")
        if len(raw) > max_turns:
            raise ValueError(f"dialogue {k} has {len(raw)} turns, more than max_turns={max_turns}")
        unparsable += sum(s is None for s in raw)
        s = [score_min if x is None else x for x in raw]
        hit = next((t for t, x in enumerate(s, 1) if x >= threshold), None)
        at += hit if hit is not None else max_turns + 1
        adr += s[-1] - s[0]
        if len(s) > 1:
            atr.append((s[-1] - s[0]) / (len(s) - 1))
        if s[0] < threshold:
            first_below += 1
            refined += s[-1] >= threshold
    return {"AT": at / n, "ADR": adr / n, "ATR": sum(atr) / len(atr) if atr else 0.0, "RR": refined / n,
            "RR_conditional": refined / first_below if first_below else 0.0, "n": n,
            "n_first_below": first_below, "n_multi_turn": len(atr), "unparsable": unparsable}


def truth_metrics(correct: Sequence[Sequence[bool]], max_turns: int = 5) -> dict[str, float]:
    """The same with "satisfied" decided by the ground-truth checker: AT over the first correct
    turn, RR and RR_conditional over dialogues wrong at turn 1, accuracy at turn 1 and at the
    last turn."""
    n = len(correct)
    if n == 0:
        raise ValueError("no dialogues to score")
    at = sum(next((t for t, c in enumerate(cs, 1) if c), max_turns + 1) for cs in correct) / n
    wrong_first = [cs for cs in correct if not cs[0]]
    fixed = sum(1 for cs in wrong_first if any(cs[1:]))
    return {"AT_truth": at, "RR_truth": fixed / n, "RR_truth_conditional": fixed / len(wrong_first) if wrong_first else 0.0,
            "accuracy_turn1": sum(bool(cs[0]) for cs in correct) / n,
            "accuracy_final": sum(any(cs) for cs in correct) / n, "n": n}


def dialogue_metrics(records: Sequence[dict[str, Any]], threshold: int = 8, max_turns: int = 5) -> dict[str, float]:
    """Both sets of metrics for engine records (``turns`` with ``score`` and ``correct``)."""
    scores = [[t["score"] for t in r["turns"]] for r in records]
    correct = [[bool(t["correct"]) for t in r["turns"]] for r in records]
    return {**free_metrics(scores, threshold, max_turns), **truth_metrics(correct, max_turns)}


def _tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))


def text_metrics(predictions: dict[str, str], references: dict[str, str | list[str]],
                 meteor_rouge: bool = False) -> dict[str, float]:
    """BLEU_1..BLEU_4 and CIDEr of predictions against references (same ids); with
    ``meteor_rouge`` also METEOR (pycocoevalcap's Java scorer) and ROUGE_L."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"predictions and references differ in {len(missing)} ids, e.g. {sorted(missing)[:3]}")
    if not predictions:
        extra = {"METEOR": math.nan, "ROUGE_L": math.nan} if meteor_rouge else {}
        return {f"BLEU_{k}": math.nan for k in range(1, 5)} | {"CIDEr": math.nan} | extra
    res = {k: [_tokens(v) or "<empty>"] for k, v in predictions.items()}
    gts = {k: [_tokens(x) or "<empty>" for x in ([v] if isinstance(v, str) else v)] for k, v in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {**{f"BLEU_{k}": float(b) for k, b in enumerate(bleu, 1)}, "CIDEr": float(cider)}
    if meteor_rouge:
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge

        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    return out


def paired_difference(a: Sequence[bool], b: Sequence[bool], n_bootstrap: int = 1000, ci: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """mean(b) - mean(a) on the same items, with a paired bootstrap confidence interval."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    diffs = y[idx].mean(1) - x[idx].mean(1)
    lo, hi = np.quantile(diffs, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {"difference": float(y.mean() - x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": len(x)}


HEADLINE = ("AT", "ADR", "ATR", "RR", "RR_conditional")


TRUTH = ("AT_truth", "RR_truth", "RR_truth_conditional", "accuracy_turn1", "accuracy_final")


def _per_dialogue(records, threshold: int, max_turns: int, score_min: int = 1) -> dict[str, np.ndarray]:
    s = [[score_min if t["score"] is None else t["score"] for t in r["turns"]] for r in records]
    c = [[bool(t["correct"]) for t in r["turns"]] for r in records]
    first = lambda xs, ok: next((k for k, x in enumerate(xs, 1) if ok(x)), max_turns + 1)  # noqa: E731
    return {
        "t_star": np.array([first(x, lambda v: v >= threshold) for x in s], float),
        "delta": np.array([x[-1] - x[0] for x in s], float),
        "atr": np.array([(x[-1] - x[0]) / (len(x) - 1) if len(x) > 1 else np.nan for x in s], float),
        "below": np.array([x[0] < threshold for x in s], float),
        "refined": np.array([x[0] < threshold <= x[-1] for x in s], float),
        "t_truth": np.array([first(x, bool) for x in c], float),
        "wrong1": np.array([not x[0] for x in c], float),
        "fixed": np.array([(not x[0]) and any(x[1:]) for x in c], float),
        "right1": np.array([x[0] for x in c], float),
        "right_any": np.array([any(x) for x in c], float),
        "agree": np.array([np.mean([(sv >= threshold) == cv for sv, cv in zip(x, y, strict=True)])
                           for x, y in zip(s, c, strict=True)], float),
    }


def _metrics(p: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics for each row of ``idx`` (resamples x dialogues), vectorised."""
    with np.errstate(invalid="ignore", divide="ignore"):
        atr = p["atr"][idx]
        n_multi = (~np.isnan(atr)).sum(1)
        return {
            "AT": p["t_star"][idx].mean(1), "ADR": p["delta"][idx].mean(1),
            "ATR": np.where(n_multi > 0, np.nansum(atr, 1) / np.maximum(n_multi, 1), 0.0),
            "RR": p["refined"][idx].mean(1),
            "RR_conditional": np.where(p["below"][idx].sum(1) > 0, p["refined"][idx].sum(1) / p["below"][idx].sum(1), 0.0),
            "AT_truth": p["t_truth"][idx].mean(1), "RR_truth": p["fixed"][idx].mean(1),
            "RR_truth_conditional": np.where(p["wrong1"][idx].sum(1) > 0, p["fixed"][idx].sum(1) / p["wrong1"][idx].sum(1), 0.0),
            "accuracy_turn1": p["right1"][idx].mean(1), "accuracy_final": p["right_any"][idx].mean(1),
            "teacher_truth_agreement": p["agree"][idx].mean(1),
        }


def bootstrap_metrics(records, threshold: int, max_turns: int, n_bootstrap: int, ci: float, seed: int) -> dict[str, float]:
    """Every free-dialogue metric with its bootstrap interval: ``X``, ``X_lo``, ``X_hi``, and ``n``.
    The point values equal :func:`fire_core.eval.free_metrics` / ``truth_metrics`` (tested)."""
    if not records:
        raise ValueError("no dialogues to score")
    p = _per_dialogue(records, threshold, max_turns)
    n = len(records)
    point = {k: float(v[0]) for k, v in _metrics(p, np.arange(n)[None, :]).items()}
    rng = np.random.default_rng(seed)
    boots = _metrics(p, rng.integers(0, n, size=(n_bootstrap, n)))
    out: dict[str, float] = {"n": n}
    for k, v in point.items():
        lo, hi = np.quantile(boots[k], [(1 - ci) / 2, 1 - (1 - ci) / 2])
        out.update({k: v, f"{k}_lo": float(lo), f"{k}_hi": float(hi)})
    return out


def solved_by_turn(records, threshold: int, max_turns: int) -> dict[str, list[float]]:
    """Share of dialogues satisfied (teacher) and correct (truth) by turn t = 1..max_turns."""
    p = _per_dialogue(records, threshold, max_turns)
    return {"teacher": [float((p["t_star"] <= t).mean()) for t in range(1, max_turns + 1)],
            "truth": [float((p["t_truth"] <= t).mean()) for t in range(1, max_turns + 1)]}
