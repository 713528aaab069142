"""Typed configuration for every stage, composed by Hydra from ``conf/``.

All notebooks, tests and command-line tools build their configuration the same way::

    from fire_core import config
    cfg = config.load("00_build_world", ["scale=smoke", "world.image_size=64"])
    cfg.world.train_per_family   # a plain dataclass, validated

``conf/<stage>.yaml`` is the primary config of each notebook. It pulls in ``conf/base.yaml``,
whose defaults list picks one file per group (``paths``, ``world``, ``model``, ``train``,
``annotator``, ``dialogue``, ``bench``) and finally a ``scale`` file that resizes everything.
The schema below is registered in Hydra's ConfigStore, so struct mode rejects unknown keys and
OmegaConf checks types; ``__post_init__`` checks ranges. Every failure is raised as
:class:`ConfigError` with the full key in the message, before any work starts.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

# Task families of the synthetic world (see fire_core.world). Seen families have
# train/val/test splits; unseen families exist only as a test split, like FIRE-Bench's
# 8 sources that were never trained on.
SEEN_FAMILIES = ["color", "count", "spatial", "chart", "ocr", "math", "table", "choice", "caption"]
UNSEEN_FAMILIES = ["size", "odd_color", "chart_diff", "digit_sum", "quadrant"]
SCALES = ["smoke", "default", "paper", "gpu_smoke"]
# The pipeline in order; each stage reads the outputs of the ones before it (the Makefile has
# the same list).
STAGES = ["00_build_world", "01_train_base_vlm", "02_generate_fire100k", "03_train_teacher", "04_train_student",
          "05_simulate_fire1m", "06_fire_bench", "07_train_dress", "08_make_figures"]
# The config keys each stage's outputs depend on (a section name stands for all of its keys).
# A stage's identity is the hash of these values and of the identity of the stage before it, so
# an override reruns the stages that read it and every stage after them, never the ones before.
# A stage not listed here depends on every key.
# (`data` counts from stage 02 on: stages 00 and 01 never read the released files)
_TRAINING_KEYS = ["seed", "world", "model", "train", "dialogue", "data"]
STAGE_KEYS: dict[str, list[str]] = {
    "00_build_world": ["seed", "world"],
    "01_train_base_vlm": [k for k in _TRAINING_KEYS if k != "data"],
    "02_generate_fire100k": [*_TRAINING_KEYS, "annotator"],
    # stages 03-05 report paired bootstrap intervals of first-turn accuracy
    "03_train_teacher": [*_TRAINING_KEYS, "annotator"],
    "04_train_student": [*_TRAINING_KEYS, "annotator", "bench.n_bootstrap", "bench.ci"],
    "05_simulate_fire1m": [*_TRAINING_KEYS, "annotator", "bench.n_bootstrap", "bench.ci"],
    "06_fire_bench": [*_TRAINING_KEYS, "annotator", "bench"],
}


class ConfigError(ValueError):
    """A configuration that cannot be used. The message names the offending key."""


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config value '{key}' {msg}")


def _check_key_env(name: str, key: str) -> None:
    _check(re.fullmatch(r"[A-Z_][A-Z0-9_]*", name or "") is not None, key,
           f"must name an environment variable (A-Z, 0-9, _), got '{name}'; the key itself never goes in a config")


@dataclass
class PathsConfig:
    results: str = "results"  # stage outputs go to <results>/<run>/<stage>/
    # The run's folder name. None: the scale's name. The Makefile names a run with overrides
    # <scale>-<hash of the overrides>, so runs with other overrides or seeds live side by side.
    run: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.results), "paths.results", "must be a non-empty path")
        if self.run is not None:
            _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*", self.run) is not None, "paths.run",
                   f"must be a folder name (letters, digits, _ . = + -), got '{self.run}'")


@dataclass
class WorldConfig:
    image_size: int = 96  # small enough for a tiny vision tower, large enough to read text
    train_per_family: int = 3000  # seen families only
    val_per_family: int = 100  # seen families only; used for model selection, never test
    test_per_family: int = 200  # seen families
    unseen_per_family: int = 200  # unseen families (test only)
    seen_families: list[str] = field(default_factory=lambda: list(SEEN_FAMILIES))
    unseen_families: list[str] = field(default_factory=lambda: list(UNSEEN_FAMILIES))
    font_path: str | None = None  # a TrueType font; None uses Pillow's bundled font
    num_workers: int = 2  # render processes; this machine has 2 cores
    grid_examples: int = 4  # examples per family in the preview grid

    def __post_init__(self) -> None:
        _check(16 <= self.image_size <= 1024, "world.image_size", f"must be in [16, 1024], got {self.image_size}")
        for name in ("train_per_family", "val_per_family", "test_per_family", "unseen_per_family"):
            value = getattr(self, name)
            _check(value >= 1, f"world.{name}", f"must be >= 1, got {value}")
        _check(self.num_workers >= 1, "world.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(self.grid_examples >= 1, "world.grid_examples", f"must be >= 1, got {self.grid_examples}")
        for name, allowed in (("seen_families", SEEN_FAMILIES), ("unseen_families", UNSEEN_FAMILIES)):
            values = list(getattr(self, name))
            _check(len(values) > 0, f"world.{name}", "must name at least one family")
            _check(len(set(values)) == len(values), f"world.{name}", f"has duplicates: {values}")
            for v in values:
                _check(v in allowed, f"world.{name}", f"has unknown family '{v}'{_suggest(v, allowed)}; known: {allowed}")
        if self.font_path is not None:
            _check(Path(self.font_path).is_file(), "world.font_path", f"names a missing file: {self.font_path}")


IMAGE_POSITIONS = ("before_text", "after_text")  # model.image_position; fire_core.models builds each template


@dataclass
class ModelConfig:
    # The base VLM. `tiny` builds a LlavaNext-class model from these sizes and trains it from
    # scratch; `pretrained` loads `pretrained_id` (paper scale, a local folder or the HF cache);
    # `paper_like` builds the 8B's architecture and chat format at these toy sizes (GPU smoke).
    kind: str = "tiny"
    pretrained_id: str | None = None  # e.g. llava-hf/llama3-llava-next-8b-hf (paper scale)
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    vision_hidden_size: int = 128
    vision_layers: int = 2
    patch_size: int = 16
    max_length: int = 512  # tokens per training sequence, image tokens included
    dtype: str = "float32"
    # Tiny models only. `projector`: "mlp" is LLaVA-NeXT's Linear-GELU-Linear; "linear" is
    # LLaVA-1's single linear map (no GELU; the class's second layer is the identity, held fixed
    # by the stages' train.freeze_vision).
    # `tie_embeddings`: share the decoder's input and output embeddings.
    # `image_position`: where the tiny chat template puts a message's image, "before_text"
    # (LLaVA's usual layout) or "after_text" (the question first; see fire_core.models).
    projector: str = "mlp"
    tie_embeddings: bool = True
    image_position: str = "before_text"
    # `vision_output`: what the tiny tower hands the projector per patch. "features": its last
    # hidden state (LLaVA's way). "tags": the one-hot code of what its label heads read there
    # (colour, kind, character) and of the patch's region (fire_core.tagger); the heads are
    # trained by stage 01's vision pretraining. Measured (README): tags took colour-only training
    # from 44% to 84% of val, and made no difference on stage 01's nine-family mix.
    vision_output: str = "features"
    # `projector_init`: "hf" is transformers' (normal, std 0.02); "torch" is PyTorch's own
    # nn.Linear initialisation (uniform in +-1/sqrt(fan_in)), under which the image tokens start
    # at about a word embedding's norm rather than a fraction of it (README, base VLM, session 14).
    projector_init: str = "hf"
    # Sequences per batched greedy generation outside the dialogue engine (accuracy, first
    # answers, fixed-dialogue turns); the engine's own batch is dialogue.batch_size.
    generate_batch_size: int = 32

    def __post_init__(self) -> None:
        _check(self.kind in ("tiny", "pretrained", "paper_like"), "model.kind",
               f"must be 'tiny', 'pretrained' or 'paper_like', got '{self.kind}'")
        if self.kind == "pretrained":
            _check(bool(self.pretrained_id), "model.pretrained_id", "must be set when model.kind=pretrained")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "vision_hidden_size",
                     "vision_layers", "patch_size", "max_length", "generate_batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{name}", f"must be >= 1, got {value}")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size",
               f"must be divisible by model.num_heads ({self.num_heads}), got {self.hidden_size}")
        _check(self.projector in ("mlp", "linear"), "model.projector", f"must be 'mlp' or 'linear', got '{self.projector}'")
        _check(self.image_position in IMAGE_POSITIONS, "model.image_position",
               f"must be 'before_text' or 'after_text', got '{self.image_position}'")
        _check(self.kind == "tiny" or (self.projector == "mlp" and self.tie_embeddings), "model.projector",
               "model.projector and model.tie_embeddings apply to model.kind=tiny only (the others keep their own)")
        _check(self.projector_init in ("hf", "torch"), "model.projector_init",
               f"must be 'hf' or 'torch', got '{self.projector_init}'")
        _check(self.kind == "tiny" or self.projector_init == "hf", "model.projector_init",
               "applies to model.kind=tiny only (the others load or build their own)")
        _check(self.vision_output in ("features", "tags"), "model.vision_output",
               f"must be 'features' or 'tags', got '{self.vision_output}'")
        _check(self.kind == "tiny" or self.vision_output == "features", "model.vision_output",
               "applies to model.kind=tiny only (the others keep their own vision tower)")
        _check(self.kind == "tiny" or self.image_position == "before_text", "model.image_position",
               "applies to model.kind=tiny only (the others keep their own chat template)")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
               f"must be float32, bfloat16 or float16, got '{self.dtype}'")


@dataclass
class TrainConfig:
    # FIRE's recipe (LoRA r=64, alpha=256 on q_proj,k_proj, lr 2e-4, cosine, warmup 0.03,
    # 1 epoch) at paper scale; the tiny models train fully from scratch with a higher lr.
    method: str = "full"  # full | lora
    learning_rate: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    lora_r: int = 64
    lora_alpha: int = 256
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj"])
    deepspeed: str | None = None  # path to a DeepSpeed JSON under conf/deepspeed/
    bf16: bool = False
    max_per_family: int = 0  # training records per family (0: all of the train split)
    followup_prob: float = 0.3  # base VLM: share of chats that get follow-up questions
    caption_prob: float = 0.5  # base VLM: share of chats with a dense "describe it all" turn
    vision_pretrain_steps: int = 0  # tiny models: dense per-patch pretraining of the vision tower
    language_pretrain_steps: int = 0  # tiny models: text-only pretraining of the decoder (fire_core.language)
    language_pretrain_lr: float = 2e-3
    language_pretrain_batch: int = 64  # text-only documents per step (about 34 tokens each)
    language_drills: int = 20000  # answer-comparison drills in the text corpus (half same, half different)
    vision_pretrain_lr: float = 3e-3
    vision_pretrain_regions: bool = False  # also a head for each patch's region ("top left", ...)
    freeze_vision: bool = False  # LLaVA keeps its pretrained vision tower frozen
    eval_per_family: int = 100  # held-out samples per family for accuracy reports
    teacher_eval_per_family: int = 40  # stage 03: unseen-family gold dialogues, and probe samples per family
    heldout_per_family: int = 8  # stage 01: val chats per family whose loss is measured before and after training
    max_new_tokens: int = 64  # generation budget per answer
    num_threads: int = 2  # torch threads; 2 = this machine's cores
    group_by_length: bool = False  # batches of similar length: less padding for dialogues of 1-5 turns
    judgement_per_sample: int = 0  # teacher: oracle-judged dialogues per FIRE-100K sample, balanced right/wrong per turn
    judgement_warmup_steps: int = 0  # teacher: text-only steps on short judgement chats before its SFT
    # stage 01: families trained alone first (a curriculum). Measured (README, base VLM): 1,200
    # colour steps stayed at the colour plateau (53% of val) and the mix after it ended as without it.
    family_warmup: list[str] = field(default_factory=list)
    family_warmup_steps: int = 0  # stage 01: steps on family_warmup's QA chats (no captions, no follow-ups) before the mix

    def __post_init__(self) -> None:
        _check(self.method in ("full", "lora"), "train.method", f"must be 'full' or 'lora', got '{self.method}'")
        _check(0 < self.learning_rate < 1, "train.learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.lora_r >= 1, "train.lora_r", f"must be >= 1, got {self.lora_r}")
        _check(self.lora_alpha >= 1, "train.lora_alpha", f"must be >= 1, got {self.lora_alpha}")
        _check(self.max_per_family >= 0, "train.max_per_family", f"must be >= 0, got {self.max_per_family}")
        _check(0 <= self.followup_prob <= 1, "train.followup_prob", f"must be in [0, 1], got {self.followup_prob}")
        _check(0 <= self.caption_prob <= 1, "train.caption_prob", f"must be in [0, 1], got {self.caption_prob}")
        _check(self.vision_pretrain_steps >= 0, "train.vision_pretrain_steps", f"must be >= 0, got {self.vision_pretrain_steps}")
        _check(self.language_pretrain_steps >= 0, "train.language_pretrain_steps",
               f"must be >= 0, got {self.language_pretrain_steps}")
        _check(0 < self.language_pretrain_lr < 1, "train.language_pretrain_lr",
               f"must be in (0, 1), got {self.language_pretrain_lr}")
        _check(self.language_pretrain_batch >= 1, "train.language_pretrain_batch",
               f"must be >= 1, got {self.language_pretrain_batch}")
        _check(self.language_drills >= 2, "train.language_drills", f"must be >= 2, got {self.language_drills}")
        _check(0 < self.vision_pretrain_lr < 1, "train.vision_pretrain_lr", f"must be in (0, 1), got {self.vision_pretrain_lr}")
        _check(self.eval_per_family >= 1, "train.eval_per_family", f"must be >= 1, got {self.eval_per_family}")
        _check(self.teacher_eval_per_family >= 1, "train.teacher_eval_per_family",
               f"must be >= 1, got {self.teacher_eval_per_family}")
        _check(self.heldout_per_family >= 1, "train.heldout_per_family", f"must be >= 1, got {self.heldout_per_family}")
        _check(self.max_new_tokens >= 1, "train.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.num_threads >= 0, "train.num_threads", f"must be >= 0, got {self.num_threads}")
        _check(self.judgement_per_sample >= 0, "train.judgement_per_sample",
               f"must be >= 0, got {self.judgement_per_sample}")
        _check(self.judgement_warmup_steps >= 0, "train.judgement_warmup_steps",
               f"must be >= 0, got {self.judgement_warmup_steps}")
        _check(self.family_warmup_steps >= 0, "train.family_warmup_steps",
               f"must be >= 0, got {self.family_warmup_steps}")
        unknown = [f for f in self.family_warmup if f not in SEEN_FAMILIES]
        _check(not unknown, "train.family_warmup", f"names families that are not seen families: {unknown} "
               f"(seen: {list(SEEN_FAMILIES)})")
        _check(bool(self.family_warmup) == (self.family_warmup_steps > 0), "train.family_warmup",
               "and train.family_warmup_steps go together: families and a step count, or neither")
        if self.deepspeed is not None:
            path = Path(self.deepspeed)
            if not path.is_absolute():
                path = REPO_ROOT / path
            _check(path.is_file(), "train.deepspeed", f"names a missing file: {self.deepspeed}")


@dataclass
class AnnotatorConfig:
    # Who writes FIRE-100K's dialogues and the DRESS feedback: `oracle` reads the scene record
    # in-process; `openai` calls any OpenAI-compatible endpoint (its key from the environment only).
    backend: str = "oracle"
    model: str = "oracle"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding base_url's key
    concurrency: int = 8
    requests_per_minute: int = 600
    timeout_s: float = 60.0
    max_retries: int = 6
    temperature: float = 0.0
    samples_per_family: int = 600  # FIRE-100K analog: training samples per seen family
    fix_prob: float = 0.6  # oracle student: chance that a refinement gets it right
    n_shards: int = 4  # JSONL shards of the raw generation
    max_failure_rate: float = 0.2  # stop when a failure class exceeds this share of requests

    def __post_init__(self) -> None:
        _check(self.backend in ("oracle", "openai"), "annotator.backend",
               f"must be 'oracle' or 'openai', got '{self.backend}'")
        _check(self.concurrency >= 1, "annotator.concurrency", f"must be >= 1, got {self.concurrency}")
        _check(self.requests_per_minute >= 1, "annotator.requests_per_minute",
               f"must be >= 1, got {self.requests_per_minute}")
        _check(self.timeout_s > 0, "annotator.timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.max_retries >= 0, "annotator.max_retries", f"must be >= 0, got {self.max_retries}")
        _check(0 <= self.temperature <= 2, "annotator.temperature", f"must be in [0, 2], got {self.temperature}")
        _check(self.samples_per_family >= 1, "annotator.samples_per_family", f"must be >= 1, got {self.samples_per_family}")
        _check(0 <= self.fix_prob <= 1, "annotator.fix_prob", f"must be in [0, 1], got {self.fix_prob}")
        _check(self.n_shards >= 1, "annotator.n_shards", f"must be >= 1, got {self.n_shards}")
        _check(0 < self.max_failure_rate <= 1, "annotator.max_failure_rate", f"must be in (0, 1], got {self.max_failure_rate}")
        _check_key_env(self.api_key_env, "annotator.api_key_env")
        if self.base_url is not None:
            _check(re.match(r"^https?://", self.base_url) is not None, "annotator.base_url",
                   f"must start with http:// or https://, got '{self.base_url}'")


@dataclass
class DialogueConfig:
    # FIRE's free dialogue: stop at the first score >= threshold or after max_turns.
    score_min: int = 1
    score_max: int = 10
    threshold: int = 8
    max_turns: int = 5
    batch_size: int = 32  # dialogues in flight in the engine; finished ones are replaced at once
    # Who plays each role in the engine (stages 04-06): a local HF model, any OpenAI-compatible
    # endpoint (GPT-4o, a vLLM server, fire_core.serve), or for the teacher the oracle.
    student: str = "hf"  # hf | openai
    teacher: str = "hf"  # hf | openai | oracle
    student_endpoint: str | None = None  # base_url when student=openai
    student_model: str | None = None  # model name at that endpoint
    teacher_endpoint: str | None = None
    teacher_model: str | None = None
    # Each endpoint's key comes from its own environment variable: a key is only ever sent to
    # the endpoint it was made for (never OPENAI_API_KEY to a local vLLM server by accident).
    student_api_key_env: str = "FIRE_STUDENT_API_KEY"
    teacher_api_key_env: str = "FIRE_TEACHER_API_KEY"
    concurrency: int = 8  # requests in flight per role (openai)
    timeout_s: float = 60.0
    max_retries: int = 4
    student_max_new_tokens: int = 64  # responses average ~18 words
    teacher_max_new_tokens: int = 48  # "Score: N" and ~13 words of feedback
    cache_prefix: bool = True  # keep each dialogue's KV cache between turns (local models)
    # Samples per unit of resumable simulation: a killed run redoes at most one unit, whole, so
    # its batches (and float rounding) are those of an uninterrupted run. 8 batches of 64:
    # refilling freed slots keeps the batch full for all but the unit's last turns.
    resume_chunk: int = 512
    samples_per_family: int = 0  # stage 05: new train samples per seen family (0: all unused)
    heldout_fraction: float = 0.05  # stages 03-05: FIRE-100K dialogues kept out of training
    refine_per_family: int = 20  # stage 04: val samples per family for the first refinement look

    def __post_init__(self) -> None:
        _check(self.score_min < self.score_max, "dialogue.score_min",
               f"must be below dialogue.score_max ({self.score_max}), got {self.score_min}")
        _check(self.score_min <= self.threshold <= self.score_max, "dialogue.threshold",
               f"must lie on the score scale [{self.score_min}, {self.score_max}], got {self.threshold}")
        _check(self.max_turns >= 1, "dialogue.max_turns", f"must be >= 1, got {self.max_turns}")
        _check(self.batch_size >= 1, "dialogue.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.resume_chunk >= self.batch_size, "dialogue.resume_chunk",
               f"must be >= dialogue.batch_size ({self.batch_size}), got {self.resume_chunk}")
        _check(self.student in ("hf", "openai"), "dialogue.student", f"must be 'hf' or 'openai', got '{self.student}'")
        _check(self.teacher in ("hf", "openai", "oracle"), "dialogue.teacher",
               f"must be 'hf', 'openai' or 'oracle', got '{self.teacher}'")
        for role in ("student", "teacher"):
            _check_key_env(getattr(self, f"{role}_api_key_env"), f"dialogue.{role}_api_key_env")
            url = getattr(self, f"{role}_endpoint")
            if getattr(self, role) == "openai":
                _check(url is not None, f"dialogue.{role}_endpoint", f"is needed when dialogue.{role}=openai")
                _check(getattr(self, f"{role}_model") is not None, f"dialogue.{role}_model",
                       f"is needed when dialogue.{role}=openai")
            if url is not None:
                _check(re.match(r"^https?://", url) is not None, f"dialogue.{role}_endpoint",
                       f"must be an http(s) URL, got '{url}'")
        _check(self.concurrency >= 1, "dialogue.concurrency", f"must be >= 1, got {self.concurrency}")
        _check(self.timeout_s > 0, "dialogue.timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.max_retries >= 0, "dialogue.max_retries", f"must be >= 0, got {self.max_retries}")
        for k in ("student_max_new_tokens", "teacher_max_new_tokens"):
            _check(getattr(self, k) >= 1, f"dialogue.{k}", f"must be >= 1, got {getattr(self, k)}")
        _check(self.samples_per_family >= 0, "dialogue.samples_per_family",
               f"must be >= 0, got {self.samples_per_family}")
        _check(0 < self.heldout_fraction < 1, "dialogue.heldout_fraction",
               f"must be in (0, 1), got {self.heldout_fraction}")
        _check(self.refine_per_family >= 1, "dialogue.refine_per_family", f"must be >= 1, got {self.refine_per_family}")


@dataclass
class BenchConfig:
    n_bootstrap: int = 1000  # resamples for the 95% confidence intervals
    ci: float = 0.95
    per_family: int = 40  # FIRE-Bench test samples per family (seen test split and unseen families)
    extra_student_endpoint: str | None = None  # an OpenAI-compatible endpoint as one more student
    extra_student_model: str | None = None
    extra_student_api_key_env: str = "FIRE_EXTRA_STUDENT_API_KEY"

    def __post_init__(self) -> None:
        _check_key_env(self.extra_student_api_key_env, "bench.extra_student_api_key_env")
        _check(self.per_family >= 1, "bench.per_family", f"must be >= 1, got {self.per_family}")
        _check((self.extra_student_endpoint is None) == (self.extra_student_model is None), "bench.extra_student_model",
               "bench.extra_student_endpoint and bench.extra_student_model go together")
        if self.extra_student_endpoint is not None:
            _check(re.match(r"^https?://", self.extra_student_endpoint) is not None, "bench.extra_student_endpoint",
                   f"must be an http(s) URL, got '{self.extra_student_endpoint}'")
        _check(self.n_bootstrap >= 1, "bench.n_bootstrap", f"must be >= 1, got {self.n_bootstrap}")
        _check(0 < self.ci < 1, "bench.ci", f"must be in (0, 1), got {self.ci}")


@dataclass
class DressConfig:
    # stage 07 (DRESS): feedback data, conditional training and its evaluation
    feedback_per_family: int = 100  # feedback-set samples per seen family: train rows no earlier stage used
    max_turns: int = 4  # turns of a trajectory, the reference turn included (DRESS: 4)
    chunk: int = 64  # trajectories generated and stored together (the unit a rerun resumes)
    caption_lambda: float = 1.0  # the captioning regulariser's weight: describe-the-image chats per DRESS chat
    variants: list[str] = field(default_factory=lambda: ["dress", "no_critique", "no_refinement", "no_regulariser"])
    eval_per_family: int = 20  # test and unseen samples per family for every DRESS evaluation
    eval_turns: int = 4  # turns of the multi-turn interaction evaluation (DRESS figure 3)

    def __post_init__(self) -> None:
        _check(self.feedback_per_family >= 1, "dress.feedback_per_family", f"must be >= 1, got {self.feedback_per_family}")
        _check(self.max_turns >= 2, "dress.max_turns",
               f"must be >= 2 (one model turn and the reference), got {self.max_turns}")
        _check(self.chunk >= 1, "dress.chunk", f"must be >= 1, got {self.chunk}")
        _check(self.caption_lambda >= 0, "dress.caption_lambda", f"must be >= 0, got {self.caption_lambda}")
        unknown = [v for v in self.variants if v not in DRESS_VARIANTS]
        _check(not unknown and "dress" in self.variants, "dress.variants",
               f"must include 'dress' and only name {list(DRESS_VARIANTS)}, got {self.variants}")
        _check(self.eval_per_family >= 1, "dress.eval_per_family", f"must be >= 1, got {self.eval_per_family}")
        _check(self.eval_turns >= 1, "dress.eval_turns", f"must be >= 1, got {self.eval_turns}")


# DRESS and its ablations (DRESS table 6): what each keeps of the feedback in its training data
DRESS_VARIANTS = {
    "dress": {"critique": True, "refinement": True, "regulariser": True},
    "no_critique": {"critique": False, "refinement": True, "regulariser": True},  # the rating word alone
    "no_refinement": {"critique": True, "refinement": False, "regulariser": True},  # single-turn data only
    "no_regulariser": {"critique": True, "refinement": True, "regulariser": False},  # no captioning loss
}


@dataclass
class DataConfig:
    # Where samples come from. `world`: the synthetic world of stage 00. `hub`: the released
    # data in a local folder (never downloaded at run time): FIRE's files and their images.
    source: str = "world"
    dir: str | None = None  # the folder holding the released files (data.source=hub)
    image_dir: str | None = None  # the images the files name (default: <dir>/images)
    fire_train: str = "FIRE-train-100K.json"
    fire_1m: str = "FIRE-1M.json"
    fire_test: str = "FIRE-test.json"
    max_records: int = 0  # records read per file (0: all); for a first run on a large file

    def __post_init__(self) -> None:
        _check(self.source in ("world", "hub"), "data.source", f"must be 'world' or 'hub', got '{self.source}'")
        _check(self.max_records >= 0, "data.max_records", f"must be >= 0, got {self.max_records}")
        if self.source == "hub":
            _check(bool(self.dir), "data.dir", "must name the local folder with FIRE's released files when "
                   "data.source=hub (e.g. data.dir=/data/FIRE); nothing is downloaded at run time")

    def files(self) -> dict[str, Path]:
        """The released files and the image folder, by name."""
        root = Path(self.dir or ".")
        return {"fire_train": root / self.fire_train, "fire_1m": root / self.fire_1m,
                "fire_test": root / self.fire_test, "image_dir": Path(self.image_dir) if self.image_dir else root / "images"}

    def missing(self) -> list[str]:
        """The released files (and image folder) that are not where the config says; checked
        before any work by every stage and by ``make plan``."""
        if self.source != "hub":
            return []
        return [f"data.{name} -> {path}" for name, path in self.files().items()
                if not (path.is_dir() if name == "image_dir" else path.is_file())]


@dataclass
class RuntimeConfig:
    # Where the run executes; not part of any stage's identity (the manifest records the device).
    device: str = "auto"  # auto (CUDA when present, else CPU) | cuda (fail early without a GPU) | cpu

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cuda", "cpu"), "runtime.device",
               f"must be 'auto', 'cuda' or 'cpu', got '{self.device}'")


@dataclass
class FireConfig:
    stage: str = "???"  # set by each notebook's primary config
    scale: str = "default"  # set by the scale group
    seed: int = 0  # feeds world rendering, data shuffling, set_seed and simulation RNGs
    overrides: list[str] = field(default_factory=list)  # filled by load(); recorded in manifests
    paths: PathsConfig = field(default_factory=PathsConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    dialogue: DialogueConfig = field(default_factory=DialogueConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    dress: DressConfig = field(default_factory=DressConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        _check(self.scale in SCALES, "scale", f"must be one of {SCALES}, got '{self.scale}'")
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")

    def run_dir(self) -> Path:
        """Where this run's stages write: <results>/<run>/ (the run is the scale's name unless
        ``paths.run`` names it)."""
        root = Path(self.paths.results)
        if not root.is_absolute():
            root = REPO_ROOT / root
        return root / (self.paths.run or self.scale)

    def stage_dir(self, stage: str | None = None) -> Path:
        """Where a stage (this one by default) writes: <results>/<run>/<stage>/."""
        return self.run_dir() / (stage or self.stage)


ConfigStore.instance().store(name="fire_schema", node=FireConfig)


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        full = f"{prefix}{f.name}"
        keys.append(full)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_known_keys(default, full + "."))
    return keys


def _explain(exc: Exception) -> str:
    """Turn a Hydra/OmegaConf error into one line that names the key and suggests a fix."""
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    full = text + ("\n" + str(cause) if cause else "")
    key_match = re.search(r"full_key:\s*(\S+)", full)
    key = key_match.group(1) if key_match else None
    if key is None:
        m = re.search(r"Could not override '([^']+)'", full) or re.search(r"Key '([^']+)'", full)
        key = m.group(1) if m else None
    if re.search(r"Key '[^']+' (is )?not in", full) or "Could not append" in full:
        return f"unknown config key '{key}'{_suggest(key or '', _known_keys(FireConfig))}"
    if "could not be converted" in full or "Value '" in full and "of type" in full:
        first = next((ln for ln in full.splitlines() if "Value '" in ln), full.splitlines()[0])
        return f"wrong type for config key '{key}': {first.strip()}"
    if "Could not find '" in full or "In '" in full and "Could not load" in full:
        m = re.search(r"Could not (?:find|load) '([^']+)'", full)
        name = m.group(1) if m else "?"
        group = name.split("/")[0]
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        return f"no config '{name}'" + (f"; available for '{group}': {options}" if options else "")
    if cause is not None and key:
        return f"invalid value for config key '{key}': {str(cause).strip().splitlines()[0]}"
    return full.strip().splitlines()[0] if full.strip() else type(exc).__name__


def _reject_extra_keys(node: Any, schema: type, prefix: str) -> None:
    # Hydra lets `+key=value` add keys even in struct mode; the schema is the only truth.
    allowed = {f.name: f for f in fields(schema)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in allowed:
            raise ConfigError(f"unknown config key '{full}'{_suggest(full, _known_keys(FireConfig))}")
        default = allowed[key].default_factory() if callable(allowed[key].default_factory) else None  # type: ignore[misc]
        if is_dataclass(default):
            _reject_extra_keys(node[key], type(default), full + ".")


_COMPOSED: dict[tuple, FireConfig] = {}  # (name, overrides, conf files' state) -> config


def _conf_state() -> tuple:
    """Every config file's path, size and mtime: a cached composition is reused only while they hold."""
    return tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in CONF_DIR.rglob("*.yaml")))


def load(config_name: str, overrides: list[str] | None = None) -> FireConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides and return the validated config.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types, out-of-range
    values and missing files. A composition takes about 0.15 s and the pipeline's plan needs
    each stage's twice, so within a process the same name and overrides over unchanged files
    give a copy of the config composed before.
    """
    overrides = list(overrides or [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be a list of strings like 'world.image_size=64', got {overrides!r}")
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        options = sorted(p.stem for p in CONF_DIR.glob("*.yaml") if p.stem != "base")
        raise ConfigError(f"no primary config '{config_name}' in {CONF_DIR}; available: {options}")
    key = (config_name, tuple(overrides), _conf_state())
    if key in _COMPOSED:
        return copy.deepcopy(_COMPOSED[key])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="fire"):
            dcfg = compose(config_name=config_name, overrides=overrides)
        _reject_extra_keys(dcfg, FireConfig, "")
        dcfg.overrides = overrides
        cfg = OmegaConf.to_object(dcfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as exc:
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, ConfigError):
            raise ConfigError(str(inner)) from None
        raise ConfigError(_explain(exc)) from None
    assert isinstance(cfg, FireConfig)
    _COMPOSED[key] = copy.deepcopy(cfg)
    return cfg


def to_dict(cfg: FireConfig) -> dict:
    """The resolved config as plain data (for manifests)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_keys(cfg: FireConfig, stage: str | None = None) -> dict[str, Any]:
    """The flat ``key: value`` config that a stage's outputs depend on (see ``STAGE_KEYS``).
    Where results go (``paths``) and how the overrides were spelled never count."""
    stage = stage or cfg.stage
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items()
            if not k.startswith(("paths.", "runtime.")) and k not in ("stage", "overrides")}
    if flat.get("data.source") == "world":  # the hub's file names do not change a world run
        flat = {k: v for k, v in flat.items() if not k.startswith("data.") or k == "data.source"}
        flat.pop("data.source")
    wanted = STAGE_KEYS.get(stage)
    if wanted is None:
        return flat
    return {k: v for k, v in flat.items() if any(k == w or k.startswith(w + ".") for w in wanted)}
