"""What several stages share: the base model, fine-tuning from it, loss plots."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fire_core import annotate, files, metrics, models, plots, prompts, provenance
from fire_core import eval as evaluate
from fire_core.annotate import PROMPT_VERSION, oracle_dialogue
from fire_core.files import request_id
from fire_core.records import (
    dialogue_record,
    is_heldout,
    load_fire,
    missing_images,
    open_image,
    sample_record,
    select_per_family,
)
from fire_core.sft import Example, FitResult, SFTDataset, fit, heldout_loss
from fire_core.vision import freeze_vision

log = logging.getLogger(__name__)


def hub_fire(cfg, which: str, split: str) -> list[dict[str, Any]]:
    """FIRE's released file ``which`` (``fire_train``, ``fire_1m``, ``fire_test``) as internal
    records (at most ``data.max_records``). Every image is checked before any work: a missing
    one fails with how many and which."""
    files = cfg.data.files()
    recs = load_fire(files[which], files["image_dir"], split=split)
    if cfg.data.max_records:
        recs = recs[: cfg.data.max_records]
    n, first = missing_images(recs)
    if n:
        raise FileNotFoundError(f"{n} of {len(recs)} records of {files[which]} name images that are not in "
                                f"{files['image_dir']}, e.g. {first}")
    return recs


def hub_samples(recs: list[dict[str, Any]], rid_of: Callable[[str], str], images: dict[str, Any] | None = None):
    """Engine samples from real-data records: judged by the teacher alone (no checker). Images
    come from ``images`` (id -> image) when the caller holds them, else from disk, one at a time."""
    for r in recs:
        image = images[r["id"]] if images is not None else open_image(r["image"])
        yield {"id": r["id"], "request_id": rid_of(r["id"]), "question": r["question"], "answer": r["answer"],
               "family": r["task"], "split": r["split"], "image": image, "image_path": r["image"],
               "judge": "teacher"}


def record_images(recs: list[dict[str, Any]]) -> Callable[[str], Any]:
    """id -> image for records whose ``image`` is a file path (real data)."""
    path_of = {r["id"]: r["image"] for r in recs}
    return lambda i: open_image(path_of[i])


def load_base(cfg, base_dir: Path):
    """The base VLM of stage 01: the saved tiny model, or the pretrained model it names."""

    if (base_dir / "model" / "PRETRAINED").is_file():
        return models.load_pretrained(cfg.model)
    return models.load(base_dir / "model")


def _finish_launch(record: Path, ident: str, result: FitResult) -> None:
    """Rank 0 records the launched training (the notebook's run reads it), then every process
    of the launch stops: evaluation runs in the stage's notebook, on one process."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        provenance.write_json_atomic(record, {
            "identity": ident, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "losses": result.losses, "steps": result.steps, "seconds": result.seconds, "tokens": result.tokens,
            "trainable_tokens": result.trainable_tokens, "trainable_params": result.trainable_params,
            "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after})
    raise SystemExit(0)


def _from_launch(cfg, rec: dict[str, Any], launched: Path, save_dir: Path, heldout: list[Example]):
    """The model a ``FIRE_LAUNCH=train`` run trained for this very config (``rec``: its
    ``TRAINED.json``), copied into the stage; its held-out loss is measured again here."""
    shutil.copytree(launched / "model", save_dir, dirs_exist_ok=True)
    model, processor = models.load(save_dir)
    held = SFTDataset(heldout, processor, cfg.model.max_length) if heldout else None
    after = heldout_loss(model, held, processor, cfg.train.batch_size) if held is not None else None
    log.info("using the model trained by a launch of %d process(es) in %s", rec["world_size"], launched)
    return FitResult(model=model, losses=[tuple(x) for x in rec["losses"]], steps=rec["steps"], seconds=rec["seconds"],
                     tokens=rec["tokens"], trainable_tokens=rec["trainable_tokens"], resumed_from=None,
                     trainable_params=rec["trainable_params"], heldout_loss_before=rec["heldout_loss_before"],
                     heldout_loss_after=after), processor


def loss_plot(result: FitResult, run, cfg, title: str) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd


    pd.DataFrame(result.losses, columns=["step", "loss"]).to_csv(run.dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    steps, losses = zip(*result.losses, strict=True)
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    plots.save(fig, run.dir / "loss_curve", sources=[run.dir / "loss.csv"], cfg=cfg)


def fit_from_base(cfg, base_dir: Path, examples: list[Example], run, save_dir: Path, title: str,
                   heldout: list[Example], prepare: Callable[[Any, Any], None] | None = None):
    """Train a copy of the base VLM on ``examples``; returns the FitResult and the processor.
    ``heldout`` (chats never trained on) measures the loss before and after training;
    ``prepare(model, processor)`` runs first (the teacher's judgement warm-up)."""

    launched = provenance.launched_dir(cfg)
    record = launched / "TRAINED.json"
    ident = provenance.identity(cfg)["hash"]
    rec = json.loads(record.read_text()) if record.is_file() and not provenance.launch_mode() else None
    if rec is not None and rec["identity"] == ident:
        result, processor = _from_launch(cfg, rec, launched, save_dir, heldout)
        run.extra["trained_by_launch"] = {"dir": str(launched), "world_size": rec["world_size"]}
    else:
        model, processor = load_base(cfg, base_dir)
        if cfg.train.freeze_vision:
            freeze_vision(model)
        if prepare is not None:
            prepare(model, processor)
        dataset = SFTDataset(examples, processor, cfg.model.max_length)
        held = SFTDataset(heldout, processor, cfg.model.max_length) if heldout else None
        log.info("%s: %d chats, %d tokens (%d trained)", title, len(dataset), dataset.n_tokens,
                 dataset.n_trainable_tokens)
        result = fit(model, processor, dataset, cfg.train, run.dir, seed=cfg.seed, save_dir=save_dir, heldout=held)
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)  # kept only to resume a crash
        if provenance.launch_mode():  # FIRE_LAUNCH=train: the model is trained; the notebook does the rest
            _finish_launch(record, ident, result)
    loss_plot(result, run, cfg, title)
    run.extra.update({"train_seconds": round(result.seconds, 1), "steps": result.steps, "examples": len(examples),
                      "tokens": result.tokens, "trained_tokens": result.trainable_tokens,
                      "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
                      "heldout_loss_before": result.heldout_loss_before,
                      "heldout_loss_after": result.heldout_loss_after, "heldout_chats": len(heldout),
                      "resumed_from": result.resumed_from, "params": models.param_count(result.model)})
    return result, processor


def load_fire100k(cfg, solved_first: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """FIRE-100K's dialogues split into (train, held out). With ``solved_first`` the training
    part also gets the dialogues that stage 02 generated but FIRE's filter dropped because the
    first answer was already right: a teacher that never saw a right first answer learns to
    score by turn position (turn 1 low, turn 2 high) instead of by the answer."""

    d = provenance.require_stage(cfg, "02_generate_fire100k")
    recs = [json.loads(line) for line in open(d / "fire100k.jsonl")]
    held = [r for r in recs if is_heldout(r["id"], cfg.dialogue.heldout_fraction)]
    train = [r for r in recs if not is_heldout(r["id"], cfg.dialogue.heldout_fraction)]
    if solved_first and (d / "raw").is_dir():  # real data (data.source=hub) has no raw shards
        kept = {r["id"] for r in recs}
        extra = {}
        for r in files.ShardStore(d / "raw", cfg.annotator.n_shards).records():
            if (r["id"] not in kept and r.get("meta", {}).get("prompt_version") == annotate.PROMPT_VERSION
                    and not is_heldout(r["id"], cfg.dialogue.heldout_fraction)
                    and annotate.filter_reason(r, cfg.dialogue.threshold) == "no_improvement"):
                extra[r["id"]] = r
        train += [extra[k] for k in sorted(extra)]
    return train, held


def first_responses(model, processor, rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str]:
    """The base VLM's greedy first answers (its base prompt), as stage 02 starts its dialogues."""

    convs = [prompts.base_messages([(r["question"], "")])[:-1] for r in rows]
    out = models.generate(model, processor, convs, [r["image"].convert("RGB") for r in rows],
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [f if f.strip() else "I am not sure." for f in out]


def gold_dialogues(rows, model, processor, cfg) -> list[dict[str, Any]]:
    """Oracle dialogues on held-out world rows (val/test/unseen), starting from the base VLM's
    first answers: the gold dialogues of fixed-dialogue evaluation. Never used for training."""
    rows = list(rows)
    firsts = first_responses(model, processor, rows, cfg.train.max_new_tokens, cfg.model.generate_batch_size)
    out = []
    for r, first in zip(rows, firsts, strict=True):
        turns = oracle_dialogue(sample_record(r), first, cfg.dialogue.threshold, cfg.dialogue.max_turns,
                                cfg.seed, cfg.annotator.fix_prob)
        rec = dialogue_record(r, turns, request_id(r["id"], "gold", cfg.seed), "world/oracle-gold",
                              prompt_version=PROMPT_VERSION)
        rec["image"] = f"world/{r['split']}/{r['id']}"
        out.append(rec)
    return out


def first_turn_report(cfg, model, processor, run, base_dir: Path, ds, name: str):
    """First-turn accuracy on val against the base VLM's stage-01 answers to the same samples."""
    import pandas as pd


    idx = select_per_family(ds["val"], cfg.world.seen_families, cfg.train.eval_per_family, cfg.seed)
    rows = list(ds["val"].select(sorted(idx)))
    preds = evaluate.qa_predictions(model, processor, rows, cfg.train.max_new_tokens, cfg.model.generate_batch_size,
                                    desc=f"{name} first turns", prompt="student")
    base_preds = {p["id"]: p for p in map(json.loads, open(base_dir / "predictions.jsonl")) if p["split"] == "val"}
    if not all(p["id"] in base_preds for p in preds):  # stage 01 evaluated other samples: answer them again
        base, base_proc = load_base(cfg, base_dir)
        base_preds = {p["id"]: p for p in evaluate.qa_predictions(base, base_proc, rows, cfg.train.max_new_tokens,
                                                                   cfg.model.generate_batch_size, desc="base first turns")}
    files.write_jsonl(run.dir / "first_turn_predictions.jsonl", preds)
    df = pd.DataFrame([{"family": p["family"], "base": base_preds[p["id"]]["correct"], name: p["correct"]}
                       for p in preds])
    table = df.groupby("family").agg(n=("base", "size"), base=("base", "mean"), **{name: (name, "mean")}).reset_index()
    table = pd.concat([pd.DataFrame([{"family": "all", "n": len(df), "base": df.base.mean(), name: df[name].mean()}]),
                       table], ignore_index=True)
    diff = metrics.paired_difference(df.base.tolist(), df[name].tolist(), cfg.bench.n_bootstrap, cfg.bench.ci, cfg.seed)
    table.to_csv(run.dir / "first_turn_accuracy.csv", index=False, float_format="%.4f")
    return table, diff, rows
