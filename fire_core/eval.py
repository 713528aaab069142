"""Evaluation: answer accuracy with the world's checker (later: FIRE-Bench metrics).

    rows = eval.qa_predictions(model, processor, records, max_new_tokens=64)
    table = eval.accuracy_table(rows)        # per split and family, with counts

``records`` are world rows (``question``, ``answer``, ``family``, ``split``, ``image``);
each prediction is judged by ``fire_core.world.is_correct``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from fire_core import models, prompts, world


def qa_predictions(model, processor, records: Sequence[dict[str, Any]], max_new_tokens: int = 64,
                   batch_size: int = 32, desc: str = "answering") -> list[dict[str, Any]]:
    """Greedy single-turn answers for world records, judged by the answer checker."""
    out: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        chunk = records[start:start + batch_size]
        convs = [prompts.base_messages([(r["question"], "")])[:-1] for r in chunk]
        preds = models.generate(model, processor, convs, [r["image"] for r in chunk],
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
        for r, p in zip(chunk, preds, strict=True):
            out.append({"id": r["id"], "split": r["split"], "family": r["family"], "question": r["question"],
                        "answer": r["answer"], "prediction": p,
                        "correct": world.is_correct(r["family"], p, r["answer"])})
    return out


def accuracy_table(rows: Sequence[dict[str, Any]]):
    """Accuracy per split and family, plus an 'all' row per split."""
    import pandas as pd

    df = pd.DataFrame(rows)
    per = df.groupby(["split", "family"]).agg(n=("correct", "size"), accuracy=("correct", "mean")).reset_index()
    total = df.groupby("split").agg(n=("correct", "size"), accuracy=("correct", "mean")).reset_index()
    total["family"] = "all"
    return pd.concat([per, total[per.columns]], ignore_index=True)
