"""fire_core.feedback: the oracle's scores follow correctness and closeness, its feedback never
states the answer, and the oracle student improves step by step."""

from __future__ import annotations

import random

import pytest

from fire_core import annotate, feedback, world


def _rec(family, i, seed=0):
    s = world.make_sample(family, "train", i, seed, 96)
    return {"id": s.id, "family": family, "question": s.question, "answer": s.answer, "response": s.response,
            "scene": s.scene, "annotation": s.annotation}


@pytest.mark.parametrize("family", sorted(world.FAMILIES))
def test_scores_feedback_and_dress_fields(family):
    rng = random.Random(1)
    for i in range(30):
        rec = _rec(family, i)
        right = feedback.judge(rec, rec["response"], rng=rng)
        assert right.correct and right.score == 10 and right.rating == 4
        wrong_text = feedback.respond(rec, feedback.wrong_answer(rec, rng))
        wrong = feedback.judge(rec, wrong_text, rng=rng)
        assert not wrong.correct and 1 <= wrong.score <= 7, (wrong_text, rec["answer"])
        assert wrong.rating == feedback.rating_of(wrong.score)
        for text in (wrong.feedback, wrong.refinement):
            assert not feedback.leaks_answer(text, rec["answer"], family, rec["question"]), (text, rec["answer"])
        silent = feedback.judge(rec, "I cannot tell from the image.", rng=rng)  # no answer at all
        for text in (silent.feedback, silent.refinement):  # (a count of 1 once leaked as "one by one")
            assert not feedback.leaks_answer(text, rec["answer"], family, rec["question"]), (text, rec["answer"])
        again = feedback.judge(rec, wrong_text, history=[wrong_text], rng=rng)  # the "same answer" phrasing
        assert not feedback.leaks_answer(again.feedback, rec["answer"], family, rec["question"]), again.feedback
        for j in (right, wrong):
            assert 5 <= len(j.critique.split()) <= 7, j.critique
            assert j.feedback and j.refinement


def test_closer_answers_score_higher():
    rec = {"family": "count", "answer": "6", "question": "How many shapes?", "scene": {"query": {"type": "count", "color": None, "shape": None}}}
    scores = [feedback.judge(rec, f"The answer is {n}.").score for n in (6, 5, 3, 0)]
    assert scores[0] == 10 and scores[1] > scores[2] > scores[3]
    assert feedback.judge(rec, "I cannot tell.").score == 1  # nothing answer-like


def test_leak_detector():
    assert feedback.leaks_answer("The answer is 5.", "5", "count")
    assert feedback.leaks_answer("It is RED, look again", "red", "color")
    assert not feedback.leaks_answer("There are more stars than that.", "5", "count")
    assert not feedback.leaks_answer("Look at the reddish area.", "red", "color")
    assert feedback.leaks_answer("Pick option B.", "B", "choice")
    assert not feedback.leaks_answer("Option A is not right.", "B", "choice")
    # a number the question itself gives is not a leak; one it does not give is
    assert not feedback.leaks_answer("Locate row 3 and column C again.", "3", "table", "What is in row 3, column C?")
    assert feedback.leaks_answer("The cell holds 3.", "3", "table", "What is in row 1, column C?")


def test_repeating_a_wrong_answer_is_called_out():
    rec = _rec("color", 2)
    wrong = feedback.respond(rec, feedback.wrong_answer(rec, random.Random(0)))
    j = feedback.judge(rec, wrong, history=[wrong])
    assert j.feedback.startswith("You gave the same answer again")


def test_numbers_get_closer_step_by_step():
    rec = _rec("math", 3)
    g = int(rec["answer"])
    near = feedback.wrong_answer(rec, random.Random(0), near=str(g + 8))
    assert abs(int(near) - g) < 8


@pytest.mark.parametrize("family", ["count", "chart", "ocr", "caption", "quadrant"])
def test_oracle_dialogues_stop_at_the_threshold_or_the_limit(family):
    lengths = []
    for i in range(20):
        rec = _rec(family, i)
        first = feedback.respond(rec, feedback.wrong_answer(rec, random.Random(i)))
        turns = annotate.oracle_dialogue(rec, first, threshold=8, max_turns=5, seed=0)
        scores = [t["score"] for t in turns]
        assert all(s < 8 for s in scores[:-1])
        assert scores[-1] >= 8 or len(turns) == 5
        assert turns[0]["response"] == first
        lengths.append(len(turns))
        assert turns == annotate.oracle_dialogue(rec, first, threshold=8, max_turns=5, seed=0)  # deterministic
    assert max(lengths) > 2, "refinement sometimes takes more than one try"
