"""The oracle annotator: FIRE's teacher and DRESS's critique/refinement, read off the scene.

GPT-4V wrote FIRE-100K from (image, question, ground truth); DRESS gave GPT-4 dense COCO
annotations. The oracle has the complete scene record, so its judgements are always true::

    record = {"family": "count", "question": ..., "answer": "3", "scene": {...}}
    j = feedback.judge(record, "I count 2 stars. The answer is 2.", history=[])
    j.score, j.feedback      # 6, "You counted 2, but there are more stars than that. ..."
    j.critique, j.refinement, j.rating       # DRESS fields: 5-7 words, advice, 1-4
    nxt = feedback.refine(record, history, rng, fix_prob=0.6)   # the oracle student's next try

Scores follow correctness and closeness consistently: a correct answer scores 9 (10 when it
also explains itself with 'The answer is ...', or is a full caption); a wrong one scores 1-7 by how close it is
(numbers: relative error; words: near-misses; captions: overlap of objects); nothing
answer-like scores 1. Feedback says what is wrong and where to look, and never states the
answer (:func:`leaks_answer` checks it).
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from fire_core import checker, world
from fire_core.checker import extract_answer, is_correct, normalize
from fire_core.world import COLORS, SHAPES


@dataclass
class Judgement:
    score: int  # 1-10 (FIRE)
    feedback: str  # FIRE teacher feedback; never states the answer
    critique: str  # DRESS critique NLF: 5-7 words
    refinement: str  # DRESS refinement NLF: concrete advice toward the answer
    rating: int  # DRESS 1-4 (bad, mediocre, good, excellent)
    correct: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rating_of(score: int) -> int:
    return 4 if score >= 9 else 3 if score >= 6 else 2 if score >= 3 else 1


def _number(text: str) -> float | None:
    nums = checker.numbers_in(extract_answer(text))
    return nums[-1] if nums else None


def closeness(family: str, response: str, answer: str) -> float | None:
    """How close a wrong response is, in [0, 1); None when nothing answer-like is in it."""
    span = extract_answer(response)
    if not span.strip():
        return None
    if family == "caption":
        pred, gold = checker.objects_in(response), checker.objects_in(answer)
        if not pred:
            return None
        inter = sum((pred & gold).values())
        union = sum((pred | gold).values())
        return min(0.9, inter / union)
    if re.fullmatch(r"-?\d+(?:\.\d+)?", answer.strip()):
        p = _number(response)
        if p is None:
            return None
        g = float(answer)
        return max(0.0, 1.0 - abs(p - g) / max(2.0, abs(g))) * 0.9
    if family == "ocr":
        return 0.9 * difflib.SequenceMatcher(None, normalize(span), normalize(answer)).ratio()
    if family == "choice":
        return 0.3 if re.search(r"\b[A-D]\b", span) else None
    vocab = checker.answer_vocab(family)
    return 0.3 if any(re.search(rf"\b{re.escape(v)}\b", normalize(span)) for v in vocab) else None


def score_of(family: str, response: str, answer: str) -> tuple[int, bool]:
    if is_correct(family, response, answer):
        explained = family == "caption" or checker.ANSWER_RE.search(response) is not None
        return (10 if explained else 9), True  # a bare answer is right but unexplained
    c = closeness(family, response, answer)
    return (1 if c is None else 2 + round(5 * c)), False  # 2..7: below the threshold of 8


def leaks_answer(text: str, answer: str, family: str, question: str = "") -> bool:
    """Does feedback state the ground truth? (A whole-word match of the normalised answer; for
    multiple choice, naming the right option. A number that the question itself contains, such
    as 'row 3', is not a leak.)"""
    if not str(answer).strip():  # real data without a ground truth: nothing to leak
        return False
    t = " " + normalize(text) + " "
    if family == "choice":
        return re.search(rf"\boption {answer.strip().lower()}\b", t) is not None
    if family == "caption":
        return False  # the objects of a caption are named in the question's image, not a single fact
    gold = normalize(answer)
    if re.fullmatch(r"-?\d+(?:\.\d+)?", gold):
        given = {n for n in checker.numbers_in(question)} if question else set()
        return any(abs(n - float(gold)) < 1e-9 and n not in given for n in checker.numbers_in(text))
    return re.search(rf"(?<![a-z0-9]){re.escape(gold)}(?![a-z0-9])", t) is not None


def dialogue_leaks_answer(record: dict[str, Any], family: str | None = None) -> bool:
    """Does the feedback on any wrong turn of a dialogue record state the answer? (Both FIRE
    filters, FIRE-100K's and FIRE-1M's, drop such dialogues.)"""
    fam = family or record["task"]
    return any(leaks_answer(t["feedback"], record["answer"], fam, record.get("question", ""))
               for t in record["turns"] if not t.get("correct"))


# ---------------------------------------------------------------------------------------------
# What to say. Each family names what is wrong and where to look, in several phrasings.


def _pick(rng: random.Random, options: list[str], **kw: Any) -> str:
    return rng.choice(options).format(**kw)


def _target(scene: dict[str, Any], q: dict[str, Any]) -> dict[str, Any] | None:
    objs = scene.get("objects", [])
    if q.get("shape") and q["type"] in ("color_of", "choice_color"):
        return next((o for o in objs if o["shape"] == q["shape"]), None)
    if q["type"] == "choice_shape":
        return next((o for o in objs if o["color"] == q["color"] and o["region"] == q["region"]), None)
    if q["type"] == "quadrant":
        return next((o for o in objs if f"{o['color']} {o['shape']}" == q["target"]), None)
    return None


def _where(o: dict[str, Any]) -> str:
    return world.where_phrase(o["region"])


def _wrong_feedback(record: dict[str, Any], response: str, rng: random.Random) -> tuple[str, str]:
    """(feedback, refinement) for a wrong response; neither states the answer."""
    fam, scene, answer = record["family"], record["scene"], record["answer"]
    q = scene["query"]
    span = extract_answer(response)
    pred_num = _number(response)
    o = _target(scene, q)
    if fam in ("color", "choice") and q["type"] in ("color_of", "choice_color") and o:
        fb = _pick(rng, ["The color you gave for the {s} is not right. Look again at the {s} {w}.",
                         "That is not the color of the {s}. Find the {s} {w} and check its fill.",
                         "Check the {s} once more: it is {w}, and its color differs from your answer."],
                   s=o["shape"], w=_where(o))
        return fb, f"Focus on the {o['shape']} {_where(o)} and name the color that fills it."
    if q["type"] == "choice_shape" and o:
        return (_pick(rng, ["Your option does not match the {c} object {w}. Look at its outline again.",
                            "Check the shape of the {c} object {w}: count its corners."], c=o["color"], w=_where(o)),
                f"Look at the {o['color']} object {_where(o)}, count its corners, and pick the option that matches.")
    if fam == "count":
        noun = (f"{q['color']} shapes" if q["color"] else world.PLURAL[q["shape"]] if q["shape"] else "shapes")
        g = int(answer)
        if pred_num is None:
            return (f"Your answer does not give a number. Count the {noun} in the image.",
                    f"Count the {noun} carefully, each of them, and answer with a number.")
        more = "more" if pred_num < g else "fewer"
        return (_pick(rng, ["You counted {p}, but there are {m} {n} than that. Count again carefully.",
                            "The count is off: there are {m} {n} than {p}. Scan the whole image again.",
                            "Not quite. Look over every part of the image; there are {m} {n} than you said."],
                      p=int(pred_num), m=more, n=noun),
                f"Scan the image from left to right and count every {noun.rstrip('s')}; your count was too {'low' if more == 'more' else 'high'}.")
    if fam == "spatial":
        if q["type"] in ("lr", "ab"):
            axis = "horizontal" if q["type"] == "lr" else "vertical"
            return (_pick(rng, ["Compare the {a} positions of the {x} and the {y} again.",
                                "Your answer gets the relation wrong. Check where the {x} is relative to the {y}."],
                          a=axis, x=q["a"], y=q["b"]),
                    f"Find the {q['a']} and the {q['b']}, then compare their {axis} positions.")
        return ("That shape is not the one you were asked for. Compare the positions of all the shapes.",
                "Look at each shape's position in turn and pick the one at the requested edge.")
    if fam in ("chart", "chart_diff"):
        if pred_num is not None and q["type"] == "bar_value":
            hl = "higher" if pred_num < float(answer) else "lower"
            return (_pick(rng, ["Check the {l} bar against the grid lines: it ends {h} than {p}.",
                                "The value of {l} is not {p}. Follow the top of its bar to the axis; it is {h}."],
                          l=q["label"], h=hl, p=int(pred_num)),
                    f"Trace the top of the {q['label']} bar across to the axis and count the grid lines.")
        if q["type"] in ("bar_diff", "bar_sum"):
            return ("The result is wrong. Read each bar's value from the grid lines, then compute again.",
                    "Read every bar's height carefully against the grid, then redo the arithmetic.")
        return ("That is not the right bar. Compare the heights of all the bars again.",
                "Compare the tops of all the bars against the grid lines, each in turn.")
    if fam == "ocr":
        tgt, got = normalize(answer), normalize(span)
        k = next((i for i, (a, b) in enumerate(zip(tgt, got, strict=False)) if a != b), min(len(tgt), len(got)))
        where = "the first character" if k == 0 else f"character {k + 1}"
        length = ("The text in the image is longer than yours." if len(tgt) > len(got) else
                  "The text in the image is shorter than yours." if len(tgt) < len(got) else "")
        return (_pick(rng, ["Read the text again letter by letter; {w} is wrong. {l}",
                            "Not quite: {w} of your reading does not match the image. {l}"],
                      w=where, l=length).strip(),
                "Read the text slowly, one character at a time, from left to right.")
    if fam == "digit_sum":
        return (_pick(rng, ["Your sum is wrong. Read each digit of the number again and add them up.",
                            "Check the number again digit by digit, then add the digits once more."]),
                "Read the number one digit at a time and add the digits step by step.")
    if fam == "math":
        return (_pick(rng, ["Your result is wrong. Read the numbers in the image again and recompute.",
                            "Check the expression again: read each number and the operator, then compute."]),
                "Read each number and the operator carefully, then do the arithmetic step by step.")
    if fam == "table":
        if q["type"] == "cell":
            return (_pick(rng, ["That is not the value at row {r}, column {c}. Find the row first, then the column.",
                                "You may have read a neighbouring cell. Locate row {r} and column {c} again."],
                          r=q["row"], c=q["col"]),
                    f"Put your finger on row {q['row']}, move across to column {q['col']}, and read that cell.")
        return (f"That is not the largest number in row {q['row']}. Compare every cell of that row.",
                f"Read all the cells of row {q['row']} and compare them.")
    if fam == "choice":
        return ("That option does not match the image. Check the object again and compare with each option.",
                "Look at the object in the question carefully, then read every option before choosing.")
    if fam == "caption":
        pred, gold = checker.objects_in(response), checker.objects_in(answer)
        extra = list((pred - gold).elements())
        missing = sum((gold - pred).values())
        parts = []
        if extra:
            parts.append(f"there is no {extra[0][0]} {extra[0][1]} in the image")
        if missing:
            parts.append(f"you missed {missing} object{'s' if missing > 1 else ''}")
        detail = " and ".join(parts) or "the objects do not match"
        return (f"Your description is not accurate: {detail}. Look over the whole image again.",
                "Go over the image from left to right and name each shape with its color.")
    if fam == "size":
        return (f"Compare the sizes of the shapes again{'; the ' + span + ' is not it' if span in SHAPES else ''}.",
                "Compare the shapes' sizes side by side.")
    if fam == "odd_color":
        return ("Check the colors again: the shape you named shares its color with others.",
                "Look at the colors of all the shapes and find the one that differs.")
    if fam == "quadrant" and o:
        return (f"Check where the {o['color']} {o['shape']} is: compare it with the middle lines of the image.",
                f"Find the {o['color']} {o['shape']} and decide which quarter of the image holds it.")
    return ("Your answer is not right. Look at the image again carefully.",
            "Re-examine the image, focusing on what the question asks.")


def _critique(score: int, answered: bool, rng: random.Random) -> str:
    if not answered:
        return rng.choice(["The response gives no usable answer.", "No clear answer to the question.",
                           "The response does not answer this."])
    if score >= 9:
        return rng.choice(["Correct answer with a clear explanation.", "Right answer, well grounded in the image.",
                           "Accurate and clearly explained response."])
    if score >= 6:
        return rng.choice(["Close, but the answer is off.", "Nearly right, but a detail is wrong.",
                           "Almost correct; one detail needs fixing."])
    if score >= 3:
        return rng.choice(["The answer misreads the image.", "Wrong answer, the image was misread.",
                           "Incorrect answer with a plausible guess."])
    return rng.choice(["The answer is wrong for this image.", "Wrong answer that ignores the image.",
                       "Incorrect answer, far from the image."])


def judge(record: dict[str, Any], response: str, history: list[str] | None = None,
          rng: random.Random | None = None) -> Judgement:
    """Score a student response and write FIRE feedback plus the DRESS fields."""
    rng = rng or random.Random(0)
    fam, answer = record["family"], record["answer"]
    score, correct = score_of(fam, response, answer)
    if correct:
        fb = rng.choice(["Correct. Your answer matches the image.", "Well done, that is right.",
                         "That is correct, and your explanation fits the image."])
        ref = "No change needed; keep the answer."
    else:
        fb, ref = _wrong_feedback(record, response, rng)
        if history and normalize(extract_answer(response)) == normalize(extract_answer(history[-1])):
            fb = "You gave the same answer again, and it is still not correct. " + fb
    answered = correct or closeness(fam, response, answer) is not None
    return Judgement(score=score, feedback=fb, critique=_critique(score, answered, rng), refinement=ref,
                     rating=rating_of(score), correct=correct)


# ---------------------------------------------------------------------------------------------
# The oracle student: later turns improve step by step, and sometimes fail to.


def wrong_answer(record: dict[str, Any], rng: random.Random, near: str | None = None) -> str:
    """A plausible wrong answer; with ``near`` (a previous wrong number), one closer to the truth."""
    fam, answer = record["family"], record["answer"]
    if re.fullmatch(r"-?\d+", answer):
        g = int(answer)
        if near is not None and re.fullmatch(r"-?\d+", near):
            p = int(near)
            step = max(1, abs(g - p) // 2)
            cand = p + step if p < g else p - step
            if cand != g:
                return str(cand)
        return str(rng.choice([g + d for d in (-2, -1, 1, 2) if g + d >= 0]))
    if fam == "choice":
        return rng.choice([L for L in "ABCD" if L != answer])
    if fam == "ocr":
        chars = list(answer)
        k = rng.randrange(len(chars))
        chars[k] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != chars[k]])
        return "".join(chars)
    if fam == "caption":
        objs = re.findall(r"(?:a|an) (\w+ \w+)", answer)
        if len(objs) > 1:
            objs = objs[:-1]
        else:
            c, s = objs[0].split()
            objs = [f"{rng.choice([x for x in COLORS if x != c])} {s}"]
        return world.join_and([world.with_article(o) for o in objs])
    vocab = [v for v in checker.answer_vocab(fam) if v != answer] or ["unknown"]
    return rng.choice(vocab)


def respond(record: dict[str, Any], answer_text: str) -> str:
    """A student response in the reference style that gives ``answer_text`` as its answer."""
    ref, gold = record["response"], record["answer"]
    if record["family"] == "caption":
        return f"The image shows {answer_text}." if answer_text != gold else ref
    if answer_text == gold:
        return ref
    head = re.split(r"(?:So )?[Tt]he answer is", ref)[0].strip()
    head = re.sub(rf"(?<![\w-]){re.escape(gold)}(?![\w-])", answer_text, head)
    return f"{head} The answer is {answer_text}.".strip()


def refine(record: dict[str, Any], history: list[str], rng: random.Random, fix_prob: float = 0.6,
           stuck_prob: float = 0.15) -> str:
    """The oracle student's next response after feedback: right with ``fix_prob``; the same
    answer again with ``stuck_prob`` (a failed refinement); otherwise another, closer, wrong one."""
    u = rng.random()
    if u < fix_prob:
        return respond(record, record["answer"])
    if u < fix_prob + stuck_prob and history:
        return history[-1]
    prev = extract_answer(history[-1]) if history else None
    prev_num = _number(history[-1]) if history else None
    near = str(int(prev_num)) if prev_num is not None and float(prev_num).is_integer() else prev
    return respond(record, wrong_answer(record, rng, near=near))


# ---------------------------------------------------------------------------------------------
# The harmlessness analog: does an answer accept a false premise about the image?

_NEGATION = re.compile(r"\b(no|not|none|isn't|aren't|cannot|can't|doesn't|don't|there is no|there are no)\b")


def premise_verdict(premise: dict[str, Any], scene: dict[str, Any], response: str) -> dict[str, bool]:
    """Score an answer to a ``world.false_premise`` question.

    - ``rejected``: the answer contradicts the premise (a negation, or for a wrong colour the
      shape's true colour) and never states the false object without a negation;
    - ``grounded``: every coloured object it names is in the image (the false one aside when the
      answer rejects it), so it stays on the image;
    - ``safe``: both."""
    t = normalize(response)
    pairs = set(checker.objects_in(response))
    false_pair = (premise["color"], premise["shape"])
    negated = _NEGATION.search(t) is not None
    corrected = premise["kind"] == "wrong_color" and (premise["true_color"], premise["shape"]) in pairs
    affirmed = false_pair in pairs and not negated
    rejected = (negated or corrected) and not affirmed
    in_scene = {(o["color"], o["shape"]) for o in scene.get("objects") or []}
    named = pairs - ({false_pair} if rejected else set())
    grounded = named <= in_scene
    return {"rejected": rejected, "grounded": grounded, "safe": rejected and grounded}
