"""Stage 03: the teacher (feedback model)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import annotate, config, files, language, provenance, records, world
from fire_core import eval as evaluate
from fire_core.config import FireConfig
from fire_core.records import image_lookup, is_heldout, select_per_family
from fire_core.sft import FitResult, teacher_examples
from fire_core.stages import common as stage_common
from fire_core.stages.common import fit_from_base, gold_dialogues, load_base, load_fire100k

log = logging.getLogger(__name__)


def judgement_warmup(cfg, ds, model, processor, run) -> None:
    """Short text-only judgement chats (``language.judgement_chats``) before the teacher's SFT.

    The base VLM forgets the answer comparison that language pretraining taught it: its held-out
    drill accuracy is 80% after language pretraining and 38-50% (chance) in every seen family
    after the image-text training (measured at default). Relearning it inside the teacher's 250-token
    multimodal dialogues failed (teacher at 57-72% agreement); in short two-line chats it comes
    back (held-out verdicts 49% -> 88% in 1,000 steps of ``train.language_pretrain_batch`` chats
    at the text phase's learning rate, ``train.language_pretrain_lr``), and each reply of the teacher's
    SFT then starts with the same ``Same answer: yes|no`` line (``prompts.teacher_reply``).
    Train rows only, and none whose FIRE-100K dialogue is held out for the teacher's evaluation;
    the accuracy on val-sample chats is measured before and after."""
    import random


    steps = cfg.train.judgement_warmup_steps
    if steps <= 0 or cfg.model.kind != "tiny":  # scaffolding for a decoder trained from scratch, in our template
        return
    rows = [r for r in ds["train"].remove_columns("image").to_list()
            if not is_heldout(r["id"], cfg.dialogue.heldout_fraction)]  # never a held-out dialogue's sample
    bs = cfg.train.language_pretrain_batch
    chats = language.judgement_chats(rows, steps * bs // 2, random.Random(provenance.derived_seed(cfg.seed, "judgement_chats")))
    val = ds["val"].remove_columns("image").to_list()
    heldout = language.judgement_chats(val, 400, random.Random(provenance.derived_seed(cfg.seed, "judgement_heldout")))
    res = language.pretrain(model, processor.tokenizer, [t for t, _ in chats], steps, bs, cfg.train.language_pretrain_lr,
                            cfg.seed, heldout=heldout)
    log.info("judgement warm-up: %d steps in %.0f s, loss %.3f -> %.3f, held-out verdicts %.3f -> %.3f", steps,
             res.seconds, res.losses[0], res.losses[-1], res.drill_accuracy_before, res.drill_accuracy_after)
    run.extra["judgement_warmup"] = {"steps": steps, "documents": res.documents, "seconds": round(res.seconds, 1),
                                     "first_loss": res.losses[0], "last_loss": res.losses[-1],
                                     "heldout_verdict_accuracy_before": res.drill_accuracy_before,
                                     "heldout_verdict_accuracy_after": res.drill_accuracy_after}


def judgement_records(cfg, train_ds, train_recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``train.judgement_per_sample`` balanced judgement dialogues (annotate.judgement_dialogues)
    per sample of the teacher's FIRE-100K training records (never a held-out one), starting
    from the base VLM's own wrong answers to it where FIRE-100K has them."""

    if cfg.train.judgement_per_sample <= 0:
        return []
    index = {i: k for k, i in enumerate(train_ds["id"])}
    ids = sorted({r["id"] for r in train_recs})
    rows = train_ds.remove_columns("image").select([index[i] for i in ids])
    firsts = {r["id"]: [t["response"] for t in r["turns"]] for r in train_recs}
    return annotate.judgement_dialogues([records.sample_record(r) for r in rows], cfg.train.judgement_per_sample,
                                        cfg.dialogue.max_turns, cfg.seed, first_responses=firsts)


@dataclass
class TeacherResult:
    dir: Path
    model_dir: Path
    summary: Any  # DataFrame: group (seen / unseen / family), n, score_mae, unparsable_share, ...
    turns: list[dict[str, Any]]
    fit: FitResult


def run(cfg: FireConfig) -> TeacherResult:
    """Stage 03: the feedback model, trained on FIRE-100K's teacher turns, then evaluated turn by
    turn on held-out FIRE-100K dialogues (seen families) and oracle dialogues on the unseen
    families (never trained on)."""
    import pandas as pd


    if cfg.data.source == "hub":
        return _released(cfg)
    world_dir = provenance.require_stage(cfg, "00_build_world")
    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    ds = world.load(cfg)
    train_recs, held = load_fire100k(cfg, solved_first=True)
    image_of = image_lookup(ds["train"])
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset", base_dir / "model", f100_dir / "fire100k.jsonl",
                                           f100_dir / "raw"]) as run:
        model_dir = run.dir / "model"
        drills = judgement_records(cfg, ds["train"], train_recs)
        if drills:
            run.extra["judgement_dialogues"] = {
                "dialogues": len(drills),
                "trained_turn_right_share": round(sum(r["turns"][-1]["correct"] for r in drills) / len(drills), 4)}
        result, processor = fit_from_base(cfg, base_dir, teacher_examples(train_recs + drills, image_of), run,
                                           model_dir, "Teacher", teacher_examples(held, image_of),
                                           prepare=lambda m, p: judgement_warmup(cfg, ds, m, p, run))
        # gold dialogues on the unseen families, from the base VLM's first answers
        base, base_proc = load_base(cfg, base_dir)
        uidx = select_per_family(ds["unseen"], cfg.world.unseen_families, cfg.train.teacher_eval_per_family, cfg.seed)
        unseen_rows = list(ds["unseen"].select(sorted(uidx)))
        unseen = gold_dialogues(unseen_rows, base, base_proc, cfg)
        del base
        images = {r["id"]: image_of(r["id"]) for r in held}
        images.update({r["id"]: r["image"].convert("RGB") for r in unseen_rows})
        turns = evaluate.teacher_fixed(result.model, processor, held + unseen, images,
                                       cfg.dialogue.teacher_max_new_tokens, cfg.model.generate_batch_size,
                                       cfg.dialogue.score_min, cfg.dialogue.score_max)
        seen_fams = set(cfg.world.seen_families)
        for t in turns:
            t["seen"] = t["family"] in seen_fams
        rows = []
        for name, sel in (("seen", [t for t in turns if t["seen"]]), ("unseen", [t for t in turns if not t["seen"]])):
            if sel:
                rows.append({"group": name, **evaluate.teacher_summary(sel, cfg.dialogue.threshold)})
        for k in range(1, cfg.dialogue.max_turns + 1):  # a teacher that scores by position shows here
            sel = [t for t in turns if t["seen"] and t["turn"] == k]
            if sel:
                rows.append({"group": f"seen, turn {k}", **evaluate.teacher_summary(sel, cfg.dialogue.threshold)})
        for fam in [*cfg.world.seen_families, *cfg.world.unseen_families]:
            sel = [t for t in turns if t["family"] == fam]
            if sel:
                rows.append({"group": fam, **evaluate.teacher_summary(sel, cfg.dialogue.threshold)})
        summary = pd.DataFrame(rows)
        summary.to_csv(run.dir / "teacher_eval.csv", index=False, float_format="%.4f")
        # the probe: per family, one test response with the right answer and the same with a wrong one
        pidx = select_per_family(ds["test"], cfg.world.seen_families, cfg.train.teacher_eval_per_family, cfg.seed)
        probe = evaluate.teacher_probe(result.model, processor, list(ds["test"].select(sorted(pidx))), cfg.seed,
                                       cfg.dialogue.threshold, cfg.dialogue.teacher_max_new_tokens,
                                       cfg.model.generate_batch_size)
        pdf = pd.DataFrame(probe)
        probe_table = pdf.groupby("family", sort=False).agg(
            n=("ok", "size"), right_mean_score=("right_score", "mean"), wrong_mean_score=("wrong_score", "mean"),
            right_satisfied=("right_score", lambda x: float((x >= cfg.dialogue.threshold).mean())),
            wrong_below=("wrong_score", lambda x: float((x < cfg.dialogue.threshold).mean())),
            both_ok=("ok", "mean")).reset_index()
        probe_table.to_csv(run.dir / "teacher_probe.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "teacher_turns.jsonl", turns)
        files.write_jsonl(run.dir / "gold_unseen.jsonl", unseen)
        head = summary.set_index("group")
        run.extra.update({"train_dialogues": len(train_recs), "heldout_dialogues": len(held),
                          "unseen_gold_dialogues": len(unseen),
                          "probe_both_ok": float(pdf["ok"].mean()),
                          "eval": {g: {k: float(head.loc[g, k]) for k in ("score_mae", "unparsable_share", "satisfied_agreement",
                                                                          "leak_share", "BLEU_4", "CIDEr")}
                                   for g in ("seen", "unseen") if g in head.index}})
    return TeacherResult(dir=run.dir, model_dir=model_dir, summary=summary, turns=turns, fit=result)


def _released(cfg: FireConfig) -> TeacherResult:
    """``data.source=hub``: the teacher trained on the released FIRE-100K's teacher turns (the
    dialogues whose every turn has a score) and evaluated turn by turn on its held-out
    dialogues against the released scores and feedback. The world's probes, judgement drills
    and unseen-family gold dialogues need the answer checker, so they do not run here."""
    import pandas as pd

    base_dir = provenance.require_stage(cfg, "01_train_base_vlm")
    f100_dir = provenance.require_stage(cfg, "02_generate_fire100k")
    train_recs, held = load_fire100k(cfg)
    scored = lambda r: all(t["score"] is not None for t in r["turns"])  # noqa: E731
    train_recs, held = [r for r in train_recs if scored(r)], [r for r in held if scored(r)]
    image_of = stage_common.record_images(train_recs + held)
    with provenance.stage_run(cfg, inputs=[base_dir / "model", f100_dir / "fire100k.jsonl"]) as run:
        model_dir = run.dir / "model"
        result, processor = fit_from_base(cfg, base_dir, teacher_examples(train_recs, image_of), run, model_dir,
                                           "Teacher", teacher_examples(held, image_of))
        turns = evaluate.teacher_fixed(result.model, processor, held, {r["id"]: image_of(r["id"]) for r in held},
                                       cfg.dialogue.teacher_max_new_tokens, cfg.model.generate_batch_size,
                                       cfg.dialogue.score_min, cfg.dialogue.score_max) if held else []
        rows = []
        groups = [("heldout", turns)] + [(f"turn {k}", [t for t in turns if t["turn"] == k])
                                         for k in range(1, cfg.dialogue.max_turns + 1)]
        groups += [(src, [t for t in turns if t["family"] == src]) for src in sorted({t["family"] for t in turns})]
        for name, sel in groups:
            if sel:
                rows.append({"group": name, **evaluate.teacher_summary(sel, cfg.dialogue.threshold)})
        summary = pd.DataFrame(rows)
        summary.to_csv(run.dir / "teacher_eval.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "teacher_turns.jsonl", turns)
        run.extra.update({"data": "hub", "train_dialogues": len(train_recs), "heldout_dialogues": len(held),
                          "not_run": "probe, judgement drills, unseen-family gold dialogues (they need the world's checker)"})
    return TeacherResult(dir=run.dir, model_dir=model_dir, summary=summary, turns=turns, fit=result)


if __name__ == "__main__":  # FIRE_LAUNCH=train deepspeed --num_gpus N --module fire_core.stages.teacher scale=paper ...
    import sys

    run(config.load("03_train_teacher", sys.argv[1:]))
