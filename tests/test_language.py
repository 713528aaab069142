"""fire_core.language: the text-only pretraining corpus (balance, format) and real training."""

from __future__ import annotations

import json
import random

import torch

from fire_core import checker, config, language, models, prompts, world
from fire_core.checker import extract_answer

SIZE = 64


def _rows(n_per_family: int = 6, split: str = "train") -> list[dict]:
    out = []
    for f in world.SEEN:
        for i in range(n_per_family):
            s = world.make_sample(f, split, i, 0, SIZE)
            out.append({"question": s.question, "response": s.response, "answer": s.answer, "family": s.family,
                        "scene": json.dumps(s.scene)})
    return out


def test_drills_are_balanced_and_labelled_by_the_answer_checker():
    rows = _rows()
    drills = language.drills(rows, 600, random.Random(0))
    share_same = sum(truth for _, truth in drills) / len(drills)
    assert 0.45 <= share_same <= 0.55, share_same
    for text, truth in drills:
        student = text.split("\n")[0].removeprefix("Student answer: ")
        gold = text.split("\n")[1].removeprefix("Correct answer: ")
        fam = next(r["family"] for r in rows if r["answer"] == gold)
        assert text.endswith(f"{language.SAME} {'yes' if truth else 'no'}")
        assert checker.is_correct(fam, student, gold) == truth, text


def test_drills_use_the_lines_of_the_teacher_prompt():
    """The comparison the teacher's score rests on is written the same way in its prompt."""
    msgs = prompts.teacher_prompt("How many?", "4", [], "I count four stars. The answer is 4.")
    text = msgs[-1]["content"][-1]["text"]
    assert f"Student answer: {extract_answer('I count four stars. The answer is 4.')}\nCorrect answer: 4" in text
    drill, _ = language.drill(_rows(1)[0], True, random.Random(0))
    assert drill.startswith("Student answer: ") and "\nCorrect answer: " in drill


def test_judgement_chats_end_in_the_teachers_reply_head_balanced_and_checked():
    """The teacher's warm-up chats: the last lines of its prompt, then the verdict line and the
    score its SFT replies start with; half right, half wrong; the verdict is the checker's."""
    rows = _rows()
    chats = language.judgement_chats(rows, 200, random.Random(0))
    assert 0.45 <= sum(truth for _, truth in chats) / len(chats) <= 0.55
    for text, truth in chats:
        user, reply = text.split("<|assistant|>\n")
        assert "Student answer: " in user and "\nCorrect answer: " in user
        head = reply.removesuffix("<|end|>\n").splitlines()
        assert head[0] == f"Same answer: {'yes' if truth else 'no'}"
        score = prompts.parse_teacher(reply).score
        assert score is not None and (score >= 8) == truth  # the oracle's score agrees with its verdict
        gold = user.split("Correct answer: ")[1].split("<|end|>")[0]
        response = user.split("Student response: ")[1].split("\nStudent answer: ")[0]
        fam = next(r["family"] for r in rows if r["answer"] == gold)
        assert checker.is_correct(fam, response, gold) == truth


def test_corpus_mixes_world_text_drills_and_numbers():
    docs = language.corpus(_rows(), 200, random.Random(0))
    assert sum(d.startswith("Question: ") for d in docs) == 9 * 6
    assert sum(language.SAME in d for d in docs) == 200
    assert sum(d.startswith("Which is larger") for d in docs) == 50
    assert docs != language.corpus(_rows(), 200, random.Random(1))  # shuffled by the seed


def test_language_pretraining_lowers_the_loss_on_held_out_text():
    cfg = config.load("01_train_base_vlm", ["scale=smoke"])
    rows, val = _rows(), _rows(2, "val")
    tok = models.train_tokenizer([f"{r['question']}\n{r['response']}" for r in rows] + prompts.FEEDBACK_HINTS, 600)
    proc = models.build_processor(tok, cfg.model, SIZE)
    torch.manual_seed(0)
    model = models.build_model(cfg.model, proc)
    held = language.encode(language.corpus(val, 40, random.Random(2)), tok, 128)

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(model(**language.pad_batch(held, tok.pad_token_id)).loss)

    before = heldout_loss()
    res = language.pretrain(model, tok, language.corpus(rows, 400, random.Random(0)), 60, 16, 3e-3, 0,
                            heldout=language.drills(val, 40, random.Random(3)))
    assert heldout_loss() < before - 1.0, (before, heldout_loss())
    assert 0 <= res.drill_accuracy_before <= 1 and 0 <= res.drill_accuracy_after <= 1
    assert len(res.losses) == 60
    # the vision tower is not touched by text-only training
    assert all(p.grad is None for n, p in model.named_parameters() if "vision_tower" in n)
