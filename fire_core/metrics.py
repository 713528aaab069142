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

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fire_core.checker import shapes_in


def per_dialogue(scores: Sequence[Sequence[int | None]] | None = None,
                 correct: Sequence[Sequence[bool]] | None = None, threshold: int = 8, max_turns: int = 5,
                 score_min: int = 1) -> dict[str, np.ndarray]:
    """What each dialogue contributes to the metrics, one array entry per dialogue: from the
    teacher's scores (``None``, an unparsable score, counts as ``score_min``), from the answer
    checker's verdicts, or from both (then also their agreement)."""
    given = scores if scores is not None else correct
    if given is None:
        raise ValueError("per_dialogue needs scores, correct verdicts, or both")
    if len(given) == 0:
        raise ValueError("no dialogues to score")
    for k, x in enumerate(given):
        if len(x) == 0:
            raise ValueError(f"dialogue {k} has no scores")
        if len(x) > max_turns:
            raise ValueError(f"dialogue {k} has {len(x)} turns, more than max_turns={max_turns}")
    first = lambda xs, ok: next((k for k, x in enumerate(xs, 1) if ok(x)), max_turns + 1)  # noqa: E731
    p: dict[str, np.ndarray] = {}
    if scores is not None:
        s = [[score_min if v is None else v for v in x] for x in scores]
        p.update({
            "t_star": np.array([first(x, lambda v: v >= threshold) for x in s], float),
            "delta": np.array([x[-1] - x[0] for x in s], float),
            "atr": np.array([(x[-1] - x[0]) / (len(x) - 1) if len(x) > 1 else np.nan for x in s], float),
            "below": np.array([x[0] < threshold for x in s], float),
            "refined": np.array([x[0] < threshold <= x[-1] for x in s], float),
            "unparsable": np.array([sum(v is None for v in x) for x in scores], float),
        })
    if correct is not None:
        c = [[bool(v) for v in x] for x in correct]
        p.update({
            "t_truth": np.array([first(x, bool) for x in c], float),
            "wrong1": np.array([not x[0] for x in c], float),
            "fixed": np.array([(not x[0]) and any(x[1:]) for x in c], float),
            "right1": np.array([x[0] for x in c], float),
            "right_any": np.array([any(x) for x in c], float),
        })
    if scores is not None and correct is not None:
        p["agree"] = np.array([np.mean([(sv >= threshold) == cv for sv, cv in zip(x, y, strict=True)])
                               for x, y in zip(s, c, strict=True)], float)
    return p


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def metric_table(p: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric the arrays of :func:`per_dialogue` allow, once per row of ``idx`` (a
    resample of dialogue indices; ``np.arange(n)[None]`` gives the plain metric)."""
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if "t_star" in p:
            atr = p["atr"][idx]
            n_multi = (~np.isnan(atr)).sum(1)
            out.update({
                "AT": p["t_star"][idx].mean(1), "ADR": p["delta"][idx].mean(1),
                "ATR": _ratio(np.nansum(atr, 1), n_multi),
                "RR": p["refined"][idx].mean(1),
                "RR_conditional": _ratio(p["refined"][idx].sum(1), p["below"][idx].sum(1)),
            })
        if "t_truth" in p:
            out.update({
                "AT_truth": p["t_truth"][idx].mean(1), "RR_truth": p["fixed"][idx].mean(1),
                "RR_truth_conditional": _ratio(p["fixed"][idx].sum(1), p["wrong1"][idx].sum(1)),
                "accuracy_turn1": p["right1"][idx].mean(1), "accuracy_final": p["right_any"][idx].mean(1),
            })
        if "agree" in p:
            out["teacher_truth_agreement"] = p["agree"][idx].mean(1)
    return out


def _point(p: dict[str, np.ndarray]) -> dict[str, float]:
    n = len(next(iter(p.values())))
    return {k: float(v[0]) for k, v in metric_table(p, np.arange(n)[None, :]).items()}


def free_metrics(dialogues: Sequence[Sequence[int | None]], threshold: int = 8, max_turns: int = 5,
                 score_min: int = 1) -> dict[str, float]:
    """AT, ADR, ATR, RR, RR_conditional and counts over dialogues given as score lists (see the
    module docstring). ``None`` (an unparsable score) counts as ``score_min``."""
    p = per_dialogue(scores=dialogues, threshold=threshold, max_turns=max_turns, score_min=score_min)
    return {**_point(p), "n": len(dialogues), "n_first_below": int(p["below"].sum()),
            "n_multi_turn": int((~np.isnan(p["atr"])).sum()), "unparsable": int(p["unparsable"].sum())}


def truth_metrics(correct: Sequence[Sequence[bool]], max_turns: int = 5) -> dict[str, float]:
    """The same with "satisfied" decided by the ground-truth checker: AT over the first correct
    turn, RR and RR_conditional over dialogues wrong at turn 1, accuracy at turn 1 and at the
    last turn."""
    return {**_point(per_dialogue(correct=correct, max_turns=max_turns)), "n": len(correct)}


def has_truth(records: Sequence[dict[str, Any]]) -> bool:
    """Whether every turn of every record has the answer checker's verdict. Real data (the
    released FIRE files) is judged by the teacher's score alone: its turns have ``correct: None``."""
    return all(t.get("correct") is not None for r in records for t in r["turns"])


def _record_arrays(records: Sequence[dict[str, Any]], threshold: int, max_turns: int) -> dict[str, np.ndarray]:
    correct = [[bool(t["correct"]) for t in r["turns"]] for r in records] if has_truth(records) else None
    return per_dialogue([[t["score"] for t in r["turns"]] for r in records], correct, threshold, max_turns)


def dialogue_metrics(records: Sequence[dict[str, Any]], threshold: int = 8, max_turns: int = 5) -> dict[str, float]:
    """The teacher-score metrics for engine records, and the ground-truth ones when every turn
    has the checker's verdict (``correct``)."""
    scores = [[t["score"] for t in r["turns"]] for r in records]
    out = free_metrics(scores, threshold, max_turns)
    if has_truth(records):
        out.update(truth_metrics([[bool(t["correct"]) for t in r["turns"]] for r in records], max_turns))
    return out


EMPTY = "emptyresponse"  # stands in for a text with no words (BLEU needs one token)


def coco_tokenize(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """Tokenize as the COCO-caption evaluation does: pycocoevalcap's PTBTokenizer (Stanford's
    PTB tokenizer, lower-cased, punctuation removed), so BLEU and CIDEr compare with published
    numbers. Needs Java, as METEOR does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    words = {k: [{"caption": (t.replace("\n", " ").strip() or EMPTY)} for t in v] for k, v in texts.items()}
    out = PTBTokenizer().tokenize(words)
    return {k: [t or EMPTY for t in v] for k, v in out.items()}


@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """pycocoevalcap's METEOR: a Java process that takes about 6 s to start and load its
    paraphrase tables, then scores 100 pairs in 0.1 s (measured here). One per Python process,
    shared by every call (it serialises calls with its own lock)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def text_metrics(predictions: dict[str, str], references: dict[str, str | list[str]],
                 meteor_rouge: bool = False) -> dict[str, float]:
    """BLEU_1..BLEU_4 and CIDEr of predictions against references (same ids), both tokenized
    by :func:`coco_tokenize`; with ``meteor_rouge`` also METEOR (pycocoevalcap's Java scorer)
    and ROUGE_L."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    missing = set(predictions) ^ set(references)
    if missing:
        raise ValueError(f"predictions and references differ in {len(missing)} ids, e.g. {sorted(missing)[:3]}")
    if not predictions:
        extra = {"METEOR": math.nan, "ROUGE_L": math.nan} if meteor_rouge else {}
        return {f"BLEU_{k}": math.nan for k in range(1, 5)} | {"CIDEr": math.nan} | extra
    res = coco_tokenize({k: [v] for k, v in predictions.items()})
    gts = coco_tokenize({k: [v] if isinstance(v, str) else list(v) for k, v in references.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {**{f"BLEU_{k}": float(b) for k, b in enumerate(bleu, 1)}, "CIDEr": float(cider)}
    if meteor_rouge:
        from pycocoevalcap.rouge.rouge import Rouge

        out["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    return out


def paired_difference(a: Sequence[bool], b: Sequence[bool], n_bootstrap: int = 1000, ci: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """mean(b) - mean(a) on the same items, with a paired bootstrap confidence interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_bootstrap, len(x)))
    lo, hi = _interval(y[idx].mean(1) - x[idx].mean(1), ci)
    return {"difference": float(y.mean() - x.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": len(x)}


def mean_interval(values: Sequence[float], n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0
                  ) -> tuple[float, float, float]:
    """The mean of ``values`` with its bootstrap confidence interval."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("mean_interval needs at least one value")
    lo, hi = _interval(v[np.random.default_rng(seed).integers(0, len(v), size=(n_bootstrap, len(v)))].mean(1), ci)
    return float(v.mean()), lo, hi


HEADLINE = ("AT", "ADR", "ATR", "RR", "RR_conditional")
TRUTH = ("AT_truth", "RR_truth", "RR_truth_conditional", "accuracy_turn1", "accuracy_final")


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def bootstrap_metrics(records, threshold: int, max_turns: int, n_bootstrap: int, ci: float, seed: int) -> dict[str, float]:
    """Every free-dialogue metric with its bootstrap interval: ``X``, ``X_lo``, ``X_hi``, and
    ``n``. The point value ``X`` is the plain metric on all dialogues (the same function)."""
    if not records:
        raise ValueError("no dialogues to score")
    p = _record_arrays(records, threshold, max_turns)
    n = len(records)
    boots = metric_table(p, np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n)))
    out: dict[str, float] = {"n": n}
    for k, v in _point(p).items():
        lo, hi = _interval(boots[k], ci)
        out.update({k: v, f"{k}_lo": lo, f"{k}_hi": hi})
    return out


def paired_bootstrap(records_a, records_b, threshold: int, max_turns: int, n_bootstrap: int, ci: float,
                     seed: int) -> dict[str, float]:
    """B minus A for every metric, on the same samples: dialogues are matched by sample ``id``
    (both models must have answered exactly the same samples) and each bootstrap resample draws
    the same samples for both, so the interval is the one of the paired difference. Returns
    ``X`` (the plain difference of the plain metrics), ``X_lo``, ``X_hi`` and ``n``."""
    a = {r["id"]: r for r in records_a}
    b = {r["id"]: r for r in records_b}
    if len(a) != len(records_a) or len(b) != len(records_b):
        raise ValueError("paired_bootstrap needs one dialogue per sample id in each set")
    if set(a) != set(b):
        raise ValueError(f"the two models answered different samples: {len(set(a) ^ set(b))} ids differ, "
                         f"e.g. {sorted(set(a) ^ set(b))[:3]}")
    if not a:
        raise ValueError("no dialogues to score")
    ids = sorted(a)
    pa = _record_arrays([a[i] for i in ids], threshold, max_turns)
    pb = _record_arrays([b[i] for i in ids], threshold, max_turns)
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(n_bootstrap, len(ids)))
    ta, tb = metric_table(pa, idx), metric_table(pb, idx)
    point_a, point_b = _point(pa), _point(pb)
    out: dict[str, float] = {"n": len(ids)}
    for k in point_a:
        lo, hi = _interval(tb[k] - ta[k], ci)
        out.update({k: point_b[k] - point_a[k], f"{k}_lo": lo, f"{k}_hi": hi})
    return out


def solved_by_turn(records, threshold: int, max_turns: int) -> dict[str, list[float]]:
    """Share of dialogues satisfied (teacher) and correct (truth, when the records have the
    checker's verdicts) by turn t = 1..max_turns."""
    p = _record_arrays(records, threshold, max_turns)
    out = {"teacher": [float((p["t_star"] <= t).mean()) for t in range(1, max_turns + 1)]}
    if "t_truth" in p:  # real data has no checker's verdicts
        out["truth"] = [float((p["t_truth"] <= t).mean()) for t in range(1, max_turns + 1)]
    return out


def chair(captions: Sequence[str], objects: Sequence[Sequence[str]], n_bootstrap: int = 1000, ci: float = 0.95,
          seed: int = 0) -> dict[str, float]:
    """CHAIR (Rohrbach et al., 2018), as DRESS reports it for captions:

    - CHAIR_i = hallucinated object mentions / all object mentions;
    - CHAIR_s = captions with at least one hallucinated object / all captions.

    A mention is an object category (a shape word, singular or plural) named in a caption, each
    category counted once per caption; it is hallucinated when the category is not among the
    caption's image ``objects``. Captions without any mention count in CHAIR_s's denominator.
    Intervals: bootstrap over captions (CHAIR_i as a ratio of the resampled sums)."""
    if len(captions) != len(objects) or not captions:
        raise ValueError("chair needs one object list per caption, and at least one caption")
    named = [shapes_in(c) for c in captions]
    mentioned = np.array([len(m) for m in named], dtype=float)
    wrong = np.array([len(m - set(objs)) for m, objs in zip(named, objects, strict=True)], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(captions), size=(n_bootstrap, len(captions)))
    ci_i = wrong[idx].sum(1) / np.maximum(mentioned[idx].sum(1), 1)
    ci_s = (wrong[idx] > 0).mean(1)
    out = {"CHAIR_i": float(wrong.sum() / max(mentioned.sum(), 1)), "CHAIR_s": float((wrong > 0).mean()),
           "mentions": int(mentioned.sum()), "hallucinated": int(wrong.sum()), "n": len(captions)}
    for k, v in (("CHAIR_i", ci_i), ("CHAIR_s", ci_s)):
        out[f"{k}_lo"], out[f"{k}_hi"] = _interval(v, ci)
    return out


def score_curve(records: Sequence[dict[str, Any]], turns: int = 4, score_min: int = 1, n_bootstrap: int = 1000,
                ci: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """DRESS's multi-turn interaction curve (its figure 3): the mean provider score after turn
    1..``turns``. A dialogue that stopped earlier (satisfied) keeps its last score for the later
    turns; an unparsable score counts as ``score_min``. Returns ``turn``, ``mean``, ``lo``,
    ``hi`` (bootstrap over dialogues) and ``n``."""
    if not records:
        raise ValueError("no dialogues to score")
    grid = np.empty((len(records), turns))
    for i, r in enumerate(records):
        s = [score_min if t.get("score") is None else t["score"] for t in r["turns"][:turns]]
        if not s:
            raise ValueError(f"dialogue {r.get('id')} has no turns")
        grid[i] = s + [s[-1]] * (turns - len(s))
    idx = np.random.default_rng(seed).integers(0, len(records), size=(n_bootstrap, len(records)))
    boots = grid[idx].mean(1)  # (n_bootstrap, turns)
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    return {"turn": list(range(1, turns + 1)), "mean": grid.mean(0).tolist(), "lo": lo.tolist(), "hi": hi.tolist(),
            "n": len(records)}
