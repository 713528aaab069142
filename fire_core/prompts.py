"""Chat roles of FIRE and DRESS: who says what, in which order, and where the loss goes.

A conversation is a list of messages ``{"role", "content", "train"}``; ``content`` is a string
or a list of parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``); ``train`` marks
the assistant turns whose tokens carry the loss::

    msgs = prompts.student_messages("How many stars?", [Turn("I see 2. The answer is 2.", 3, "Count again.")])
    msgs = prompts.teacher_messages("How many stars?", "3", turns)
    prompts.parse_teacher("Score: 7\\nFeedback: Look at the left edge.")   # TeacherOutput(7, "Look ...")

- **base** (stage 01): a user asks about the image, the assistant answers; follow-up questions
  about the same image make ordinary multi-turn chats. Never feedback.
- **student** (FIRE): the student answers; each later user turn carries the teacher's feedback;
  the loss is on the student's responses. The student never sees the ground truth.
- **teacher** (FIRE): the teacher sees the question, the ground truth and the student's response,
  and replies ``Score: N`` (1-10) then ``Feedback: ...`` that says what is wrong and how to look
  again without stating the answer; the loss is on the teacher's replies.
- **DRESS** (conditional training): each response is preceded, in the user turn before it, by a
  condition line ``Condition: <rating word> critique`` (the rating 1-4 verbalised as bad,
  mediocre, good, excellent); later user turns start with the refinement of the turn before.
  The loss is on the responses only. At inference the condition is the best one,
  ``Condition: <excellent> Nice response.``
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fire_core.checker import extract_answer

STUDENT_SYSTEM = ("You are a student. Answer the question about the image. If a teacher gives you "
                  "feedback, use it to improve your answer.")
TEACHER_SYSTEM = ("You are a teacher. Reply 'Score: N' (1 to 10), then 'Feedback: ...' on how to improve, "
                  "without stating the correct answer.")
BASE_SYSTEM = "You are a helpful assistant. Answer the question about the image."
DRESS_SYSTEM = ("You are a helpful assistant. Answer the question about the image. The condition line says "
                "how good your answer is to be; later messages give advice to improve it.")
SAME_ANSWER = "Same answer:"  # the verdict line of world teacher replies and of the comparison drills
RATING_WORDS = {1: "bad", 2: "mediocre", 3: "good", 4: "excellent"}  # DRESS's verbalizers of the 1-4 rating
BEST_CRITIQUE = "Nice response."  # DRESS's inference condition: <excellent> plus this critique


# Sentences in the style of the feedback to come (stage 02), so the tokenizer trained in stage 01
# gives their words single tokens. Byte-level BPE encodes any other text too, only longer.
FEEDBACK_HINTS = [
    "Score: 1\nFeedback: Your answer is incorrect. Look again at the image more carefully.",
    "Score: 10\nFeedback: Correct. Your answer is right and well explained.",
    "Score: 5\nFeedback: Close, but not quite. Check the value of the bar against the grid lines.",
    "Score: 3\nFeedback: You missed some of the shapes. Count each object again, one by one.",
    "Score: 4\nFeedback: Check the color of the object again. Look at the shape on the left side.",
    "Score: 2\nFeedback: Read the text again letter by letter. The first digit is wrong.",
    "Score: 6\nFeedback: Almost there. Compare the positions of the two objects again.",
    "Score: 7\nFeedback: Nearly right, but recheck the row and the column of the table.",
    "Critique: the answer is wrong. Rating: bad mediocre good excellent",
    "Refinement: focus on the top right region and recompute the result.",
]


@dataclass
class Turn:
    """One student response and the teacher's reply to it (DRESS adds critique and refinement)."""

    response: str
    score: int | None = None
    feedback: str | None = None
    rating: int | None = None  # DRESS: 1-4
    verdict: bool | None = None  # the teacher's "Same answer: yes|no" line before its score (world data)
    critique: str | None = None  # DRESS: 5-7 words on this response
    refinement: str | None = None  # DRESS: advice for the next response


@dataclass
class TeacherOutput:
    score: int | None  # None when no score on the scale could be read: "failed to follow"
    feedback: str
    parsable: bool
    verdict: bool | None = None  # what a "Same answer: yes|no" line said; None without one


def _user_image(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}], "train": False}


def _msg(role: str, text: str, train: bool = False) -> dict[str, Any]:
    return {"role": role, "content": text, "train": train}


def base_messages(qa: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """A plain (multi-turn) QA chat about one image: [(question, answer), (follow-up, answer)...]."""
    msgs = [_msg("system", BASE_SYSTEM)]
    for k, (q, a) in enumerate(qa):
        msgs.append(_user_image(q) if k == 0 else _msg("user", q))
        msgs.append(_msg("assistant", a, train=True))
    return msgs


def feedback_text(turn: Turn) -> str:
    """What the student is told after a turn (the teacher's feedback without the score line)."""
    return f"Feedback: {turn.feedback or ''}".strip()


def student_messages(question: str, turns: list[Turn], train: bool = True) -> list[dict[str, Any]]:
    """The student's view. With n turns it holds n responses; the feedback after the last one is
    omitted (nothing follows it). To prompt turn n+1, pass n turns and append
    ``student_followup(turns[-1])`` yourself, or use :func:`student_prompt`."""
    msgs = [_msg("system", STUDENT_SYSTEM), _user_image(question)]
    for k, t in enumerate(turns):
        if k > 0:
            msgs.append(_msg("user", feedback_text(turns[k - 1])))
        msgs.append(_msg("assistant", t.response, train=train))
    return msgs


def student_prompt(question: str, history: list[Turn]) -> list[dict[str, Any]]:
    """Messages that ask the student for its next response, given earlier turns with feedback."""
    msgs = student_messages(question, history, train=False)
    if history:
        msgs.append(_msg("user", feedback_text(history[-1])))
    return msgs


def condition_text(rating: int, critique: str | None) -> str:
    """DRESS's condition for one response: its rating word, then its critique (none when the
    critique is ablated)."""
    if rating not in RATING_WORDS:
        raise ValueError(f"DRESS rating {rating!r} is not one of 1-4")
    return f"Condition: <{RATING_WORDS[rating]}>" + (f" {critique}" if critique else "")


BEST_CONDITION = condition_text(4, BEST_CRITIQUE)


def dress_messages(question: str, turns: list[Turn], critique: bool = True, train: bool = True) -> list[dict[str, Any]]:
    """DRESS conditional training chat: response k follows the refinement of response k-1 and
    response k's own condition; the loss is on the responses."""
    msgs = [_msg("system", DRESS_SYSTEM)]
    for k, t in enumerate(turns):
        cond = condition_text(t.rating, t.critique if critique else None)
        if k == 0:
            msgs.append(_user_image(f"{question}\n{cond}"))
        else:
            msgs.append(_msg("user", f"{turns[k - 1].refinement or ''}\n{cond}".lstrip()))
        msgs.append(_msg("assistant", t.response, train=train))
    return msgs


def dress_prompt(question: str, history: list[Turn], refinement: str | None = None,
                 condition: str | None = BEST_CONDITION) -> list[dict[str, Any]]:
    """Messages asking for the next response: earlier responses (each under the best condition,
    as they were asked), then the latest refinement and the condition. ``condition=None`` gives
    a plain multi-turn chat for models never trained with conditions (the base VLM)."""
    def user(text: str) -> str:
        return f"{text}\n{condition}".strip() if condition else text

    msgs = [_msg("system", DRESS_SYSTEM if condition else BASE_SYSTEM), _user_image(user(question))]
    for k, t in enumerate(history):
        msgs.append(_msg("assistant", t.response))
        nxt = refinement if k == len(history) - 1 and refinement is not None else t.refinement
        msgs.append(_msg("user", user(nxt or "")))
    return msgs


def dress_student_prompt(question: str, history: list[Turn]) -> list[dict[str, Any]]:
    """A DRESS model's prompt inside a feedback dialogue (the engine's student role): each
    provider's feedback is the refinement of the turn it follows; every turn under the best
    condition."""
    return dress_prompt(question, [Turn(t.response, refinement=t.feedback) for t in history])


def verdict_line(same: bool) -> str:
    """``Same answer: yes|no``: the last line of every answer-comparison drill and the first of
    every world teacher reply."""
    return f"{SAME_ANSWER} {'yes' if same else 'no'}"


def record_turns(turns: list[dict[str, Any]]) -> list[Turn]:
    """Turns of a dialogue record (``response``, ``score``, ``feedback``, and on world data the
    checker's ``correct``, which becomes the teacher's verdict)."""
    return [Turn(t["response"], t["score"], t["feedback"], verdict=t.get("correct")) for t in turns]


def teacher_reply(turn: Turn) -> str:
    """``Score: N`` then ``Feedback: ...``; on world data (where a turn's ``verdict``, the answer
    checker's, is known) first the line ``Same answer: yes|no``, the comparison the score rests
    on, in the words of stage 01's answer-comparison drills. Measured at default, the line by
    itself did not make the tiny teacher judge better (it came with the longer judgement warm-up
    of stage 03 that did). Real FIRE data has no verdict, so its replies keep FIRE's format."""
    head = "" if turn.verdict is None else verdict_line(turn.verdict) + "\n"
    return f"{head}Score: {turn.score}\nFeedback: {turn.feedback or ''}".rstrip()


def _teacher_first(question: str, answer: str, response: str) -> str:
    return f"Question: {question}\n{teacher_judgement_text(answer, response)}"


def teacher_judgement_text(answer: str, response: str) -> str:
    """What the teacher reads about one student turn: the response, its final answer and the
    correct answer (the last lines of every teacher prompt)."""
    # The student's final answer (its own words after 'The answer is', or its last sentence)
    # is quoted next to the correct answer, right before the reply: the comparison the score
    # rests on is then between neighbouring lines. The tiny default teacher did not learn to
    # find and compare them across the dialogue (it scored by turn position instead).

    return f"Student response: {response}\nStudent answer: {extract_answer(response)}\nCorrect answer: {answer}"


def teacher_messages(question: str, answer: str, turns: list[Turn], train: bool = True) -> list[dict[str, Any]]:
    """The teacher's view: each user turn is a student response, each assistant turn a reply."""
    msgs = [_msg("system", TEACHER_SYSTEM)]
    for k, t in enumerate(turns):
        if k == 0:
            msgs.append(_user_image(_teacher_first(question, answer, t.response)))
        else:
            msgs.append(_msg("user", teacher_judgement_text(answer, t.response)))
        msgs.append(_msg("assistant", teacher_reply(t), train=train))
    return msgs


def teacher_prompt(question: str, answer: str, history: list[Turn], response: str) -> list[dict[str, Any]]:
    """Messages that ask the teacher to judge ``response``, given earlier judged turns."""
    msgs = teacher_messages(question, answer, history, train=False)
    if history:
        msgs.append(_msg("user", teacher_judgement_text(answer, response)))
    else:
        msgs.append(_user_image(_teacher_first(question, answer, response)))
    return msgs


_SCORE_RE = re.compile(r"score\s*[:=\-]?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10|out of 10)?", re.IGNORECASE)
_FEEDBACK_RE = re.compile(r"feedback\s*[:=\-]\s*(.*)", re.IGNORECASE | re.DOTALL)
_VERDICT_RE = re.compile(r"same answer\s*:\s*(yes|no)\b", re.IGNORECASE)


def parse_teacher(text: str, score_min: int = 1, score_max: int = 10) -> TeacherOutput:
    """Read ``Score: N`` and ``Feedback: ...`` from a teacher's reply. Tolerates case, spacing,
    '7/10', '7.0'; a missing or off-scale score gives ``parsable=False`` (never raises)."""
    if not isinstance(text, str):
        return TeacherOutput(None, "", False)
    v = _VERDICT_RE.search(text)
    verdict = None if v is None else v.group(1).lower() == "yes"
    m = _SCORE_RE.search(text)
    score: int | None = None
    if m:
        value = float(m.group(1))
        if value.is_integer() and score_min <= value <= score_max:
            score = int(value)
    fb = _FEEDBACK_RE.search(text)
    if fb:
        feedback = fb.group(1).strip()
    else:  # no Feedback: label: whatever follows the score line
        rest = text[m.end():] if m else text
        feedback = rest.strip(" \n:-")
    return TeacherOutput(score, feedback, score is not None, verdict)


# How the annotator prompt marks the task JSON; fire_core.serve reads it back.
TASK_OPEN, TASK_CLOSE = "<<<TASK_JSON", "TASK_JSON>>>"
