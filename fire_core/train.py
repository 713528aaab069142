"""Supervised fine-tuning for every training stage (base VLM, teacher, student, FIRE student).

Records become chats (``fire_core.prompts``), chats become token ids with labels masked to the
chosen role, and the Hugging Face ``Trainer`` trains a full model or a LoRA adapter on the
language model only, optionally under DeepSpeed ZeRO-2/3::

    examples = [train.Example(prompts.student_messages(q, turns), image) for ...]
    ds = train.SFTDataset(examples, processor, max_length=512)
    result = train.fit(model, processor, ds, cfg.train, out_dir, seed=cfg.seed)
    result.losses          # [(step, loss), ...]: it goes down

A rerun with the same ``out_dir`` resumes from the last checkpoint and ends with the same
weights as an uninterrupted run (tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fire_core.config import TrainConfig
from fire_core.models import num_image_tokens, render_chat

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Example:
    """One training chat. ``image`` is a PIL image or a zero-argument loader (saves memory)."""

    messages: list[dict[str, Any]]
    image: Image.Image | Callable[[], Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)


def encode(messages: Sequence[dict[str, Any]], tokenizer, n_image: int, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one chat. Labels keep only the trainable assistant turns (and
    their closing <|end|>); everything else, image tokens included, is -100.

    Too long: cut after the last complete trainable turn that fits; else cut at ``max_length``.
    The image tokens are never cut: if they do not fit, this raises.
    """
    text, spans = render_chat(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tid if any(a <= s < b for a, b in spans) else IGNORE for tid, (s, _) in zip(ids, offsets, strict=True)]
    image_id = tokenizer.image_token_id
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tid, lab in zip(ids, labels, strict=True):
        if tid == image_id:
            out_ids += [image_id] * n_image
            out_labels += [IGNORE] * n_image
        else:
            out_ids.append(tid)
            out_labels.append(lab)
    if len(out_ids) > max_length:
        last_image = max((i for i, t in enumerate(out_ids) if t == image_id), default=-1)
        if last_image >= max_length - 1:
            raise ValueError(f"model.max_length={max_length} is too short: the image alone needs "
                             f"{last_image + 2} tokens; raise model.max_length")
        eos = tokenizer.eos_token_id
        ends = [i + 1 for i in range(last_image + 1, max_length) if out_ids[i] == eos and out_labels[i] != IGNORE]
        cut = ends[-1] if ends else max_length
        out_ids, out_labels = out_ids[:cut], out_labels[:cut]
    return {"input_ids": out_ids, "labels": out_labels}


class SFTDataset(torch.utils.data.Dataset):
    """Pre-tokenised chats; images are decoded when a batch is built."""

    def __init__(self, examples: Sequence[Example], processor, max_length: int):
        self.examples = list(examples)
        self.processor = processor
        size = processor.image_processor.size["height"]
        self.n_image = num_image_tokens(processor, size)
        self.encoded = [encode(e.messages, processor.tokenizer, self.n_image, max_length) for e in self.examples]
        self.n_trainable_tokens = sum(sum(1 for x in e["labels"] if x != IGNORE) for e in self.encoded)
        self.n_tokens = sum(len(e["input_ids"]) for e in self.encoded)
        self.lengths = [len(e["input_ids"]) for e in self.encoded]  # for length-grouped batches

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.examples[i].image
        img = img() if callable(img) else img
        return {**self.encoded[i], "image": img}


@dataclass
class Collator:
    """Right-pads ids and labels and turns images into LLaVA-NeXT pixel values."""

    processor: Any

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.processor.tokenizer.pad_token_id
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for k, b in enumerate(batch):
            m = len(b["input_ids"])
            ids[k, :m] = torch.tensor(b["input_ids"])
            labels[k, :m] = torch.tensor(b["labels"])
            mask[k, :m] = 1
        pix = self.processor.image_processor([b["image"].convert("RGB") for b in batch], return_tensors="pt")
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"]}


def lora_target_regex(targets: Sequence[str]) -> str:
    """LoRA on the language model only. A plain ['q_proj', 'k_proj'] list would also adapt the
    vision tower's attention, whose modules have the same names."""
    return rf".*language_model\..*\.({'|'.join(re.escape(t) for t in targets)})$"


def apply_lora(model, tcfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=0.05,
                      target_modules=lora_target_regex(tcfg.lora_targets), bias="none")
    return get_peft_model(model, lcfg)


def prepare_cpu_deepspeed() -> None:
    """DeepSpeed on a CPU, in one process, with nothing compiled. No-op on a GPU machine.

    DeepSpeed wants a process group even for one process, so describe a world of one (gloo).
    On CPU it also JIT-compiles a shared-memory op (g++ and ninja, about a minute) at every
    start; with one rank plain gloo is all it needs, so that build is skipped.
    """
    if torch.cuda.is_available():
        return
    import importlib
    import warnings

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    # `import deepspeed.comm.torch` would give the real torch package (an attribute shadows it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*")


@dataclass
class FitResult:
    model: Any
    losses: list[tuple[int, float]]
    steps: int
    seconds: float
    tokens: int
    trainable_tokens: int
    resumed_from: str | None
    trainable_params: int
    # mean loss per trained token on a fixed held-out set, before and after training: "it
    # learned" means after < before (one noisy training step against another proves nothing)
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None


@torch.no_grad()
def heldout_loss(model, dataset: SFTDataset, processor, batch_size: int = 16) -> float:
    """Mean loss per trained (unmasked) token of ``model`` on every chat of ``dataset``."""
    collate = Collator(processor)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
            if n:
                total += float(model(**batch).loss) * n
                count += n
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("the held-out set has no trained tokens")
    return total / count


def last_checkpoint(ckpt_dir: Path) -> str | None:
    if not ckpt_dir.is_dir():
        return None
    cks = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(cks, key=lambda p: int(p.name.split("-")[1]))) if cks else None


class TrainedPositions:
    """A forward pre-hook on the LM head that keeps only the positions whose next token carries
    the loss. The stock loss projects every position onto the whole vocabulary and then ignores
    most of them (image tokens, prompts, padding): measured here on stage 01's chats, the head
    and its log-softmax over all positions took about a third of each training step. The hook
    works through PEFT and DeepSpeed wrappers alike, since it sits on the module itself."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None

    def __call__(self, module, args):
        if self.keep is None:
            return None
        return (args[0][self.keep].unsqueeze(0), *args[1:])


def trained_positions_loss(model, inputs: dict[str, Any], positions: TrainedPositions):
    """(summed cross-entropy, number of trained tokens, outputs) of a batch with ``labels``;
    ``positions`` must be registered on the model's LM head. ``outputs.logits`` holds only the
    trained positions, shape (1, count, vocab)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts t+1
    keep = target != IGNORE
    positions.keep = keep
    try:
        outputs = model(**inputs)
    finally:
        positions.keep = None
    loss = torch.nn.functional.cross_entropy(outputs.logits[0].float(), target[keep], reduction="sum")
    return loss, keep.sum(), outputs


def _trainer_class():
    from transformers import PreTrainedModel, Trainer

    class FireTrainer(Trainer):
        """The HF Trainer, with a resume that really restores the weights and a loss computed
        on the trained positions only (:class:`TrainedPositions`; the same value as the stock
        causal-LM loss: cross-entropy summed over trained tokens, divided by their count in the
        (accumulated) batch).

        transformers 5.x saves LLaVA-NeXT checkpoints with the legacy key names
        (``language_model.model.*``) but its resume path loads them into the new layout
        (``model.language_model.*``) with strict=False: every key misses, only a warning is
        logged, and the "resumed" run silently restarts from random weights. Loading through
        ``from_pretrained`` applies the key mapping; the copy is strict.
        """

        positions: TrainedPositions | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.positions is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, count, outputs = trained_positions_loss(model, inputs, self.positions)
            # like the stock loss: normalised over the accumulated batch when the Trainer counts it
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # the count is summed over processes
            return (loss, outputs) if return_outputs else loss

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model if model is not None else self.model
            weights = Path(resume_from_checkpoint) / "model.safetensors"
            if self.is_deepspeed_enabled or not isinstance(model, PreTrainedModel) or not weights.is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            saved = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
            model.load_state_dict(saved.state_dict(), strict=True)
            log.info("restored weights from %s", resume_from_checkpoint)

        def _get_train_sampler(self, train_dataset=None):
            """Length-grouped batches from the lengths the dataset already knows (the stock
            sampler would decode every image to measure them)."""
            from transformers.trainer_pt_utils import LengthGroupedSampler

            ds = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy == "group_by_length" and hasattr(ds, "lengths"):
                return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=ds.lengths)
            return super()._get_train_sampler(train_dataset)

    return FireTrainer


def reset_deepspeed_state() -> None:
    """Forget process-global DeepSpeed settings after a DeepSpeed run, so that later loads and
    plain Trainers in the same process (a notebook kernel) are not silently partitioned."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer accelerate
        pass


def fit(model, processor, dataset: SFTDataset, tcfg: TrainConfig, out_dir: Path, seed: int,
        max_steps: int = -1, save_steps: int | None = None, resume: bool = True,
        logging_steps: int | None = None, save_dir: Path | None = None,
        callbacks: Sequence[Any] = (), heldout: SFTDataset | None = None) -> FitResult:
    """Train with the HF Trainer; checkpoints go to ``out_dir/checkpoints`` (resumable).

    With ``save_dir`` the final model (a LoRA adapter for method=lora) and the processor are
    saved there through the Trainer, which gathers ZeRO-3 partitions. After a DeepSpeed run the
    returned model is reloaded from ``save_dir`` as a plain fp32 model. With ``heldout`` the
    loss on those chats is measured before and after training.
    """
    from transformers import TrainingArguments, set_seed

    set_seed(seed)
    before = heldout_loss(model, heldout, processor, tcfg.batch_size) if heldout is not None else None
    if tcfg.method == "lora" and not hasattr(model, "peft_config"):
        model = apply_lora(model, tcfg)
    if tcfg.deepspeed:
        prepare_cpu_deepspeed()
    ckpt_dir = Path(out_dir) / "checkpoints"
    # checkpoints resume only the same run: another config, data or set of trainable weights
    # would load mismatched optimizer state (or silently mix two runs)
    fingerprint = hashlib.sha256(json.dumps({
        "train": dataclasses.asdict(tcfg), "seed": seed, "max_steps": max_steps, "examples": len(dataset),
        "tokens": dataset.n_tokens,
        "trainable": [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad],
    }, sort_keys=True, default=str).encode()).hexdigest()
    fp_file = ckpt_dir / "run_fingerprint.txt"
    if ckpt_dir.is_dir() and (not fp_file.is_file() or fp_file.read_text().strip() != fingerprint):
        log.warning("discarding checkpoints in %s: they belong to a different run", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fingerprint + "\n")
    steps_per_epoch = max(1, len(dataset) // (tcfg.batch_size * tcfg.grad_accum))
    total = max_steps if max_steps > 0 else int(steps_per_epoch * tcfg.epochs)
    logging_steps = logging_steps or max(1, total // 50)
    # checkpoints only at logged steps: the Trainer averages a logged loss since the last log
    # or resume, so a resume between two logs would log another number than an uninterrupted run
    save_steps = save_steps or max(logging_steps, (total // 4) // logging_steps * logging_steps)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum, learning_rate=tcfg.learning_rate,
        num_train_epochs=tcfg.epochs, max_steps=max_steps, warmup_steps=tcfg.warmup_ratio,
        lr_scheduler_type=tcfg.lr_scheduler, weight_decay=tcfg.weight_decay, max_grad_norm=1.0,
        logging_steps=logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=save_steps, save_total_limit=1,
        seed=seed, data_seed=seed, use_cpu=True, bf16=tcfg.bf16, report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, deepspeed=tcfg.deepspeed,
        optim="adamw_torch", disable_tqdm=False,
        train_sampling_strategy="group_by_length" if tcfg.group_by_length else "random",
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=Collator(processor),
                                callbacks=list(callbacks))
    trainer.positions = TrainedPositions()
    hook = model.get_output_embeddings().register_forward_pre_hook(trainer.positions)
    resume_from = last_checkpoint(ckpt_dir) if resume else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    t0 = time.time()
    tower_trains = any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    try:
        with native_convolution() if tower_trains else contextlib.nullcontext():
            trainer.train(resume_from_checkpoint=resume_from)
    finally:
        hook.remove()
    seconds = time.time() - t0
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    final = trainer.model
    if save_dir is not None:
        trainer.save_model(str(save_dir))
        processor.save_pretrained(save_dir)
        # a pickle of the TrainingArguments, with this machine's absolute paths in it: the
        # manifest records the config, and the same run elsewhere must give the same bytes
        Path(save_dir, "training_args.bin").unlink(missing_ok=True)
    if tcfg.deepspeed:
        reset_deepspeed_state()
        if save_dir is None:
            raise ValueError("a DeepSpeed run needs save_dir: its in-memory model is partitioned")
        from fire_core import models

        final, _ = models.load(save_dir, dtype=torch.float32)
    after = heldout_loss(final, heldout, processor, tcfg.batch_size) if heldout is not None else None
    return FitResult(model=final, losses=losses, steps=trainer.state.global_step, seconds=seconds,
                     tokens=dataset.n_tokens, trainable_tokens=dataset.n_trainable_tokens,
                     resumed_from=resume_from, trainable_params=trainable,
                     heldout_loss_before=before, heldout_loss_after=after)


# ---------------------------------------------------------------------------------------------
# Vision pretraining: LLaVA starts from a pretrained CLIP/SigLIP tower. With nothing to download,
# we pretrain ours on the world: each patch's colour, kind and character come from the scene
# record (dense supervision, seconds on a CPU), then the heads are thrown away.


def native_convolution():
    """PyTorch's own convolution instead of oneDNN's, for steps that train the vision tower.
    Measured here: about one run in twenty of stage 01 had a patch-embedding weight gradient that
    differed in the last bits from the first step on (all other weights equal), so runs with the
    same seed gave different towers. PyTorch's convolution (im2col and an MKL matrix product) has
    no such variation; it makes the tower's training step about 1.4x slower. A frozen tower never
    runs the convolution's backward, so the other stages keep oneDNN."""
    return torch.backends.mkldnn.flags(enabled=False)


@dataclass
class VisionPretrainResult:
    losses: list[float]
    patch_accuracy: dict[str, float]  # on patches that show something, held-out images
    seconds: float
    images: int


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, H, W); the processor's normalisation (mean 0.5, std 0.5) is x / 127.5 - 1."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def pretrain_vision(model, rows, steps: int, batch_size: int, lr: float, seed: int,
                    heldout: int = 256) -> VisionPretrainResult:
    """Train the vision tower to tell, for every patch, the colour, kind and character under it."""
    import json
    import random

    from fire_core import world

    tower = model.model.vision_tower
    vc = model.config.vision_config
    grid = vc.image_size // vc.patch_size
    n = min(len(rows), steps * batch_size // 2 + heldout)  # about two passes over each image
    order = random.Random(seed).sample(range(len(rows)), n)
    sub = rows.select(order)
    pix = _pixels(sub["image"])
    labels = torch.tensor([world.patch_labels(json.loads(sc), grid) for sc in sub["scene"]])  # (n, grid^2, 3)
    torch.manual_seed(seed)  # the heads' initial weights
    heads = torch.nn.ModuleList([torch.nn.Linear(vc.hidden_size, len(v)) for v in
                                 (world.PATCH_COLORS, world.PATCH_KINDS, world.PATCH_CHARS)])
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine to zero
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / max(1, steps)))))
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.arange(heldout, n)
    tower.train()
    losses = []
    t0 = time.time()
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="vision pretraining", unit="step"):
        b = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        with native_convolution():
            h = tower(pixel_values=pix[b].float() / 127.5 - 1, output_hidden_states=True).hidden_states[-1]
            loss = sum(torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels[b][..., k].flatten())
                       for k, head in enumerate(heads))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        h = tower(pixel_values=pix[:heldout].float() / 127.5 - 1, output_hidden_states=True).hidden_states[-1]
        acc = {}
        for k, (name, head) in enumerate(zip(("colour", "kind", "char"), heads, strict=True)):
            y = labels[:heldout][..., k]
            mask = y > 0
            acc[name] = float((head(h).argmax(-1)[mask] == y[mask]).float().mean()) if mask.any() else float("nan")
    return VisionPretrainResult(losses=losses, patch_accuracy=acc, seconds=time.time() - t0, images=n)


def freeze_vision(model) -> None:
    """LLaVA keeps the pretrained vision tower frozen; only projector and LM train."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Stage 01: the base VLM


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
    from fire_core import prompts

    texts = [f"{q}\n{r}" for q, r in zip(ds["question"], ds["response"], strict=True)]
    texts += [prompts.STUDENT_SYSTEM, prompts.TEACHER_SYSTEM, prompts.BASE_SYSTEM, *prompts.FEEDBACK_HINTS]
    return texts


def base_examples(rows, cfg, rng) -> list[Example]:
    """Single-turn QA chats, some with follow-up questions about the same image."""
    import json

    from fire_core import prompts, world

    out = []
    for r in rows:
        qa = [(r["question"], r["response"])]
        scene = json.loads(r["scene"])
        if rng.random() < cfg.train.followup_prob:
            for _ in range(rng.randint(1, 2)):
                qa.append(world.follow_up(scene, rng))
        if rng.random() < cfg.train.caption_prob:  # LLaVA's feature alignment: describe it all
            qa.insert(rng.randint(0, len(qa)), (rng.choice(world.DETAIL_QUESTIONS), world.dense_caption(scene)))
        out.append(Example(prompts.base_messages(qa), r["image"], {"id": r["id"], "family": r["family"]}))
    return out


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


def train_base_vlm(cfg) -> BaseResult:
    """Stage 01: tokenizer, processor and base VLM from the world's train split; accuracy per
    family on val, test and the unseen families; a loss curve."""
    import json
    import random

    import matplotlib.pyplot as plt
    import pandas as pd

    from fire_core import eval as evaluate
    from fire_core import language, models, plots, provenance, world

    world_dir = provenance.require_stage(cfg, "00_build_world")
    ds = world.load(cfg)
    with provenance.stage_run(cfg, inputs=[world_dir / "dataset"]) as run:
        model_dir = run.dir / "model"
        vision, result, lang = None, None, None
        if cfg.model.kind == "pretrained":  # paper scale: LLaVA-NeXT-8B is the base; evaluate it
            model, processor = models.load_pretrained(cfg.model)
            (model_dir / "PRETRAINED").parent.mkdir(parents=True, exist_ok=True)
            (model_dir / "PRETRAINED").write_text(cfg.model.pretrained_id + "\n")
        else:
            rng = random.Random(cfg.seed)
            train_rows = ds["train"].select(select_per_family(ds["train"], cfg.world.seen_families,
                                                              cfg.train.max_per_family, cfg.seed))
            tok = models.train_tokenizer(tokenizer_corpus(ds["train"]), cfg.model.vocab_size)
            processor = models.build_processor(tok, cfg.model, cfg.world.image_size)
            torch.manual_seed(cfg.seed)  # the random initial weights
            model = models.build_model(cfg.model, processor)
            if cfg.train.language_pretrain_steps > 0:  # the LLM that LLaVA starts from
                text_rows = ds["train"].remove_columns("image").to_list()
                val_rows = ds["val"].remove_columns("image").to_list()
                docs = language.corpus(text_rows, cfg.train.language_drills, random.Random(cfg.seed))
                lang = language.pretrain(model, tok, docs, cfg.train.language_pretrain_steps,
                                         cfg.train.language_pretrain_batch, cfg.train.language_pretrain_lr, cfg.seed,
                                         heldout=language.drills(val_rows, 400, random.Random(cfg.seed + 1)))
                log.info("language pretraining: drill accuracy %.3f -> %.3f in %.0f s", lang.drill_accuracy_before,
                         lang.drill_accuracy_after, lang.seconds)
            if cfg.train.vision_pretrain_steps > 0:
                vision = pretrain_vision(model, ds["train"], cfg.train.vision_pretrain_steps, 64,
                                         cfg.train.vision_pretrain_lr, cfg.seed)
                log.info("vision pretraining: patch accuracy %s in %.0f s", vision.patch_accuracy, vision.seconds)
            if cfg.train.freeze_vision:
                freeze_vision(model)
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

        eval_rows = []
        for split, fams in (("val", cfg.world.seen_families), ("test", cfg.world.seen_families),
                            ("unseen", cfg.world.unseen_families)):
            idx = select_per_family(ds[split], fams, cfg.train.eval_per_family, cfg.seed)
            eval_rows += list(ds[split].select(sorted(idx)))
        preds = evaluate.qa_predictions(model, processor, eval_rows, cfg.train.max_new_tokens,
                                        batch_size=cfg.dialogue.batch_size)
        acc = evaluate.accuracy_table(preds)
        acc.to_csv(run.dir / "accuracy.csv", index=False, float_format="%.4f")
        with open(run.dir / "predictions.jsonl", "w") as fh:
            for p in preds:
                fh.write(json.dumps(p) + "\n")
        params = models.param_count(model)
        overall = acc[acc.family == "all"].set_index("split")["accuracy"].to_dict()
        run.extra.update({"params": params, "accuracy": overall})
        if result is not None:
            pd.DataFrame(result.losses, columns=["step", "loss"]).to_csv(run.dir / "loss.csv", index=False)
            fig, ax = plt.subplots(figsize=(5, 3))
            steps, losses = zip(*result.losses, strict=True)
            ax.plot(steps, losses)
            ax.set(xlabel="step", ylabel="training loss", title="Base VLM")
            plots.save(fig, run.dir / "loss_curve", sources=[run.dir / "loss.csv"], cfg=cfg)
            run.extra.update({
                "train_seconds": round(result.seconds, 1), "steps": result.steps, "examples": len(dataset),
                "tokens_per_epoch": result.tokens,
                "tokens_per_s": round(result.tokens * cfg.train.epochs / max(result.seconds, 1e-9), 1),
                "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
                "heldout_loss_before": result.heldout_loss_before, "heldout_loss_after": result.heldout_loss_after,
                "heldout_chats": len(heldout), "resumed_from": result.resumed_from})
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


# ---------------------------------------------------------------------------------------------
# Stages 03-05: teacher, FIRE100K student, FIRE student (all start from the base VLM)


def load_base(cfg, base_dir: Path):
    """The base VLM of stage 01: the saved tiny model, or the pretrained model it names."""
    from fire_core import models

    if (base_dir / "model" / "PRETRAINED").is_file():
        return models.load_pretrained(cfg.model)
    return models.load(base_dir / "model")


def dialogue_turns(record: dict[str, Any]):
    from fire_core import prompts

    return [prompts.Turn(t["response"], t["score"], t["feedback"]) for t in record["turns"]]


def teacher_examples(records, image_of: Callable[[str], Any]) -> list[Example]:
    """Teacher chats: the prompt holds the question and the ground truth; loss on every reply,
    or only on the replies a record lists in ``trained_turns`` (judgement dialogues)."""
    from fire_core import prompts

    out = []
    for r in records:
        msgs = prompts.teacher_messages(r["question"], r["answer"], dialogue_turns(r))
        if "trained_turns" in r:
            replies = [m for m in msgs if m["role"] == "assistant"]
            for k, m in enumerate(replies):
                m["train"] = k in r["trained_turns"]
        out.append(Example(msgs, (lambda i=r["id"]: image_of(i)), {"id": r["id"], "family": r["task"]}))
    return out


def student_examples(records, image_of: Callable[[str], Any]) -> list[Example]:
    """Student chats: responses with the feedback between them; loss on every response. The
    student never sees the ground truth or the scores."""
    from fire_core import prompts

    return [Example(prompts.student_messages(r["question"], dialogue_turns(r)),
                    (lambda i=r["id"]: image_of(i)), {"id": r["id"], "family": r["task"]}) for r in records]


def is_heldout(dialogue_id: str, fraction: float) -> bool:
    """A fixed, seed-free split of FIRE-100K by id, the same in stages 03, 04 and 05."""
    return int(hashlib.sha256(f"heldout:{dialogue_id}".encode()).hexdigest(), 16) % 10_000 < fraction * 10_000


def load_fire100k(cfg, solved_first: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """FIRE-100K's dialogues split into (train, held out). With ``solved_first`` the training
    part also gets the dialogues that stage 02 generated but FIRE's filter dropped because the
    first answer was already right: a teacher that never saw a right first answer learns to
    score by turn position (turn 1 low, turn 2 high) instead of by the answer."""
    from fire_core import annotate, provenance

    d = provenance.require_stage(cfg, "02_generate_fire100k")
    recs = [json.loads(line) for line in open(d / "fire100k.jsonl")]
    held = [r for r in recs if is_heldout(r["id"], cfg.dialogue.heldout_fraction)]
    train = [r for r in recs if not is_heldout(r["id"], cfg.dialogue.heldout_fraction)]
    if solved_first:
        kept = {r["id"] for r in recs}
        extra = {}
        for r in annotate.ShardStore(d / "raw", cfg.annotator.n_shards).records():
            if (r["id"] not in kept and r.get("meta", {}).get("prompt_version") == annotate.PROMPT_VERSION
                    and not is_heldout(r["id"], cfg.dialogue.heldout_fraction)
                    and annotate.filter_reason(r, cfg.dialogue.threshold) == "no_improvement"):
                extra[r["id"]] = r
        train += [extra[k] for k in sorted(extra)]
    return train, held


def image_lookup(split_ds) -> Callable[[str], Image.Image]:
    index = {i: k for k, i in enumerate(split_ds["id"])}

    def image_of(sample_id: str) -> Image.Image:
        if sample_id not in index:
            raise KeyError(f"image '{sample_id}' is not in the world's {split_ds.split} split; rebuild stage 00")
        return split_ds[index[sample_id]]["image"].convert("RGB")

    return image_of


def _loss_plot(result: FitResult, run, cfg, title: str) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    from fire_core import plots

    pd.DataFrame(result.losses, columns=["step", "loss"]).to_csv(run.dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(5, 3))
    steps, losses = zip(*result.losses, strict=True)
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    plots.save(fig, run.dir / "loss_curve", sources=[run.dir / "loss.csv"], cfg=cfg)


def _fit_from_base(cfg, base_dir: Path, examples: list[Example], run, save_dir: Path, title: str,
                   heldout: list[Example], prepare: Callable[[Any, Any], None] | None = None):
    """Train a copy of the base VLM on ``examples``; returns the FitResult and the processor.
    ``heldout`` (chats never trained on) measures the loss before and after training;
    ``prepare(model, processor)`` runs first (the teacher's judgement warm-up)."""
    from fire_core import models

    model, processor = load_base(cfg, base_dir)
    if cfg.train.freeze_vision:
        freeze_vision(model)
    if prepare is not None:
        prepare(model, processor)
    dataset = SFTDataset(examples, processor, cfg.model.max_length)
    held = SFTDataset(heldout, processor, cfg.model.max_length)
    log.info("%s: %d chats, %d tokens (%d trained)", title, len(dataset), dataset.n_tokens,
             dataset.n_trainable_tokens)
    result = fit(model, processor, dataset, cfg.train, run.dir, seed=cfg.seed, save_dir=save_dir, heldout=held)
    shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)  # kept only to resume a crash
    _loss_plot(result, run, cfg, title)
    run.extra.update({"train_seconds": round(result.seconds, 1), "steps": result.steps, "examples": len(dataset),
                      "tokens": result.tokens, "trained_tokens": result.trainable_tokens,
                      "first_loss": result.losses[0][1], "last_loss": result.losses[-1][1],
                      "heldout_loss_before": result.heldout_loss_before,
                      "heldout_loss_after": result.heldout_loss_after, "heldout_chats": len(held),
                      "resumed_from": result.resumed_from, "params": models.param_count(result.model)})
    return result, processor


def judgement_warmup(cfg, ds, model, processor, run) -> None:
    """Short text-only judgement chats (``language.judgement_chats``) before the teacher's SFT.

    Measured at default: the teacher trained on FIRE-100K plus balanced judgement dialogues
    still gave one score to a right and a wrong answer in most families. The comparison itself
    is quick to learn in a short context (about 300 steps of 64 two-line chats), slow inside a
    250-token multimodal dialogue; so the teacher first learns it short, then in its dialogues.
    Train rows only, and none whose FIRE-100K dialogue is held out for the teacher's evaluation."""
    import random

    from fire_core import language

    steps = cfg.train.judgement_warmup_steps
    if steps <= 0:
        return
    rows = [r for r in ds["train"].remove_columns("image").to_list()
            if not is_heldout(r["id"], cfg.dialogue.heldout_fraction)]  # never a held-out dialogue's sample
    bs = cfg.train.language_pretrain_batch
    docs = language.judgement_chats(rows, steps * bs // 2, random.Random(cfg.seed + 3))
    # no held-out measurement here: the "Same answer: yes|no" drills are stage 01's format, not
    # this one; the stage's probe table measures the teacher's judgement in its real prompt
    res = language.pretrain(model, processor.tokenizer, docs, steps, bs, cfg.train.learning_rate, cfg.seed)
    log.info("judgement warm-up: %d steps in %.0f s, loss %.3f -> %.3f", steps, res.seconds, res.losses[0],
             res.losses[-1])
    run.extra["judgement_warmup"] = {"steps": steps, "documents": res.documents, "seconds": round(res.seconds, 1),
                                     "first_loss": res.losses[0], "last_loss": res.losses[-1]}


def judgement_records(cfg, train_ds, train_recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``train.judgement_per_sample`` balanced judgement dialogues (annotate.judgement_dialogues)
    per sample of the teacher's FIRE-100K training records (never a held-out one), starting
    from the base VLM's own wrong answers to it where FIRE-100K has them."""
    from fire_core import annotate

    if cfg.train.judgement_per_sample <= 0:
        return []
    index = {i: k for k, i in enumerate(train_ds["id"])}
    ids = sorted({r["id"] for r in train_recs})
    rows = train_ds.remove_columns("image").select([index[i] for i in ids])
    firsts = {r["id"]: [t["response"] for t in r["turns"]] for r in train_recs}
    return annotate.judgement_dialogues([annotate.sample_record(r) for r in rows], cfg.train.judgement_per_sample,
                                        cfg.dialogue.max_turns, cfg.seed, first_responses=firsts)


@dataclass
class TeacherResult:
    dir: Path
    model_dir: Path
    summary: Any  # DataFrame: group (seen / unseen / family), n, score_mae, unparsable_share, ...
    turns: list[dict[str, Any]]
    fit: FitResult


def train_teacher(cfg) -> TeacherResult:
    """Stage 03: the feedback model, trained on FIRE-100K's teacher turns, then evaluated turn by
    turn on held-out FIRE-100K dialogues (seen families) and oracle dialogues on the unseen
    families (never trained on)."""
    import pandas as pd

    from fire_core import annotate, provenance, world
    from fire_core import eval as evaluate

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
        result, processor = _fit_from_base(cfg, base_dir, teacher_examples(train_recs + drills, image_of), run,
                                           model_dir, "Teacher", teacher_examples(held, image_of),
                                           prepare=lambda m, p: judgement_warmup(cfg, ds, m, p, run))
        # gold dialogues on the unseen families, from the base VLM's first answers
        base, base_proc = load_base(cfg, base_dir)
        uidx = select_per_family(ds["unseen"], cfg.world.unseen_families, cfg.train.eval_per_family, cfg.seed)
        unseen_rows = list(ds["unseen"].select(sorted(uidx)))
        unseen = annotate.gold_dialogues(unseen_rows, base, base_proc, cfg)
        del base
        images = {r["id"]: image_of(r["id"]) for r in held}
        images.update({r["id"]: r["image"].convert("RGB") for r in unseen_rows})
        turns = evaluate.teacher_fixed(result.model, processor, held + unseen, images,
                                       cfg.dialogue.teacher_max_new_tokens, cfg.dialogue.batch_size,
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
        pidx = select_per_family(ds["test"], cfg.world.seen_families, cfg.train.eval_per_family, cfg.seed)
        probe = evaluate.teacher_probe(result.model, processor, list(ds["test"].select(sorted(pidx))), cfg.seed,
                                       cfg.dialogue.threshold, cfg.dialogue.teacher_max_new_tokens,
                                       cfg.dialogue.batch_size)
        pdf = pd.DataFrame(probe)
        probe_table = pdf.groupby("family", sort=False).agg(
            n=("ok", "size"), right_mean_score=("right_score", "mean"), wrong_mean_score=("wrong_score", "mean"),
            right_satisfied=("right_score", lambda x: float((x >= cfg.dialogue.threshold).mean())),
            wrong_below=("wrong_score", lambda x: float((x < cfg.dialogue.threshold).mean())),
            both_ok=("ok", "mean")).reset_index()
        probe_table.to_csv(run.dir / "teacher_probe.csv", index=False, float_format="%.4f")
        with open(run.dir / "teacher_turns.jsonl", "w") as fh:
            for t in turns:
                fh.write(json.dumps(t) + "\n")
        with open(run.dir / "gold_unseen.jsonl", "w") as fh:
            for r in unseen:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        head = summary.set_index("group")
        run.extra.update({"train_dialogues": len(train_recs), "heldout_dialogues": len(held),
                          "unseen_gold_dialogues": len(unseen),
                          "probe_both_ok": float(pdf["ok"].mean()),
                          "eval": {g: {k: float(head.loc[g, k]) for k in ("score_mae", "unparsable_share", "satisfied_agreement",
                                                                          "leak_share", "BLEU_4", "CIDEr")}
                                   for g in ("seen", "unseen") if g in head.index}})
    return TeacherResult(dir=run.dir, model_dir=model_dir, summary=summary, turns=turns, fit=result)



@dataclass
class StudentResult:
    dir: Path
    model_dir: Path
    first_turn: Any  # DataFrame: family, n, base, student
    first_turn_difference: dict[str, float]
    refinement: Any  # DataFrame: model, AT, ADR, ATR, RR, ... (engine with the trained teacher)
    fit: FitResult


def first_turn_report(cfg, model, processor, run, base_dir: Path, ds, name: str):
    """First-turn accuracy on val against the base VLM's stage-01 answers to the same samples."""
    import pandas as pd

    from fire_core import eval as evaluate

    idx = select_per_family(ds["val"], cfg.world.seen_families, cfg.train.eval_per_family, cfg.seed)
    rows = list(ds["val"].select(sorted(idx)))
    preds = evaluate.qa_predictions(model, processor, rows, cfg.train.max_new_tokens, cfg.dialogue.batch_size,
                                    desc=f"{name} first turns", prompt="student")
    base_preds = {p["id"]: p for p in map(json.loads, open(base_dir / "predictions.jsonl")) if p["split"] == "val"}
    if not all(p["id"] in base_preds for p in preds):  # stage 01 evaluated other samples: answer them again
        base, base_proc = load_base(cfg, base_dir)
        base_preds = {p["id"]: p for p in evaluate.qa_predictions(base, base_proc, rows, cfg.train.max_new_tokens,
                                                                   cfg.dialogue.batch_size, desc="base first turns")}
    with open(run.dir / "first_turn_predictions.jsonl", "w") as fh:
        for p in preds:
            fh.write(json.dumps(p) + "\n")
    df = pd.DataFrame([{"family": p["family"], "base": base_preds[p["id"]]["correct"], name: p["correct"]}
                       for p in preds])
    table = df.groupby("family").agg(n=("base", "size"), base=("base", "mean"), **{name: (name, "mean")}).reset_index()
    table = pd.concat([pd.DataFrame([{"family": "all", "n": len(df), "base": df.base.mean(), name: df[name].mean()}]),
                       table], ignore_index=True)
    diff = evaluate.paired_difference(df.base.tolist(), df[name].tolist(), cfg.bench.n_bootstrap, cfg.bench.ci, cfg.seed)
    table.to_csv(run.dir / "first_turn_accuracy.csv", index=False, float_format="%.4f")
    return table, diff, rows


def train_student(cfg) -> StudentResult:
    """Stage 04: the FIRE100K student, trained on FIRE-100K's student turns; first-turn accuracy
    against the base VLM, and a first look at refinement with the trained teacher."""
    import pandas as pd

    from fire_core import annotate, dialogue, provenance, world
    from fire_core import eval as evaluate

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
        result, processor = _fit_from_base(cfg, base_dir, student_examples(train_recs, image_of), run, model_dir,
                                           "FIRE100K student", student_examples(held, image_of))
        table, diff, rows = first_turn_report(cfg, result.model, processor, run, base_dir, ds, "fire100k_student")
        # a first look at refinement: base and student, each with the trained teacher
        from fire_core import models

        teacher, t_proc = models.load(teacher_dir / "model")
        base, b_proc = load_base(cfg, base_dir)
        look = sorted(select_per_family(ds["val"], cfg.world.seen_families, cfg.dialogue.refine_per_family, cfg.seed + 4))
        look_rows = ds["val"].select(look)
        metrics, dialogs, look_seconds = [], [], {}
        for name, m, p in (("base", base, b_proc), ("fire100k_student", result.model, processor)):
            s_role, t_role = dialogue.roles_from_config(cfg.dialogue, m, p, teacher, t_proc, student_name=name)
            rid = lambda i, name=name: annotate.request_id(i, "refine-look", name)  # noqa: E731
            res = dialogue.run(dialogue.world_samples(look_rows, rid), s_role, t_role, cfg.dialogue, cfg.seed,
                               total=len(look_rows))
            metrics.append({"model": name, **evaluate.dialogue_metrics(res.records, cfg.dialogue.threshold,
                                                                       cfg.dialogue.max_turns)})
            look_seconds[name] = round(res.timing["total"], 1)
            dialogs += res.records
        refinement = pd.DataFrame(metrics)
        refinement.to_csv(run.dir / "refinement_first_look.csv", index=False, float_format="%.4f")
        with open(run.dir / "refinement_dialogues.jsonl", "w") as fh:
            for r in dialogs:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        run.extra.update({"train_dialogues": len(train_recs), "first_turn_accuracy": table.iloc[0].to_dict(),
                          "first_turn_difference": diff, "refinement_first_look_seconds": look_seconds,
                          "refinement_first_look": refinement.set_index("model")[["AT", "ADR", "ATR", "RR"]].to_dict("index")})
    return StudentResult(dir=run.dir, model_dir=model_dir, first_turn=table, first_turn_difference=diff,
                         refinement=refinement, fit=result)
