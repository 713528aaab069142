"""Stage 01: tokenizer, processor and the base VLM."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fire_core import eval as evaluate
from fire_core import files, language, models, prompts, provenance, world
from fire_core.config import FireConfig
from fire_core.records import select_per_family
from fire_core.sft import FitResult, SFTDataset, base_examples, fit
from fire_core.stages import common as stage_common
from fire_core.vision import freeze_vision, pretrain_vision

log = logging.getLogger(__name__)


@dataclass
class BaseResult:
    dir: Path
    model_dir: Path
    accuracy: Any  # pandas DataFrame: split, family, n, accuracy
    predictions: list[dict[str, Any]]
    fit: FitResult | None  # None at paper scale: the pretrained model is evaluated, not trained
    params: dict[str, int]


def tokenizer_corpus(ds) -> list[str]:
    """Text the tokenizer learns from: every train question and response, the role prompts,
    and the words feedback will use (byte-level BPE still encodes anything else)."""

    texts = [f"{q}\n{r}" for q, r in zip(ds["question"], ds["response"], strict=True)]
    texts += [prompts.STUDENT_SYSTEM, prompts.TEACHER_SYSTEM, prompts.BASE_SYSTEM, *prompts.FEEDBACK_HINTS]
    return texts


def family_warmup(model, processor, cfg: FireConfig, ds, train_rows, out_dir: Path) -> tuple[Any, dict[str, Any]]:
    """``cfg.train.family_warmup_steps`` steps on the QA chats alone (no captions, no follow-ups)
    of the ``cfg.train.family_warmup`` families among the stage's own train rows, then greedy
    accuracy on those families' val questions. Its checkpoints (``out_dir``) let a killed stage
    skip it on the rerun; the stage removes them with its own."""
    import random

    idx = [i for i, f in enumerate(train_rows["family"]) if f in set(cfg.train.family_warmup)]
    rows = train_rows.select(idx)
    rng = random.Random(provenance.derived_seed(cfg.seed, "family_warmup"))
    data = SFTDataset(base_examples(rows, cfg, rng, extras=False), processor, cfg.model.max_length)
    result = fit(model, processor, data, cfg.train, out_dir, seed=cfg.seed, max_steps=cfg.train.family_warmup_steps)
    val = ds["val"].select(sorted(select_per_family(ds["val"], cfg.train.family_warmup, cfg.train.eval_per_family,
                                                    cfg.seed)))
    preds = evaluate.qa_predictions(result.model, processor, list(val), cfg.train.max_new_tokens,
                                    batch_size=cfg.model.generate_batch_size, desc="warm-up val")
    acc = evaluate.accuracy_table(preds)
    return result.model, {"families": list(cfg.train.family_warmup), "chats": len(data), "steps": result.steps,
            "seconds": round(result.seconds, 1), "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
            "val_accuracy": {r.family: round(float(r.accuracy), 4) for r in acc.itertuples() if r.family != "all"},
            "resumed_from": result.resumed_from}


def run(cfg: FireConfig) -> BaseResult:
    """Stage 01: tokenizer, processor and base VLM from the world's train split; accuracy per
    family on val, test and the unseen families; a loss curve."""
    import random



    world_dir = provenance.require_stage(cfg, "00_build_world")
    ds = world.load(cfg)
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset"]) as run:
        model_dir = run.dir / "model"
        vision, result, lang, warmup = None, None, None, None
        if cfg.model.kind == "pretrained":  # paper scale: LLaVA-NeXT-8B is the base; evaluate it
            model, processor = models.load_pretrained(cfg.model)
            (model_dir / "PRETRAINED").parent.mkdir(parents=True, exist_ok=True)
            (model_dir / "PRETRAINED").write_text(cfg.model.pretrained_id + "\n")
            provenance.write_json_atomic(run.dir / "train_ids.json", [])  # trained elsewhere, on none of ours
        else:
            rng = random.Random(cfg.seed)
            train_rows = ds["train"].select(select_per_family(ds["train"], cfg.world.seen_families,
                                                              cfg.train.max_per_family, cfg.seed))
            # which train rows the base VLM saw: later stages (DRESS's feedback set) must not reuse them
            provenance.write_json_atomic(run.dir / "train_ids.json", sorted(train_rows["id"]))
            if cfg.model.kind == "paper_like":  # the 8B's classes, template and layout at toy sizes (GPU smoke)
                model, processor = models.build_paper_like(tokenizer_corpus(ds["train"]), cfg.world.image_size,
                                                           cfg.model.hidden_size, cfg.model.num_layers,
                                                           cfg.model.vocab_size, cfg.seed)
                tok = processor.tokenizer
            else:
                tok = models.train_tokenizer(tokenizer_corpus(ds["train"]), cfg.model.vocab_size)
                processor = models.build_processor(tok, cfg.model, cfg.world.image_size)
                torch.manual_seed(cfg.seed)  # the random initial weights
                model = models.build_model(cfg.model, processor)
            if cfg.train.language_pretrain_steps > 0 and cfg.model.kind == "tiny":  # the LLM that LLaVA starts from
                text_rows = ds["train"].remove_columns("image").to_list()
                val_rows = ds["val"].remove_columns("image").to_list()
                docs = language.corpus(text_rows, cfg.train.language_drills, random.Random(cfg.seed))
                lang = language.pretrain(model, tok, docs, cfg.train.language_pretrain_steps,
                                         cfg.train.language_pretrain_batch, cfg.train.language_pretrain_lr, cfg.seed,
                                         heldout=language.drills(val_rows, 400, random.Random(provenance.derived_seed(cfg.seed, "language_drills"))))
                log.info("language pretraining: drill accuracy %.3f -> %.3f in %.0f s", lang.drill_accuracy_before,
                         lang.drill_accuracy_after, lang.seconds)
            if cfg.train.vision_pretrain_steps > 0 and cfg.model.kind == "tiny":
                vision = pretrain_vision(model, ds["train"], cfg.train.vision_pretrain_steps, 64,
                                         cfg.train.vision_pretrain_lr, cfg.seed,
                                         regions=cfg.train.vision_pretrain_regions)
                log.info("vision pretraining: patch accuracy %s in %.0f s", vision.patch_accuracy, vision.seconds)
            if cfg.train.freeze_vision:
                freeze_vision(model)
            if cfg.train.family_warmup_steps > 0:  # a curriculum: some families alone, then the mix
                model, warmup = family_warmup(model, processor, cfg, ds, train_rows, run.dir / "family_warmup")
                log.info("family warm-up: %s", warmup)
            dataset = SFTDataset(base_examples(train_rows, cfg, rng), processor, cfg.model.max_length)
            held_rows = ds["val"].select(sorted(select_per_family(ds["val"], cfg.world.seen_families,
                                                                  cfg.train.heldout_per_family, cfg.seed)))
            heldout = SFTDataset(base_examples(held_rows, cfg, random.Random(cfg.seed)), processor,
                                 cfg.model.max_length)
            log.info("base VLM: %d chats, %d tokens, %s params", len(dataset), dataset.n_tokens,
                     models.param_count(model))
            result = fit(model, processor, dataset, cfg.train, run.dir, seed=cfg.seed, save_dir=model_dir,
                         heldout=heldout)
            model = result.model
            shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)  # kept only to resume a crash
            shutil.rmtree(run.dir / "family_warmup", ignore_errors=True)

        eval_rows = []
        for split, fams in (("val", cfg.world.seen_families), ("test", cfg.world.seen_families),
                            ("unseen", cfg.world.unseen_families)):
            idx = select_per_family(ds[split], fams, cfg.train.eval_per_family, cfg.seed)
            eval_rows += list(ds[split].select(sorted(idx)))
        preds = evaluate.qa_predictions(model, processor, eval_rows, cfg.train.max_new_tokens,
                                        batch_size=cfg.model.generate_batch_size)
        acc = evaluate.accuracy_table(preds)
        acc.to_csv(run.dir / "accuracy.csv", index=False, float_format="%.4f")
        files.write_jsonl(run.dir / "predictions.jsonl", preds)
        params = models.param_count(model)
        overall = acc[acc.family == "all"].set_index("split")["accuracy"].to_dict()
        run.extra.update({"params": params, "accuracy": overall})
        if result is not None:
            stage_common.loss_plot(result, run, cfg, "Base VLM")
            run.extra.update({
                "train_seconds": round(result.seconds, 1), "steps": result.steps, "examples": len(dataset),
                "tokens_per_epoch": result.tokens,
                "tokens_per_s": round(result.tokens * cfg.train.epochs / max(result.seconds, 1e-9), 1),
                "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
                "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after,
                "heldout_chats": len(heldout), "resumed_from": result.resumed_from})
        if warmup is not None:
            run.extra["family_warmup"] = warmup
        if lang is not None:
            run.extra["language_pretraining"] = {
                "steps": len(lang.losses), "documents": lang.documents, "tokens": lang.tokens,
                "seconds": round(lang.seconds, 1), "first_loss": lang.losses[0], "last_loss": lang.losses[-1],
                "heldout_drill_accuracy_before": lang.drill_accuracy_before,
                "heldout_drill_accuracy_after": lang.drill_accuracy_after}
        if vision is not None:
            run.extra["vision_pretraining"] = {
                "steps": len(vision.losses), "images": vision.images, "seconds": round(vision.seconds, 1),
                "first_loss": vision.losses[0], "last_loss": vision.losses[-1],
                "heldout_patch_accuracy": vision.patch_accuracy}
    return BaseResult(dir=run.dir, model_dir=model_dir, accuracy=acc, predictions=preds, fit=result, params=params)
