"""DRESS's feedback data (Chen et al., CVPR 2024, appendix G): iterative generation-annotation.

The model answers; an annotator writes, in this order, a **reason** (why the response is good or
bad), a **rating** 1-4, a **critique** (the reason in 5-7 words) and a **refinement** (advice
toward the reference answer that never states it). Then::

    anns = dress.oracle_annotator(seed)                       # or dress.openai_annotator(...)
    trajs, stats = dress.iterate(samples, first, respond, anns, max_turns=4)

The stop rules (:func:`continues`):

- turn 1 rated 3-4 is kept as a one-turn trajectory; rated 1-2, the model answers again,
  conditioned on the question, its earlier responses and the refinement;
- a later turn that does not improve on the one before ends the trajectory, which is **kept**
  (failed trajectories teach what bad interaction looks like); an improved turn rated 2-3
  continues; one rated 4 ends it;
- a trajectory that went past turn 1 and did not reach 4 ends with the **reference answer** as a
  fixed final turn, with the best rating and critique (:func:`reference_turn`);
- at most ``max_turns`` turns, the reference turn included.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fire_core import feedback, prompts
from fire_core.checker import extract_answer
from fire_core.client import Endpoint, Tally, Unusable, chat_many, image_data_url, run_async


@dataclass
class Annotation:
    reason: str
    rating: int  # 1 bad, 2 mediocre, 3 good, 4 excellent
    critique: str  # 5-7 words
    refinement: str  # advice for the next response; never the answer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Stop rules


def continues(ratings: Sequence[int], max_turns: int) -> bool:
    """Does the trajectory get another model turn after these ratings? (Module docstring.)"""
    t = len(ratings)
    if t == 0:
        return True
    if t >= max_turns - 1:  # room is left for the reference turn only
        return False
    if t == 1:
        return ratings[0] <= 2
    return ratings[-1] > ratings[-2] and ratings[-1] in (2, 3)


def stop_reason(ratings: Sequence[int]) -> str:
    if len(ratings) == 1 and ratings[0] >= 3:
        return "good_first_turn"
    if len(ratings) > 1 and ratings[-1] <= ratings[-2]:
        return "no_improvement"
    if ratings[-1] == 4:
        return "excellent"
    return "max_turns"


def reference_turn(sample: dict[str, Any]) -> dict[str, Any]:
    """The reference answer under the best condition, the one inference prompts with."""
    return {"response": sample["response"], "reason": "The reference answer.", "rating": 4,
            "critique": prompts.BEST_CRITIQUE, "refinement": "", "reference": True}


def finish(sample: dict[str, Any], turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the reference as the final turn when the trajectory went past turn 1 without
    reaching the best rating."""
    went_on = len(turns) > 1 or turns[0]["rating"] <= 2
    return [*turns, reference_turn(sample)] if went_on and turns[-1]["rating"] < 4 else turns


# ---------------------------------------------------------------------------------------------
# Annotators: a callable (samples, responses, histories) -> list[Annotation | None]


def oracle_annotation(sample: dict[str, Any], response: str, history: Sequence[str],
                      rng: random.Random) -> Annotation:
    """The oracle reads the scene record (as DRESS's GPT-4 read COCO's dense annotations)."""
    j = feedback.judge(sample, response, list(history), rng)
    if j.correct:
        reason = "The response gives the answer the image supports, and explains it."
    elif not extract_answer(response).strip():
        reason = "The response does not give an answer to the question."
    else:
        reason = "The answer does not match the image. " + j.feedback
    return Annotation(reason=reason, rating=j.rating, critique=j.critique, refinement=j.refinement)


def oracle_annotator(seed: int) -> Callable[..., list[Annotation | None]]:
    def annotate(samples, responses, histories) -> list[Annotation | None]:
        return [oracle_annotation(s, r, h, random.Random(f"{seed}:{s['id']}:{len(h)}"))
                for s, r, h in zip(samples, responses, histories, strict=True)]

    return annotate


ANNOTATOR_SYSTEM = (
    "You rate a model's answer to a question about an image. You are given the question, the reference "
    "answer, a dense description of the image, the model's earlier answers and its new answer. Reply with "
    "one JSON object, in this order: {\"reason\": why the answer is good or bad, \"rating\": 1 (bad), 2 "
    "(mediocre), 3 (good) or 4 (excellent), \"critique\": the reason in 5 to 7 words, \"refinement\": "
    "concrete advice toward the reference answer that never states it}.")


def annotator_messages(sample: dict[str, Any], response: str, history: Sequence[str], image) -> list[dict[str, Any]]:
    earlier = "\n".join(f"Earlier answer {k + 1}: {h}" for k, h in enumerate(history)) or "Earlier answers: none"
    text = (f"Question: {sample['question']}\nReference answer: {sample['answer']}\n"
            f"Image description: {sample.get('annotation', '')}\n{earlier}\nNew answer: {response}")
    return [{"role": "system", "content": ANNOTATOR_SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                         {"type": "text", "text": text}]}]


def parse_annotation(text: str, sample: dict[str, Any]) -> Annotation:
    """The annotator's JSON reply, checked against the schema: four keys of the right types, a
    rating 1-4, a critique of 1-12 words, and a refinement that does not state the answer."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError("the reply is not a JSON object")
    missing = [k for k in ("reason", "rating", "critique", "refinement") if k not in obj]
    if missing:
        raise ValueError(f"missing keys {missing}")
    rating = obj["rating"]
    if isinstance(rating, bool) or not isinstance(rating, int | float) or int(rating) != rating or not 1 <= rating <= 4:
        raise ValueError(f"rating {rating!r} is not an integer 1-4")
    for k in ("reason", "critique", "refinement"):
        if not isinstance(obj[k], str):
            raise ValueError(f"{k} is not a string")
    if not 1 <= len(obj["critique"].split()) <= 12:
        raise ValueError(f"critique has {len(obj['critique'].split())} words (5-7 asked)")
    if feedback.leaks_answer(obj["refinement"], sample["answer"], sample["family"], sample["question"]):
        raise ValueError("the refinement states the answer")
    return Annotation(reason=obj["reason"], rating=int(rating), critique=obj["critique"], refinement=obj["refinement"])


def openai_annotator(endpoint: Endpoint, tally: Tally, temperature: float = 0.0,
                     image_of: Callable[[dict[str, Any]], Any] = lambda s: s["image"]):
    """An annotator on any OpenAI-compatible endpoint, through the client layer (retries, fault
    classes, counts in ``tally``). A request that fails after its retries gives ``None``."""
    endpoint.api_key("dress annotator=openai")  # no key: fail before any work
    create_kw = {"temperature": temperature, "max_tokens": 512, "response_format": {"type": "json_object"}}

    def annotate(samples, responses, histories) -> list[Annotation | None]:
        def check(k: int, text: str) -> Annotation:
            try:
                return parse_annotation(text, samples[k])
            except ValueError as exc:
                raise Unusable("unparsable", text, str(exc)) from exc

        msgs = [annotator_messages(s, r, h, image_of(s)) for s, r, h in zip(samples, responses, histories, strict=True)]
        outs = run_async(chat_many(endpoint, msgs, create_kw, tally, check, who="dress annotator=openai"))
        return [o.value if o.failure is None else None for o in outs]

    return annotate


# ---------------------------------------------------------------------------------------------
# The loop


def iterate(samples: Sequence[dict[str, Any]], first: Sequence[str],
            respond: Callable[[list[dict[str, Any]], list[list[prompts.Turn]]], list[str]],
            annotate: Callable[..., list[Annotation | None]], max_turns: int = 4,
            ) -> tuple[list[list[dict[str, Any]] | None], dict[str, int]]:
    """Trajectories for every sample, turn by turn and batched across samples. ``first`` holds
    the model's turn-1 answers; ``respond(samples, histories)`` answers again (each history's
    turns carry their refinements). A sample whose annotation failed gets ``None``."""
    if max_turns < 2:
        raise ValueError(f"max_turns={max_turns}: DRESS needs at least 2 (one model turn and the reference)")
    turns: list[list[dict[str, Any]]] = [[] for _ in samples]
    failed: set[int] = set()
    active = list(range(len(samples)))
    responses = {i: first[i] for i in active}
    while active:
        anns = annotate([samples[i] for i in active], [responses[i] for i in active],
                        [[t["response"] for t in turns[i]] for i in active])
        nxt = []
        for i, a in zip(active, anns, strict=True):
            if a is None:
                failed.add(i)
                continue
            turns[i].append({"response": responses[i], **a.as_dict()})
            if continues([t["rating"] for t in turns[i]], max_turns):
                nxt.append(i)
        if nxt:
            hist = [[prompts.Turn(t["response"], rating=t["rating"], critique=t["critique"], refinement=t["refinement"])
                     for t in turns[i]] for i in nxt]
            for i, r in zip(nxt, respond([samples[i] for i in nxt], hist), strict=True):
                responses[i] = r
        active = nxt
    out: list[list[dict[str, Any]] | None] = []
    counts = {"samples": len(samples), "failed": len(failed)}
    for i, s in enumerate(samples):
        if i in failed:
            out.append(None)
            continue
        ratings = [t["rating"] for t in turns[i]]
        reason = stop_reason(ratings)
        counts[reason] = counts.get(reason, 0) + 1
        done = finish(s, turns[i])
        for t in done:
            t.setdefault("reference", False)
        done[-1]["stop"] = reason
        out.append(done)
    return out, counts


def statistics(records: Sequence[dict[str, Any]]):
    """Per family and overall: trajectories, mean turns, mean model turns, rating at turn 1,
    share of trajectories with a failed (not improved) turn, share ending in the reference."""
    import pandas as pd

    rows = []
    for r in records:
        model_turns = [t for t in r["turns"] if not t.get("reference")]
        rows.append({"family": r["task"], "turns": len(r["turns"]), "model_turns": len(model_turns),
                     "rating_turn1": model_turns[0]["rating"],
                     "failed_refinement": r.get("stop") == "no_improvement",
                     "reference_final": bool(r["turns"][-1].get("reference"))})
    df = pd.DataFrame(rows, columns=["family", "turns", "model_turns", "rating_turn1", "failed_refinement",
                                     "reference_final"])

    def agg(g):
        return pd.Series({"trajectories": len(g), "avg_turns": g.turns.mean(), "avg_model_turns": g.model_turns.mean(),
                          "avg_rating_turn1": g.rating_turn1.mean(), "failed_refinement": g.failed_refinement.mean(),
                          "reference_final": g.reference_final.mean()})

    per = df.groupby("family").apply(agg, include_groups=False).reset_index() if len(df) else pd.DataFrame()
    return pd.concat([agg(df).to_frame().T.assign(family="all"), per], ignore_index=True)


def rating_by_turn(records: Sequence[dict[str, Any]]):
    """How many model turns (the reference excluded) have each rating, at each turn position."""
    import pandas as pd

    rows = [{"turn": k + 1, "rating": t["rating"]} for r in records for k, t in enumerate(r["turns"])
            if not t.get("reference")]
    df = pd.DataFrame(rows, columns=["turn", "rating"])
    return df.groupby(["turn", "rating"]).size().unstack(fill_value=0).reset_index()
