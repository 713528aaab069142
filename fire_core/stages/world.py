"""Stage 00: the world's datasets, their statistics and an example grid."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from fire_core import plots, provenance
from fire_core.config import FireConfig
from fire_core.world import SEEN, features, generate


@dataclass
class BuildResult:
    dir: Path
    dataset_dir: Path
    stats_csv: Path
    grid: list[Path]
    counts: dict[str, int]
    duplicates_replaced: int
    seconds: float


def run(cfg: FireConfig) -> BuildResult:
    """Stage 00: render the world and save it as a Hugging Face DatasetDict with statistics."""
    import datasets


    t0 = time.time()
    datasets.disable_progress_bars()  # our own tqdm bar covers the slow part
    with provenance.stage_run(cfg) as run:
        by_split, replaced = generate(cfg)
        dsd = datasets.DatasetDict()
        for split, rows in by_split.items():
            if not rows:
                continue
            cols = {k: [r[k] for r in rows] for k in features()}
            table = datasets.Dataset.from_dict(cols, features=features()).data
            # a content-derived fingerprint keeps save_to_disk byte-identical across runs
            fp = hashlib.sha256(json.dumps([cfg.seed, split, [r["key"] for r in rows]]).encode()).hexdigest()[:16]
            dsd[split] = datasets.Dataset(table, split=datasets.NamedSplit(split), fingerprint=fp)
        dataset_dir = run.dir / "dataset"
        dsd.save_to_disk(str(dataset_dir), max_shard_size="500MB")
        stats = statistics(by_split)
        stats_csv = run.dir / "world_stats.csv"
        stats.to_csv(stats_csv, index=False, float_format="%.2f")
        grid = example_grid(cfg, by_split, run.dir / "world_examples", sources=[stats_csv, dataset_dir])
        counts = {s: len(r) for s, r in by_split.items()}
        run.extra.update({"counts": counts, "duplicates_replaced": replaced,
                          "render_seconds": round(time.time() - t0, 2)})
    return BuildResult(dir=run.dir, dataset_dir=dataset_dir, stats_csv=stats_csv, grid=grid, counts=counts,
                       duplicates_replaced=replaced, seconds=time.time() - t0)


def statistics(by_split: dict[str, list[dict[str, Any]]]):
    """Samples per family and split, with question, answer and response lengths in words."""
    import pandas as pd

    recs = []
    for split, rows in by_split.items():
        by_fam: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_fam.setdefault(r["family"], []).append(r)
        for fam, rs in by_fam.items():
            q = [len(r["question"].split()) for r in rs]
            a = [len(r["answer"].split()) for r in rs]
            resp = [len(r["response"].split()) for r in rs]
            recs.append({"split": split, "family": fam, "seen": fam in SEEN, "n": len(rs),
                         "unique_answers": len({r["answer"] for r in rs}),
                         "question_words_mean": sum(q) / len(q), "question_words_max": max(q),
                         "answer_words_mean": sum(a) / len(a), "answer_words_max": max(a),
                         "response_words_mean": sum(resp) / len(resp)})
    return pd.DataFrame(recs)


def example_grid(cfg: FireConfig, by_split: dict[str, list[dict[str, Any]]], stem: Path,
                 sources: list[Path]) -> list[Path]:
    """A grid of example images with their question and answer, one row per family."""
    import matplotlib.pyplot as plt


    k = cfg.world.grid_examples
    fams = [(f, "train") for f in cfg.world.seen_families] + [(f, "unseen") for f in cfg.world.unseen_families]
    fig, axes = plt.subplots(len(fams), k, figsize=(2.6 * k, 2.9 * len(fams)), squeeze=False)
    for i, (fam, split) in enumerate(fams):
        rows = [r for r in by_split[split] if r["family"] == fam][:k]
        for j in range(k):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(rows):
                continue
            r = rows[j]
            ax.imshow(Image.open(io.BytesIO(r["image"]["bytes"])), interpolation="nearest")
            q = r["question"].split("\n")[0]
            q = q if len(q) <= 40 else q[:38] + "..."
            ans = r["answer"] if len(r["answer"]) <= 34 else r["answer"][:32] + "..."
            ax.set_title(f"[{fam}] {q}\nA: {ans}", fontsize=6.5, loc="left")
    fig.tight_layout()
    return plots.save(fig, stem, sources=sources, cfg=cfg)
