"""Records and their sources: world rows to sample records, dialogue records, held-out splits, FIRE-100K shards."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image


def select_per_family(ds, families: Sequence[str], n: int, seed: int) -> list[int]:
    """Up to n row indices per family (all if n == 0), in a seeded order."""
    import random

    rng = random.Random(seed)
    by_fam: dict[str, list[int]] = {}
    for i, f in enumerate(ds["family"]):
        by_fam.setdefault(f, []).append(i)
    picked: list[int] = []
    for f in families:
        idx = by_fam.get(f, [])
        picked += idx if n == 0 else rng.sample(idx, min(n, len(idx)))
    rng.shuffle(picked)
    return picked


def is_heldout(dialogue_id: str, fraction: float) -> bool:
    """A fixed, seed-free split of FIRE-100K by id, the same in stages 03, 04 and 05."""
    return int(hashlib.sha256(f"heldout:{dialogue_id}".encode()).hexdigest(), 16) % 10_000 < fraction * 10_000



def image_lookup(split_ds) -> Callable[[str], Image.Image]:
    index = {i: k for k, i in enumerate(split_ds["id"])}

    def image_of(sample_id: str) -> Image.Image:
        if sample_id not in index:
            raise KeyError(f"image '{sample_id}' is not in the world's {split_ds.split} split; rebuild stage 00")
        return split_ds[index[sample_id]]["image"].convert("RGB")

    return image_of


def sample_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "split": row["split"], "family": row["family"], "question": row["question"],
            "answer": row["answer"], "response": row["response"], "scene": json.loads(row["scene"]),
            "annotation": row["annotation"]}



def world_samples(rows, rid_of: Callable[[str], str], with_scene: bool = True) -> Iterator[dict[str, Any]]:
    """Engine samples from world rows (decoded lazily, one at a time)."""
    for r in rows:
        s = {"id": r["id"], "request_id": rid_of(r["id"]), "question": r["question"], "answer": r["answer"],
             "family": r["family"], "split": r["split"], "image": r["image"].convert("RGB"),
             "response": r["response"], "annotation": r["annotation"]}
        if with_scene:
            s["scene"] = json.loads(r["scene"])
        yield s


def dialogue_record(sample: dict[str, Any], turns: list[dict[str, Any]], rid: str, source: str,
                    stop: str | None = None, **meta: Any) -> dict[str, Any]:
    """The one shape of a dialogue record, for FIRE-100K, FIRE-1M, the gold and judgement
    dialogues and FIRE-Bench alike. ``sample`` is a world row or a sample record (``family`` and
    ``split``); ``image`` names the image by split and id; ``meta`` says who wrote it."""
    split = sample.get("split", "train")
    rec = {"id": sample["id"], "request_id": rid, "image": f"world/{split}/{sample['id']}",
           "question": sample["question"], "answer": sample["answer"], "task": sample["family"], "split": split,
           "source": source, "turns": turns, "meta": meta}
    if stop is not None:
        rec["stop"] = stop
    return rec
