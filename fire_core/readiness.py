"""Before a run: can every stage start here, and what will each one cost?

``make plan SCALE=paper`` (and the first step of ``make reproduce``) composes every stage's
config and checks, without loading a weight or sending a request:

- the model: ``model.pretrained_id`` is a local folder, or already in the Hugging Face cache
  (nothing is downloaded at run time);
- the data: with ``data.source=hub``, the released files and the image folder are in
  ``data.dir``;
- the endpoints: every OpenAI-compatible role that a stage calls has its key variable set
  (the key itself is never printed);
- the device: a run that needs CUDA (``runtime.device=cuda``, as at ``scale=paper``) sees a GPU.

It then prints what each stage will do, with an estimate of its GPU memory and time. The
estimates are arithmetic, not measurements: parameters counted from the model's config on the
meta device; bf16 weights (2 bytes per parameter); LoRA training as 4 FLOPs per parameter per
token (forward, and backward through activations only), full fine-tuning as 6, generation as 2;
``--gpu-tflops`` (default 312, an A100's bf16 peak) at ``--mfu`` (default 0.35) utilisation,
split over the GPUs; ZeRO-3 splits the frozen weights across them. Anything missing is listed
together and the plan fails (exit 3) before any stage runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fire_core import config, provenance

# tokens per training sequence at paper scale: LLaVA-NeXT's anyres image (up to 5 tiles of 576)
# plus a multi-turn FIRE dialogue (measured on nothing here: an assumption the plan prints)
PAPER_IMAGE_TOKENS = 2880
PAPER_TEXT_TOKENS = 400


@dataclass
class Readiness:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)


def _model_config(mcfg: config.ModelConfig):
    """The model's transformers config from a local folder or the HF cache (never the network);
    None when it is in neither."""
    from transformers import AutoConfig

    src = mcfg.pretrained_id or ""
    if Path(src).is_dir():
        return AutoConfig.from_pretrained(src)
    try:
        return AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError):
        return None


def _param_count(model_cfg) -> int:
    import torch
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(model_cfg)
    return sum(p.numel() for p in model.parameters())


def count_records(path: Path, cap: int = 0, chunk: int = 1 << 24) -> int:
    """Records in a released file (JSON array or JSONL), counted by streaming the bytes for the
    one ``"conversations"`` key each record has: FIRE-1M is 1.9 GB, too big to parse for a plan."""
    key, tail, n = b'"conversations"', b"", 0
    with open(path, "rb") as fh:
        while part := fh.read(chunk):
            buf = tail + part
            n += buf.count(key)
            tail = buf[-(len(key) - 1):]  # too short to hold a whole key: one cut by the chunk is counted next time
    return min(n, cap) if cap else n


def check(overrides: list[str], upto: str, gpus: int | None = None, gpu_tflops: float = 312.0,
          mfu: float = 0.35) -> Readiness:
    """Compose every stage up to ``upto`` with ``overrides`` and check what it needs."""
    out = Readiness()
    cfgs = {}
    for stage in config.STAGES[: config.STAGES.index(upto) + 1]:
        try:
            cfgs[stage] = config.load(stage, overrides)
        except config.ConfigError as exc:
            out.problems.append(f"{stage}: {exc}")
    if not cfgs:
        return out
    cfg = next(iter(cfgs.values()))
    n_gpu = gpus if gpus is not None else provenance.cuda_gpu_count()
    out.problems += provenance.runtime_problems(cfg)  # the GPU and the released files, as every stage checks them
    # the model
    n_params, dims = None, None
    if cfg.model.kind == "pretrained":
        mc = _model_config(cfg.model)
        if mc is None:
            out.problems.append(
                f"model.pretrained_id={cfg.model.pretrained_id} is neither a local folder nor in the Hugging Face cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); nothing is downloaded at run time: "
                f"fetch it once (huggingface-cli download {cfg.model.pretrained_id}) or point model.pretrained_id at "
                "its folder")
        else:
            n_params = _param_count(mc)
            dims = (mc.text_config.hidden_size, mc.text_config.num_hidden_layers)
            out.notes.append(f"model {cfg.model.pretrained_id}: {n_params / 1e9:.2f}B parameters "
                             f"({type(mc).__name__}, vision {mc.vision_config.model_type}, text {mc.text_config.model_type})")
    # endpoints
    seen: set[tuple[str, str]] = set()
    for stage, c in cfgs.items():
        calls = []
        if stage == "02_generate_fire100k" and c.data.source == "world" and c.annotator.backend == "openai":
            calls.append(("annotator", c.annotator.base_url, c.annotator.api_key_env))
        if stage in ("04_train_student", "05_simulate_fire1m", "06_fire_bench", "07_train_dress"):
            for role in ("student", "teacher"):
                if getattr(c.dialogue, role) == "openai":
                    calls.append((f"dialogue.{role}", getattr(c.dialogue, f"{role}_endpoint"),
                                  getattr(c.dialogue, f"{role}_api_key_env")))
        for who, url, env in calls:
            if (url, env) in seen:
                continue
            seen.add((url, env))
            if not os.environ.get(env):
                out.problems.append(f"{stage}: {who} calls {url} and reads its key from {env}, which is not set")
    # what each stage does, and its cost
    for stage, c in cfgs.items():
        out.stages.append({"stage": stage, **_estimate(stage, c, n_params, dims, max(n_gpu, 1), gpu_tflops, mfu)})
    return out


def _examples(stage: str, c: config.FireConfig) -> tuple[str, int | None]:
    """(what the stage does, training or generation sequences) for the run's data source."""
    fams = len(c.world.seen_families)
    if c.data.source == "hub":
        files = c.data.files()
        count = lambda name: count_records(files[name], c.data.max_records) if files[name].is_file() else None  # noqa: E731
        return {
            "00_build_world": ("renders the world's extra test families", c.world.test_per_family * fams),
            "01_train_base_vlm": ("loads and evaluates the base VLM", c.train.eval_per_family * fams * 3),
            "02_generate_fire100k": ("reads FIRE-train-100K as FIRE-100K", count("fire_train")),
            "03_train_teacher": ("LoRA-trains the teacher on FIRE-100K's teacher turns", count("fire_train")),
            "04_train_student": ("LoRA-trains the FIRE100K student", count("fire_train")),
            "05_simulate_fire1m": ("simulates student x teacher dialogues, trains the FIRE student", count("fire_1m")),
            "06_fire_bench": ("FIRE-Bench on FIRE-test, teacher-judged", count("fire_test")),
        }.get(stage) or _world_examples(stage, c)
    return _world_examples(stage, c)


def _world_examples(stage: str, c: config.FireConfig) -> tuple[str, int | None]:
    fams = len(c.world.seen_families)
    per = c.train.max_per_family or c.world.train_per_family
    return {
        "00_build_world": ("renders the synthetic world", None),
        "01_train_base_vlm": ("trains (tiny) or loads (pretrained) the base VLM", per * fams),
        # how many dialogues stages 02-05 keep is only known once they ran (FIRE's filter)
        "02_generate_fire100k": ("base VLM first answers + annotator dialogues", None),
        "03_train_teacher": ("trains the teacher", None),
        "04_train_student": ("trains the FIRE100K student", None),
        "05_simulate_fire1m": ("simulates FIRE-1M, trains the FIRE student", None),
        "06_fire_bench": ("FIRE-Bench: fixed and free dialogues", c.bench.per_family * (fams + len(c.world.unseen_families))),
        "07_train_dress": ("DRESS trajectories, 4 variants, evaluation", c.dress.feedback_per_family * fams),
        "08_make_figures": ("figures and tables from results files", None),
    }.get(stage, ("", None))


def _estimate(stage: str, c: config.FireConfig, n_params: int | None, dims: tuple[int, int] | None, n_gpu: int,
              tflops: float, mfu: float) -> dict[str, Any]:
    what, n = _examples(stage, c)
    row: dict[str, Any] = {"does": what, "sequences": n, "gpu_mem_gb": None, "hours": None}
    if n_params is None or dims is None or n is None or stage in ("00_build_world", "08_make_figures"):
        return row
    tokens = n * (PAPER_IMAGE_TOKENS + PAPER_TEXT_TOKENS) * c.train.epochs
    weights_gb = 2 * n_params / 1e9
    trains = stage in ("03_train_teacher", "04_train_student", "05_simulate_fire1m", "07_train_dress")
    generates = stage in ("01_train_base_vlm", "05_simulate_fire1m", "06_fire_bench") or (
        stage == "02_generate_fire100k" and c.data.source == "world")  # at hub, stage 02 only reads a file
    if not (trains or generates):
        return row
    flops = 0.0
    if trains:
        flops += (4 if c.train.method == "lora" else 6) * n_params * tokens
    if generates:  # prefill plus about 64 new tokens per turn, up to max_turns turns
        flops += 2 * n_params * n * (PAPER_IMAGE_TOKENS + PAPER_TEXT_TOKENS + 64) * c.dialogue.max_turns
    hours = flops / (n_gpu * tflops * 1e12 * mfu) / 3600
    zero3 = bool(c.train.deepspeed) and "zero3" in str(c.train.deepspeed)
    per_gpu = weights_gb / n_gpu if (trains and zero3) else weights_gb
    if trains:  # activations of one micro-batch, bf16, no gradient checkpointing: ~34 bytes per hidden unit,
        # token and layer (Korthikanti et al. 2022, without the attention-score term)
        hidden, layers = dims
        per_gpu += 34 * hidden * layers * (PAPER_IMAGE_TOKENS + PAPER_TEXT_TOKENS) * c.train.batch_size / 1e9
    row.update(gpu_mem_gb=round(per_gpu, 1), hours=round(hours, 2))
    return row


def report(r: Readiness, n_gpu_text: str) -> str:
    lines = [f"readiness ({n_gpu_text}):"]
    lines += [f"  note: {n}" for n in r.notes]
    width = max((len(s["stage"]) for s in r.stages), default=10)
    for s in r.stages:
        cost = ""
        if s["hours"] is not None:
            cost = f"  ~{s['gpu_mem_gb']} GB/GPU, ~{s['hours']} h"
        seqs = f" ({s['sequences']:,} sequences)" if s["sequences"] else ""
        lines.append(f"  {s['stage']:<{width}}  {s['does']}{seqs}{cost}")
    if any(s["hours"] is not None for s in r.stages):
        lines.append(f"  estimates assume {PAPER_IMAGE_TOKENS}+{PAPER_TEXT_TOKENS} tokens per sequence; "
                     "see fire_core/readiness.py for the arithmetic")
    if r.problems:
        lines.append("cannot start; fix these first:")
        lines += [f"  - {p}" for p in r.problems]
    return "\n".join(lines) + "\n"
