"""Supervised fine-tuning for every training stage (base VLM, teacher, student, FIRE student).

Records become chats (``fire_core.prompts``), chats become token ids with labels masked to the
chosen role, and the Hugging Face ``Trainer`` trains a full model or a LoRA adapter on the
language model only, optionally under DeepSpeed ZeRO-2/3::

    examples = [sft.Example(prompts.student_messages(q, turns), image) for ...]
    ds = sft.SFTDataset(examples, processor, max_length=512)
    result = sft.fit(model, processor, ds, cfg.train, out_dir, seed=cfg.seed)
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

from fire_core import models, prompts, provenance, world
from fire_core.config import TrainConfig
from fire_core.vision import native_convolution

log = logging.getLogger(__name__)


IGNORE = -100


@dataclass
class Example:
    """One training chat. ``image`` is a PIL image or a zero-argument loader (saves memory)."""

    messages: list[dict[str, Any]]
    image: Image.Image | Callable[[], Image.Image]
    meta: dict[str, Any] = field(default_factory=dict)


def chat_spans(messages: Sequence[dict[str, Any]], processor) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered by the processor's own chat template (the one generation uses, ours
    for the tiny models, llama3's for LLaVA-NeXT-8B), and the character spans of its trainable
    assistant turns: each reply's content and the template's end-of-turn marker after it
    (``<|end|>``, ``<|eot_id|>``), so the model learns to stop; never the whitespace after it.

    A turn's span starts where the template's generation prompt for that turn ends, and ends
    where the chat up to that turn ends. That needs an append-only template (each shorter chat
    renders as a prefix of the longer one); one that is not raises.
    """
    clean = [{k: v for k, v in m.items() if k != "train"} for m in messages]

    def render(msgs, gen=False):
        return processor.apply_chat_template(list(msgs), add_generation_prompt=gen, tokenize=False)

    text = render(clean)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if not (m.get("train") and m["role"] == "assistant"):
            continue
        before, upto = render(clean[:i], gen=True), render(clean[:i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the processor's chat template is not append-only (a chat does not start with the "
                             f"rendering of its first {i} messages), so trained turns cannot be located in it")
        spans.append((len(before), len(upto.rstrip())))
    return text, spans


def encode(messages: Sequence[dict[str, Any]], processor, max_length: int,
           image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, list[int]]:
    """Token ids and labels for one chat, as the processor would tokenise it for generation.
    Labels keep only the trainable assistant turns and their end-of-turn token
    (:func:`chat_spans`); everything else, image tokens included, is -100. Each image
    placeholder expands to the processor's own token count for that image's (width, height)
    in ``image_sizes`` (default: the processor's square size), so anyres images of any size and
    aspect ratio line up with their features.

    Too long: cut after the last complete trainable turn that fits; else cut at ``max_length``.
    The image tokens are never cut: if they do not fit, this raises.
    """
    tokenizer = processor.tokenizer
    text, spans = chat_spans(messages, processor)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # templates write BOS themselves
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [tid if any(a <= s < b for a, b in spans) else IGNORE for tid, (s, _) in zip(ids, offsets, strict=True)]
    image_id = models.image_token_id(processor)
    n_placeholders = sum(1 for t in ids if t == image_id)
    sizes = list(image_sizes) if image_sizes is not None else [models.default_image_size(processor)] * n_placeholders
    if len(sizes) != n_placeholders:
        raise ValueError(f"the chat has {n_placeholders} image placeholders but {len(sizes)} image sizes were given")
    counts = iter([models.image_token_count(processor, sz) for sz in sizes])
    out_ids: list[int] = []
    out_labels: list[int] = []
    for tid, lab in zip(ids, labels, strict=True):
        if tid == image_id:
            n_image = next(counts)
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
        # token index just past each trained turn's last labelled token (its end-of-turn token)
        turn_ends = []
        for i in range(last_image + 1, min(len(out_ids), max_length)):
            if out_labels[i] != IGNORE and (i + 1 == len(out_ids) or out_labels[i + 1] == IGNORE):
                turn_ends.append(i + 1)
        cut = turn_ends[-1] if turn_ends else max_length
        out_ids, out_labels = out_ids[:cut], out_labels[:cut]
    return {"input_ids": out_ids, "labels": out_labels}


def example_image_size(example: Example) -> tuple[int, int]:
    """(width, height) of an example's image (a lazy loader is called once to learn it)."""
    img = example.image() if callable(example.image) else example.image
    return tuple(img.size)  # type: ignore[return-value]


class SFTDataset(torch.utils.data.Dataset):
    """Pre-tokenised chats; images are decoded when a batch is built."""

    def __init__(self, examples: Sequence[Example], processor, max_length: int):
        self.examples = list(examples)
        self.processor = processor
        self.encoded = [encode(e.messages, processor, max_length, [example_image_size(e)]) for e in self.examples]
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
            batch = {k: v.to(models.model_device(model)) for k, v in batch.items()}
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
        seed=seed, data_seed=seed, use_cpu=provenance.device().type == "cpu", bf16=tcfg.bf16, report_to="none",
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

        final, _ = models.load(save_dir, dtype=torch.float32 if provenance.device().type == "cpu" else None)
    after = heldout_loss(final, heldout, processor, tcfg.batch_size) if heldout is not None else None
    return FitResult(model=final, losses=losses, steps=trainer.state.global_step, seconds=seconds,
                     tokens=dataset.n_tokens, trainable_tokens=dataset.n_trainable_tokens,
                     resumed_from=resume_from, trainable_params=trainable,
                     heldout_loss_before=before, heldout_loss_after=after)


def base_examples(rows, cfg, rng, extras: bool = True) -> list[Example]:
    """Single-turn QA chats, some with follow-up questions about the same image and a dense
    caption (``cfg.train.followup_prob``, ``caption_prob``); with ``extras=False`` only the QA."""
    import json


    out = []
    followup_prob, caption_prob = (cfg.train.followup_prob, cfg.train.caption_prob) if extras else (0.0, 0.0)
    for r in rows:
        qa = [(r["question"], r["response"])]
        scene = json.loads(r["scene"])
        if rng.random() < followup_prob:
            for _ in range(rng.randint(1, 2)):
                qa.append(world.follow_up(scene, rng))
        if rng.random() < caption_prob:  # LLaVA's feature alignment: describe it all
            qa.insert(rng.randint(0, len(qa)), (rng.choice(world.DETAIL_QUESTIONS), world.dense_caption(scene)))
        out.append(Example(prompts.base_messages(qa), r["image"], {"id": r["id"], "family": r["family"]}))
    return out


def teacher_examples(records, image_of: Callable[[str], Any]) -> list[Example]:
    """Teacher chats: the prompt holds the question and the ground truth; loss on every reply,
    or only on the replies a record lists in ``trained_turns`` (judgement dialogues)."""

    out = []
    for r in records:
        msgs = prompts.teacher_messages(r["question"], r["answer"], prompts.record_turns(r["turns"]))
        if "trained_turns" in r:
            replies = [m for m in msgs if m["role"] == "assistant"]
            for k, m in enumerate(replies):
                m["train"] = k in r["trained_turns"]
        out.append(Example(msgs, (lambda i=r["id"]: image_of(i)), {"id": r["id"], "family": r["task"]}))
    return out


def dress_examples(records, image_of: Callable[[str], Any], critique: bool = True, refinement: bool = True
                   ) -> list[Example]:
    """DRESS conditional training chats from trajectories: each response under its rating word
    and critique, after the refinement of the turn before; loss on every response. Ablations:
    ``critique=False`` keeps the rating word alone; ``refinement=False`` keeps single-turn
    data only (each trajectory's first turn, and its reference turn as a separate chat)."""

    def chat(r, turns):
        ts = [prompts.Turn(t["response"], rating=t["rating"], critique=t["critique"], refinement=t.get("refinement"))
              for t in turns]
        return Example(prompts.dress_messages(r["question"], ts, critique=critique), (lambda i=r["id"]: image_of(i)),
                       {"id": r["id"], "family": r["task"]})

    out = []
    for r in records:
        if refinement:
            out.append(chat(r, r["turns"]))
        else:
            out.extend(chat(r, [t]) for t in r["turns"] if t is r["turns"][0] or t.get("reference"))
    return out


def student_examples(records, image_of: Callable[[str], Any]) -> list[Example]:
    """Student chats: responses with the feedback between them; loss on every response. The
    student never sees the ground truth or the scores."""

    return [Example(prompts.student_messages(r["question"], prompts.record_turns(r["turns"])),
                    (lambda i=r["id"]: image_of(i)), {"id": r["id"], "family": r["task"]}) for r in records]
