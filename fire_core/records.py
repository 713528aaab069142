"""Records and their sources: world rows to sample records, dialogue records, held-out splits, FIRE-100K shards."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fire_core.files import jsonl_lines


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


NLF_CRITIQUE_KEYS = ("critique NLF", "critique_NLF", "critique_nlf", "critique")  # spellings accepted


def load_lvlm_nlf(path: Path | str, image_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """DRESS's released feedback data (hub ``YangyiYY/LVLM_NLF``: JSONL, one trajectory per line
    with ``image_id`` (COCO train2017), ``caption`` and ``interaction``, a list of
    ``{user, model, rating, critique NLF}``) as dialogue records. Turn i's refinement is the
    ``user`` text of turn i+1; turn 1's ``user`` is the question. The caption is the dense
    annotation the annotator read; the reference answer is the last turn's response. Images are
    named ``<image_dir>/<image_id as 12 digits>.jpg``, as in COCO. A bad line fails with its
    number and what is wrong; nothing is downloaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LVLM_NLF file not found: {path}")
    out = []
    for n, row in jsonl_lines(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {n}: expected a JSON object")
        missing = [k for k in ("image_id", "interaction") if k not in row]
        if missing or not isinstance(row.get("interaction"), list) or not row["interaction"]:
            raise ValueError(f"{path}: line {n}: needs 'image_id' and a non-empty 'interaction' list "
                             f"(missing: {missing or 'interaction is empty'})")
        turns = []
        inter = row["interaction"]
        for k, t in enumerate(inter):
            if not isinstance(t, dict):
                raise ValueError(f"{path}: line {n}: turn {k + 1} is not an object")
            crit = next((t[c] for c in NLF_CRITIQUE_KEYS if c in t), None)
            if "user" not in t or "model" not in t or "rating" not in t or crit is None:
                raise ValueError(f"{path}: line {n}: turn {k + 1} needs 'user', 'model', 'rating' and a critique "
                                 f"(one of {NLF_CRITIQUE_KEYS}); it has {sorted(t)}")
            try:
                rating = int(t["rating"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: line {n}: turn {k + 1} rating {t['rating']!r} is not a number 1-4") from None
            if not 1 <= rating <= 4:
                raise ValueError(f"{path}: line {n}: turn {k + 1} rating {rating} is outside 1-4")
            turns.append({"response": str(t["model"]), "rating": rating, "critique": str(crit),
                          "refinement": str(inter[k + 1]["user"]) if k + 1 < len(inter) else ""})
        image_id = str(row["image_id"])
        name = f"{int(image_id):012d}.jpg" if image_id.isdigit() else image_id
        out.append({"id": f"nlf-{n}", "request_id": f"nlf-{n}", "image": str(Path(image_dir) / name) if image_dir else name,
                    "question": str(inter[0]["user"]), "answer": turns[-1]["response"], "task": "lvlm_nlf",
                    "split": "train", "source": "LVLM_NLF", "turns": turns,
                    "meta": {"image_id": image_id, "caption": row.get("caption", "")}})
    return out
