"""Stage 04: the student."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import config, dialogue, files, metrics, models, provenance, records, world
from fire_core.config import FireConfig
from fire_core.records import image_lookup, select_per_family
from fire_core.sft import FitResult, student_examples
from fire_core.stages import common as stage_common
from fire_core.stages.common import first_turn_report, fit_from_base, load_base, load_fire100k


@dataclass
class StudentResult:
    dir: Path
    model_dir: Path
    first_turn: Any  # DataFrame: family, n, base, student
    first_turn_difference: dict[str, float]
    refinement: Any  # DataFrame: model, AT, ADR, ATR, RR, ... (engine with the trained teacher)
    fit: FitResult



def run(cfg: FireConfig) -> StudentResult:
    """Stage 04: the FIRE100K student, trained on FIRE-100K's student turns; first-turn accuracy
    against the base VLM, and a first look at refinement with the trained teacher."""
    import pandas as pd


    if cfg.data.source == "hub":
        return _released(cfg)
    world_dir = provenance.require_stage(cfg, "00_build_world")
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    teacher_dir = provenance.require_stage(cfg, "03_train_teacher")
    ds = world.load(cfg)
    train_recs, held = load_fire100k(cfg)
    image_of = image_lookup(ds["train"])
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset", base_dir / "model", f100_dir / "fire100k.jsonl",
                                           teacher_dir / "model"]) as run:
        model_dir = run.dir / "model"
        result, processor = fit_from_base(cfg, base_dir, student_examples(train_recs, image_of), run, model_dir,
                                           "FIRE100K student", student_examples(held, image_of))
        table, diff, rows = first_turn_report(cfg, result.model, processor, run, base_dir, ds, "fire100k_student")
        # a first look at refinement: base and student, each with the trained teacher

        teacher, t_proc = models.load(teacher_dir / "model")
        base, b_proc = load_base(cfg, base_dir)
        look = sorted(select_per_family(ds["val"], cfg.world.seen_families, cfg.dialogue.refine_per_family,
                                       provenance.derived_seed(cfg.seed, "refinement_look")))
        look_rows = ds["val"].select(look)
        refined, dialogs, look_seconds = [], [], {}
        for name, m, p in (("base", base, b_proc), ("fire100k_student", result.model, processor)):
            s_role, t_role = dialogue.roles_from_config(cfg.dialogue, m, p, teacher, t_proc, student_name=name)
            rid = lambda i, name=name: files.request_id(i, "refine-look", name)  # noqa: E731
            res = dialogue.run(records.world_samples(look_rows, rid), s_role, t_role, cfg.dialogue, cfg.seed,
                               total=len(look_rows))
            refined.append({"model": name, **metrics.dialogue_metrics(res.records, cfg.dialogue.threshold,
                                                                       cfg.dialogue.max_turns)})
            look_seconds[name] = round(res.timing["total"], 1)
            dialogs += res.records
        refinement = pd.DataFrame(refined)
        refinement.to_csv(run.dir / "refinement_first_look.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "refinement_dialogues.jsonl", dialogs)
        run.extra.update({"train_dialogues": len(train_recs), "first_turn_accuracy": table.iloc[0].to_dict(),
                          "first_turn_difference": diff, "refinement_first_look_seconds": look_seconds,
                          "refinement_first_look": refinement.set_index("model")[["AT", "ADR", "ATR", "RR"]].to_dict("index")})
    return StudentResult(dir=run.dir, model_dir=model_dir, first_turn=table, first_turn_difference=diff,
                         refinement=refinement, fit=result)


def _released(cfg: FireConfig) -> StudentResult:
    """``data.source=hub``: the FIRE100K student trained on the released FIRE-100K's student
    turns; its held-out loss is measured. The first-turn accuracy and the first refinement look
    run on world samples with the answer checker, so they do not run here (stage 06 evaluates
    the students on FIRE-test with the teacher)."""
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    provenance.require_stage(cfg, "03_train_teacher")
    train_recs, held = load_fire100k(cfg)
    image_of = stage_common.record_images(train_recs + held)
    with provenance.stage_run(cfg, inputs=[base_dir / "model", f100_dir / "fire100k.jsonl"]) as run:
        model_dir = run.dir / "model"
        result, _ = fit_from_base(cfg, base_dir, student_examples(train_recs, image_of), run, model_dir,
                                  "FIRE100K student", student_examples(held, image_of))
        run.extra.update({"data": "hub", "train_dialogues": len(train_recs), "heldout_dialogues": len(held),
                          "not_run": "first-turn accuracy and refinement look (world samples, answer checker)"})
    return StudentResult(dir=run.dir, model_dir=model_dir, first_turn=None, first_turn_difference={},
                         refinement=None, fit=result)


if __name__ == "__main__":  # FIRE_LAUNCH=train deepspeed --num_gpus N --module fire_core.stages.student scale=paper ...
    import sys

    run(config.load("04_train_student", sys.argv[1:]))
