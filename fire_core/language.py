"""Text-only language pretraining of the tiny decoder: the stand-in for the LLM LLaVA starts from.

A real LLaVA's decoder was pretrained on text, so reading a question, writing an answer and
telling whether two answers are the same are skills it brings. Ours starts from random
weights. Stage 01 therefore first trains the decoder on the world's language alone (no image
tokens, so a step costs a fraction of an image-text step)::

    docs = language.corpus(train_rows, n_drills=20000, rng=random.Random(0))
    result = language.pretrain(model, tokenizer, docs, steps=1500, batch_size=64, lr=2e-3, seed=0,
                               heldout=language.drills(val_rows, 400, random.Random(1)))
    result.drill_accuracy     # held-out "same answer: yes/no" accuracy, before and after

The corpus has three kinds of documents:

- the world's text: questions with their reference responses, dense captions, and the
  feedback phrases of stage 02 (what the later stages will read and write);
- answer-comparison drills, balanced between same and different: ``Student answer: X`` /
  ``Correct answer: Y`` / ``Same answer: yes|no``, where X is the answer in another form
  ("5", "five", "The answer is 5") or a near miss (``feedback.wrong_answer``) and "same" is
  decided by the world's answer checker. These are the comparisons a teacher's score rests on;
- number comparisons: ``Which is larger, 7 or 12? 12.``

The loss is on every token (plain language modelling). Each document is its own sequence,
starting at position 0, and batches are drawn at random. Measured at the default size (held-out
drill accuracy, chance 50%): random batches of 64 documents, 1,000 steps: 83%; documents packed
end to end into 128-token blocks, 2,000 steps: 56%; batches grouped by length (less padding),
1,500 steps: 56%. Nothing here sees an image or a feedback dialogue, so the base VLM still "has
never been trained on feedback".
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fire_core import checker, feedback, models, prompts, world

SAME, YES, NO = prompts.SAME_ANSWER, "yes", "no"


def _variants(family: str, answer: str, rng: random.Random) -> str:
    """The same answer in another surface form."""
    if answer.isdigit() and int(answer) < len(world.NUMBER_WORDS) and rng.random() < 0.3:
        answer = world.NUMBER_WORDS[int(answer)]
    style = rng.random()
    if style < 0.3:
        return f"The answer is {answer}."
    if style < 0.45 and family != "choice":
        return answer.capitalize()
    return answer


def drill(row: dict[str, Any], same: bool, rng: random.Random) -> tuple[str, bool]:
    """One answer-comparison drill about a world sample; returns the text and the truth (by the
    answer checker, which may disagree with ``same`` when a near miss happens to be right)."""
    gold = row["answer"]
    shown = _variants(row["family"], gold, rng) if same else feedback.wrong_answer(
        {"family": row["family"], "answer": gold}, rng, near=None)
    truth = checker.is_correct(row["family"], shown, gold)
    shown_short = checker.extract_answer(shown) if "answer is" in shown else shown
    return f"Student answer: {shown_short}\nCorrect answer: {gold}\n{prompts.verdict_line(truth)}", truth


def drills(rows: Sequence[dict[str, Any]], n: int, rng: random.Random) -> list[tuple[str, bool]]:
    """``n`` drills, half meant the same and half different, about randomly chosen rows."""
    return [drill(rows[rng.randrange(len(rows))], k % 2 == 0, rng) for k in range(n)]


def judgement_chat(row: dict[str, Any], right: bool, rng: random.Random) -> tuple[str, bool]:
    """A short teacher chat in the chat template (without the <s> that :func:`encode` adds): the
    last lines of a teacher prompt (a response in the reference style with the right answer or a
    near miss, its final answer, the correct answer) and the oracle's reply head,
    ``Same answer: yes|no`` then ``Score: N``. Returns the text and the checker's verdict."""

    gold = row["answer"]
    given = gold if right else feedback.wrong_answer(row, rng)
    response = feedback.respond(row, given)
    score, correct = feedback.score_of(row["family"], response, gold)
    text, _ = models.render_chat([{"role": "user", "content": prompts.teacher_judgement_text(gold, response)},
                                  {"role": "assistant", "content": f"{prompts.verdict_line(correct)}\nScore: {score}"}])
    return text[len(models.BOS):], correct


def judgement_chats(rows: Sequence[dict[str, Any]], n: int, rng: random.Random) -> list[tuple[str, bool]]:
    """``n`` judgement chats on random rows, right and wrong answers alternating (balanced), each
    with its verdict (:func:`drill_accuracy` measures them as it measures the drills)."""
    return [judgement_chat(rows[rng.randrange(len(rows))], k % 2 == 0, rng) for k in range(n)]


def number_drill(rng: random.Random) -> str:
    a, b = rng.sample(range(0, 100), 2)
    return f"Which is larger, {a} or {b}? {max(a, b)}."


def corpus(rows: Sequence[dict[str, Any]], n_drills: int, rng: random.Random) -> list[str]:
    """The pretraining documents (shuffled): world text, answer drills, number drills. ``rows``
    are world rows without their images (``ds.remove_columns("image")``)."""
    docs = [f"Question: {r['question']}\nAnswer: {r['response']}" for r in rows]
    docs += [world.dense_caption(json.loads(r["scene"])) for r in rows[: len(rows) // 4]]
    docs += list(prompts.FEEDBACK_HINTS)
    docs += [text for text, _ in drills(rows, n_drills, rng)]
    docs += [number_drill(rng) for _ in range(n_drills // 4)]
    rng.shuffle(docs)
    return docs


def encode(docs: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [([bos] + tokenizer(d, add_special_tokens=False)["input_ids"] + [eos])[:max_length] for d in docs]


def pad_batch(seqs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def drill_accuracy(model, tokenizer, tests: Sequence[tuple[str, bool]]) -> float:
    """Share of held-out drills where the model puts more probability on the right word after
    ``Same answer:`` than on the other one."""
    yes = tokenizer(" " + YES, add_special_tokens=False)["input_ids"][0]
    no = tokenizer(" " + NO, add_special_tokens=False)["input_ids"][0]
    was = model.training
    model.eval()
    right = 0
    try:
        for start in range(0, len(tests), 64):
            part = tests[start:start + 64]
            prefixes = [t[: t.rindex(SAME) + len(SAME)] for t, _ in part]
            seqs = encode(prefixes, tokenizer, 10_000)
            seqs = [s[:-1] for s in seqs]  # no end token after the prefix
            n = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, s in enumerate(seqs):  # left padding: the last position is the prefix's end
                ids[k, n - len(s):] = torch.tensor(s)
                mask[k, n - len(s):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            said_yes = logits[:, yes] > logits[:, no]
            right += sum(bool(y) == truth for y, (_, truth) in zip(said_yes.tolist(), part, strict=True))
    finally:
        model.train(was)
    return right / max(1, len(tests))


@dataclass
class LanguageResult:
    losses: list[float]
    drill_accuracy_before: float | None  # None without held-out drills
    drill_accuracy_after: float | None
    documents: int
    tokens: int
    seconds: float


def pretrain(model, tokenizer, docs: Sequence[str], steps: int, batch_size: int, lr: float, seed: int,
             heldout: Sequence[tuple[str, bool]] | None = None, max_length: int = 128) -> LanguageResult:
    """Language-model the decoder on ``docs`` for ``steps`` steps of ``batch_size`` documents
    (AdamW, warmup then cosine), epoch after epoch in a seeded random order. With ``heldout``
    drills, their accuracy is measured before and after."""
    from tqdm.auto import tqdm

    seqs = encode(docs, tokenizer, max_length)
    before = drill_accuracy(model, tokenizer, heldout) if heldout else None
    params = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    opt, sched = models.warmup_cosine_adamw(params, lr, steps)
    order = list(range(len(seqs)))
    rng = random.Random(seed)
    rng.shuffle(order)
    lengths = [len(s) for s in seqs]
    model.train()
    losses = []
    t0 = time.time()
    pos = 0
    for _ in tqdm(range(steps), desc="language pretraining", unit="step"):
        if pos + batch_size > len(order):  # a new epoch, in a new order
            rng.shuffle(order)
            pos = 0
        batch = pad_batch([seqs[i] for i in order[pos:pos + batch_size]], tokenizer.pad_token_id)
        pos += batch_size
        losses.append(models.optimizer_step(model(**batch).loss, params, opt, sched))
    after = drill_accuracy(model, tokenizer, heldout) if heldout else None
    return LanguageResult(losses=losses, drill_accuracy_before=before, drill_accuracy_after=after,
                          documents=len(seqs), tokens=sum(lengths), seconds=time.time() - t0)
