"""The answer checker: is a free-text response right for a world sample? Every stage judges with it."""

from __future__ import annotations

import math
import re
from collections import Counter

from fire_core.world import (
    CHART_LABELS,
    COLORS,
    DIRECTIONS,
    FAMILIES,
    NUMBER_WORDS,
    OCR_WORDS,
    PLURAL,
    QUADRANTS,
    SHAPES,
)

ANSWER_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)


_NUM_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


_SYNONYMS = [(r"\bcolour", "color"), (r"\bgrey\b", "gray"), (r"\bupper\b", "top"), (r"\blower\b", "bottom"),
             (r"\btop-left\b", "top left"), (r"\btop-right\b", "top right"),
             (r"\bbottom-left\b", "bottom left"), (r"\bbottom-right\b", "bottom right")]


def extract_answer(text: str) -> str:
    """The final answer inside a long response: the text after the last 'answer is'/'answer:',
    up to the end of that sentence; otherwise the last sentence."""
    text = text.strip()
    matches = list(ANSWER_RE.finditer(text))
    if matches:
        span = matches[-1].group(1)
        # an answer ends at a sentence break; keep decimals such as 3.5
        span = re.split(r"(?<!\d)\.(?!\d)|\n|(?<=\d)\.(?=\s|$)", span, maxsplit=1)[0]
        return span.strip(" \"'*")
    sentences = [s for s in re.split(r"(?<!\d)[.!?](?!\d)|\n", text) if s.strip()]
    return sentences[-1].strip() if sentences else ""


def normalize(text: str) -> str:
    """Lower case, British spellings and synonyms unified, punctuation and articles dropped."""
    t = text.lower()
    for pat, rep in _SYNONYMS:
        t = re.sub(pat, rep, t)
    t = re.sub(r"[^a-z0-9.\- ]+", " ", t)
    t = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", t)
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def numbers_in(text: str) -> list[float]:
    t = text.lower()
    out: list[tuple[int, float]] = [(m.start(), float(m.group().replace(",", ""))) for m in _NUM_RE.finditer(t)]
    for k, w in enumerate(NUMBER_WORDS):
        out += [(m.start(), float(k)) for m in re.finditer(rf"\b{w}\b", t)]
    return [v for _, v in sorted(out)]


def _singular(t: str) -> str:
    for s in SHAPES:
        t = re.sub(rf"\b{PLURAL[s]}\b", s, t)
    return t


def objects_in(text: str) -> Counter:
    """(colour, shape) mentions in a caption, e.g. 'two red circles' counts twice."""
    t = _singular(normalize(text))
    found: Counter = Counter()
    pat = r"(?:\b(" + "|".join(NUMBER_WORDS[1:6]) + r"|\d)\s+)?\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")\b"
    for m in re.finditer(pat, t):
        n = m.group(1)
        k = 1 if n is None else (int(n) if n.isdigit() else NUMBER_WORDS.index(n))
        found[(m.group(2), m.group(3))] += k
    return found


def shapes_in(text: str) -> set[str]:
    """The object categories (shape words, singular or plural) a caption mentions: CHAIR's
    mentions, one per category per caption."""
    t = _singular(normalize(text))
    return {s for s in SHAPES if re.search(rf"\b{s}\b", t)}


def answer_vocab(family: str) -> list[str]:
    if family in ("color",):
        return list(COLORS)
    if family in ("spatial",):
        return SHAPES + DIRECTIONS
    if family in ("size", "odd_color"):
        return list(SHAPES)
    if family in ("chart", "chart_diff"):
        return list(CHART_LABELS)
    if family == "quadrant":
        return list(QUADRANTS)
    if family == "ocr":
        return list(OCR_WORDS)
    return []


def is_correct(family: str, prediction: str, answer: str) -> bool:
    """Does a (possibly long) prediction give the ground-truth answer?

    - numbers: the last number in the final answer span equals the answer ('five', '5.0', '1,000');
    - multiple choice: the option letter ('B', '(b)', 'Option B', 'B. red');
    - captions: the same multiset of (colour, shape) objects, in any order;
    - words: the normalised span equals the answer, or the answer is the only word of the
      family's vocabulary in it (so a hedge such as 'red or blue' is wrong).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    if not isinstance(prediction, str) or not prediction.strip():
        return False
    if family == "caption":
        return objects_in(prediction) == objects_in(answer) and bool(objects_in(answer))
    span = extract_answer(prediction)
    if family == "choice":
        # without an 'answer is' marker the letter usually leads ('B. red'), so read it all
        span = span if ANSWER_RE.search(prediction) else prediction.strip()
        m = re.search(r"(?:^|[\s(\[])([A-D])(?:$|[\s).:,\]])", " " + span + " ") or \
            re.search(r"(?:option|letter|choice)\s*\(?([a-d])\b", span, re.IGNORECASE) or \
            re.fullmatch(r"\s*\(?([a-d])\)?\.?\s*", span)
        return bool(m) and m.group(1).upper() == answer.strip().upper()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", answer.strip()):
        nums = numbers_in(span)
        return bool(nums) and math.isclose(nums[-1], float(answer), abs_tol=1e-9)
    pred, gold = _singular(normalize(span)), _singular(normalize(answer))
    if pred == gold:
        return True
    vocab = answer_vocab(family)
    found = {w for w in vocab if re.search(rf"\b{re.escape(w)}\b", pred)}
    # 'top left' also contains 'left': keep only the longest phrases
    found = {w for w in found if not any(w != v and w in v for v in found)}
    return found == {gold}
