"""Stage 05: FIRE-1M. The trained student and teacher talk about new train samples through the
dialogue engine (:mod:`fire_core.dialogue`), the simulation filter keeps improving dialogues,
and the FIRE student is trained from the base VLM on FIRE-100K + FIRE-1M::

    result = stage_fire1m.run(config.load("05_simulate_fire1m", ["scale=smoke"]))

A stage sits above the mechanisms it uses (engine, annotation store, SFT), so none of them
imports it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fire_core import (
    annotate,
    dialogue,
    files,
    metrics,
    models,
    provenance,
    records,
    sft,
    world,
)
from fire_core.config import FireConfig
from fire_core.files import ShardStore, request_id
from fire_core.stages import common as stage_common

log = logging.getLogger(__name__)


@dataclass
class Fire1mResult:
    dir: Path
    kept: list[dict[str, Any]]
    dropped: Counter
    stats: Any  # DataFrame: FIRE-100K and FIRE-1M side by side
    engine: dict[str, Any]
    fit: Any
    first_turn: Any


def run(cfg: FireConfig) -> Fire1mResult:
    """Stage 05: the trained student and teacher talk about new train samples (FIRE-1M analog),
    the simulation filter keeps improving dialogues, then the FIRE student is trained from the
    base VLM on FIRE-100K + FIRE-1M."""
    t0 = time.time()
    if cfg.data.source == "hub":
        return _released(cfg, t0)
    world_dir = provenance.require_stage(cfg, "00_build_world")
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    teacher_dir = provenance.require_stage(cfg, "03_train_teacher")
    student_dir = provenance.require_stage(cfg, "04_train_student")
    ds = world.load(cfg)
    d = cfg.dialogue
    # every sample stage 02 asked about, kept or not: FIRE-1M must not reuse them
    used = {r["id"] for r in ShardStore(f100_dir / "raw", cfg.annotator.n_shards).records()}
    train_ds = ds["train"]
    fresh = [i for i, sid in enumerate(train_ds["id"]) if sid not in used]
    sub = train_ds.select(fresh)
    pick = records.select_per_family(sub, cfg.world.seen_families, d.samples_per_family,
                                      provenance.derived_seed(cfg.seed, "fire1m_samples"))
    rows = sub.select(sorted(pick))
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset", f100_dir / "fire100k.jsonl",
                                           teacher_dir / "model", student_dir / "model"]) as stage:
        s_model, s_proc = models.load(student_dir / "model")
        t_model, t_proc = models.load(teacher_dir / "model")
        student, teacher = dialogue.roles_from_config(d, s_model, s_proc, t_model, t_proc, "fire100k_student", "teacher")
        plan = (student.name, teacher.name, d.threshold, d.max_turns, d.student_max_new_tokens,
                d.teacher_max_new_tokens, cfg.seed)
        rid_of = {sid: request_id(sid, "fire1m", *plan) for sid in rows["id"]}
        store = ShardStore(stage.dir / "raw", cfg.annotator.n_shards)
        torn = store.repair()
        done = store.done_ids()
        n_done = sum(rid_of[sid] in done for sid in rows["id"])
        log.info("FIRE-1M: %d samples, %d already simulated, %d to go", len(rows), n_done, len(rows) - n_done)
        res = dialogue.run(records.world_samples(rows, rid_of.__getitem__, with_scene=False), student, teacher, d,
                  cfg.seed, store=store, source="world/fire1m", total=len(rows), done=done, chunk=d.resume_chunk)
        wanted = set(rid_of.values())
        simulated = [r for r in store.all_sorted() if r["request_id"] in wanted]
        kept, dropped = annotate.apply_filter(simulated, dialogue.filter_reason)
        files.write_jsonl(stage.dir / "fire1m.jsonl", kept)
        f100_train, f100_held = stage_common.load_fire100k(cfg)
        f100_all = f100_train + f100_held
        stats = pd.concat([annotate.statistics(f100_all).assign(dataset="FIRE-100K"),
                           annotate.statistics(kept).assign(dataset="FIRE-1M")], ignore_index=True)
        stats = stats[["dataset", *[c for c in stats.columns if c != "dataset"]]]
        stats.to_csv(stage.dir / "fire1m_stats.csv", index=False, float_format="%.2f")
        annotate.score_by_turn(kept).to_csv(stage.dir / "score_by_turn.csv")
        engine = {"samples": len(rows), "generated": len(simulated),
                  "kept": len(kept), "dropped": dict(dropped), "stops": dict(Counter(r["stop"] for r in simulated)),
                  "ratio_to_fire100k": round(len(kept) / max(1, len(f100_all)), 3),
                  "metrics": metrics.dialogue_metrics(simulated, d.threshold, d.max_turns) if simulated else {}}
        provenance.write_json_atomic(stage.dir / "simulation_stats.json", engine)
        # what this particular run did (time, resumed work) is bookkeeping: the manifest keeps it
        engine_run = {"simulated_now": len(simulated) - n_done, "torn_bytes_dropped": torn,
                      "failures": dict(res.failures), "seconds": round(res.timing["total"], 1),
                      "timing": {k: round(v, 1) for k, v in res.timing.items()},
                      "dialogues_per_s": round(res.dialogues_per_s, 2), "tokens_per_s": round(res.tokens_per_s, 1)}
        del s_model, t_model
        student.generator = teacher.generator = None
        # the FIRE student: from the base VLM, on FIRE-100K (its training part) + FIRE-1M
        image_of = records.image_lookup(train_ds)
        examples = sft.student_examples(f100_train + kept, image_of)
        fit, processor = stage_common.fit_from_base(cfg, base_dir, examples, stage, stage.dir / "fire_student", "FIRE student",
                                              sft.student_examples(f100_held, image_of))
        table, diff, _ = stage_common.first_turn_report(cfg, fit.model, processor, stage, base_dir, ds, "fire_student")
        stage.extra.update({"simulation": engine, "simulation_run": engine_run, "fire_student_examples": len(examples),
                          "first_turn_accuracy": table.iloc[0].to_dict(), "first_turn_difference": diff,
                          "stage_seconds": round(time.time() - t0, 1)})
    return Fire1mResult(dir=stage.dir, kept=kept, dropped=dropped, stats=stats, engine={**engine, **engine_run},
                        fit=fit, first_turn=table)



def _released(cfg: FireConfig, t0: float) -> Fire1mResult:
    """``data.source=hub``: the trained student and teacher talk about the released FIRE-1M's
    images and questions (at most ``data.max_records``; the released dialogues themselves are
    not used), judged by the teacher alone; the same filter keeps improving dialogues and the
    FIRE student trains on FIRE-100K + the kept ones. No first-turn accuracy (no checker)."""
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    teacher_dir = provenance.require_stage(cfg, "03_train_teacher")
    student_dir = provenance.require_stage(cfg, "04_train_student")
    d = cfg.dialogue
    src = cfg.data.files()["fire_1m"]
    samples = stage_common.hub_fire(cfg, "fire_1m", "train")
    with provenance.stage_run(cfg, inputs=[src, f100_dir / "fire100k.jsonl", teacher_dir / "model",
                                           student_dir / "model"]) as stage:
        s_model, s_proc = models.load(student_dir / "model")
        t_model, t_proc = models.load(teacher_dir / "model")
        student, teacher = dialogue.roles_from_config(d, s_model, s_proc, t_model, t_proc, "fire100k_student", "teacher")
        plan = (student.name, teacher.name, d.threshold, d.max_turns, d.student_max_new_tokens,
                d.teacher_max_new_tokens, cfg.seed)
        rid_of = {r["id"]: request_id(r["id"], "fire1m", *plan) for r in samples}
        store = ShardStore(stage.dir / "raw", cfg.annotator.n_shards)
        torn = store.repair()
        done = store.done_ids()
        res = dialogue.run(stage_common.hub_samples(samples, rid_of.__getitem__), student, teacher, d, cfg.seed,
                           store=store, source="hub/fire1m", total=len(samples), done=done, chunk=d.resume_chunk)
        wanted = set(rid_of.values())
        simulated = [r for r in store.all_sorted() if r["request_id"] in wanted]
        kept, dropped = annotate.apply_filter(simulated, dialogue.filter_reason)
        files.write_jsonl(stage.dir / "fire1m.jsonl", kept)
        f100_train, f100_held = stage_common.load_fire100k(cfg)
        stats = pd.concat([annotate.statistics(f100_train + f100_held).assign(dataset="FIRE-100K"),
                           annotate.statistics(kept).assign(dataset="FIRE-1M")], ignore_index=True)
        stats = stats[["dataset", *[c for c in stats.columns if c != "dataset"]]]
        stats.to_csv(stage.dir / "fire1m_stats.csv", index=False, float_format="%.2f")
        engine = {"samples": len(samples), "generated": len(simulated), "kept": len(kept), "dropped": dict(dropped),
                  "stops": dict(Counter(r["stop"] for r in simulated)),
                  "ratio_to_fire100k": round(len(kept) / max(1, len(f100_train) + len(f100_held)), 3),
                  "metrics": metrics.dialogue_metrics(simulated, d.threshold, d.max_turns) if simulated else {}}
        provenance.write_json_atomic(stage.dir / "simulation_stats.json", engine)
        engine_run = {"torn_bytes_dropped": torn, "failures": dict(res.failures), "seconds": round(res.timing["total"], 1)}
        del s_model, t_model
        student.generator = teacher.generator = None
        image_of = stage_common.record_images(f100_train + f100_held + kept)
        fit, _ = stage_common.fit_from_base(cfg, base_dir, sft.student_examples(f100_train + kept, image_of), stage,
                                            stage.dir / "fire_student", "FIRE student",
                                            sft.student_examples(f100_held, image_of))
        stage.extra.update({"data": "hub", "simulation": engine, "simulation_run": engine_run,
                            "stage_seconds": round(time.time() - t0, 1)})
    return Fire1mResult(dir=stage.dir, kept=kept, dropped=dropped, stats=stats, engine={**engine, **engine_run},
                        fit=fit, first_turn=None)
