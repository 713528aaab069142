"""Provenance for every stage: ``manifest.json``, the ``DONE`` marker, the stage's identity and
the seeding that makes a rerun give the same bytes.

A stage entry point wraps its work in :func:`stage_run`::

    with provenance.stage_run(cfg, inputs=[cfg.stage_dir("00_build_world")]) as run:
        ...write files into run.dir...
        run.extra["n_samples"] = 123

On exit it writes ``<stage_dir>/manifest.json`` atomically (temp file + rename) with the git
commit and dirty flag, the resolved config and overrides, package versions, the seed, sha256
hashes of the inputs and outputs, wall time and peak memory. The notebook's last cell calls
:func:`mark_done`; the Makefile treats a stage as finished only when ``DONE`` exists.

**Identity.** A stage's identity is a hash of the config keys it depends on
(``config.STAGE_KEYS``) and of the identity of the stage before it, so it stands for the whole
chain of configs that made its outputs. It is written into the manifest; :func:`require_stage`
refuses an upstream folder whose identity is not the one the current config asks for (naming the
keys that differ), and ``python -m fire_core.pipeline plan`` (run by ``make``) reruns or reuses
stages by it. Code changes are not part of the identity: ``make clean`` after changing code.

**Same seed, same bytes.** :func:`stage_run` seeds Python, NumPy and torch from ``cfg.seed``, pins
torch's thread count (``train.num_threads``) and turns on torch's deterministic algorithms before
the stage's work starts, and begins from a clean folder: files of an earlier run are removed, and
only resumable state (``raw/`` shards, ``checkpoints/``) of an unfinished run with the same
identity is kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fire_core import config
from fire_core.config import REPO_ROOT, FireConfig, to_dict

# Files a stage writes about itself; they are not part of its hashed outputs.
BOOKKEEPING = {"manifest.json", "DONE"}
# What an unfinished run leaves that a rerun of the same identity resumes from: the sharded JSONL
# of generated dialogues and the Trainer's checkpoints. Everything else is rebuilt.
RESUMABLE = {"raw", "checkpoints"}
ATTEMPT = ".attempt"  # identity of the run that last started in a stage folder
PACKAGES = ["fire_core", "torch", "transformers", "peft", "deepspeed", "datasets", "hydra-core",
            "omegaconf", "papermill", "pillow", "numpy", "openai", "pycocoevalcap", "accelerate"]


class MissingInputError(FileNotFoundError):
    """A stage's input (usually an earlier stage's output) is not there."""


class StaleInputError(RuntimeError):
    """An earlier stage's output was made from another config than the one asked for now."""


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _expected(stage: str, overrides: tuple[str, ...]) -> tuple[str, str]:
    """(identity, upstream identity) of ``stage`` under ``overrides``, from the config alone."""
    idx = config.STAGES.index(stage) if stage in config.STAGES else len(config.STAGES)
    upstream = _expected(config.STAGES[idx - 1], overrides)[0] if idx > 0 else ""
    keys = config.stage_keys(config.load(stage, list(overrides)), stage)
    return _hash({"stage": stage, "keys": keys, "upstream": upstream}), upstream


def expected_identity(stage: str, overrides: list[str]) -> str:
    """The identity a stage's outputs must have under ``overrides`` (those given to
    ``config.load``): a hash of its config keys and of the stages before it."""
    return _expected(stage, tuple(overrides))[0]


def identity(cfg: FireConfig) -> dict[str, Any]:
    """This stage's identity from its actual config and the identity of the stage before it."""
    stage = cfg.stage
    idx = config.STAGES.index(stage) if stage in config.STAGES else len(config.STAGES)
    upstream = expected_identity(config.STAGES[idx - 1], list(cfg.overrides)) if idx > 0 else ""
    keys = config.stage_keys(cfg)
    return {"hash": _hash({"stage": stage, "keys": keys, "upstream": upstream}), "upstream": upstream, "keys": keys}


def stage_identity(stage_dir: Path) -> dict[str, Any] | None:
    """The identity recorded by a finished stage (None when unfinished or from older code)."""
    d = Path(stage_dir)
    if not (d / "DONE").is_file() or not (d / "manifest.json").is_file():
        return None
    try:
        return json.loads((d / "manifest.json").read_text()).get("identity")
    except (OSError, json.JSONDecodeError):
        return None


def explain_difference(recorded: dict[str, Any] | None, stage: str, overrides: list[str]) -> str:
    """Which config keys differ between a finished stage and what ``overrides`` ask for."""
    if recorded is None:
        return "it has no identity (made by older code)"
    want = config.stage_keys(config.load(stage, list(overrides)), stage)
    have = recorded.get("keys", {})
    diff = sorted(k for k in set(want) | set(have) if want.get(k, "<unset>") != have.get(k, "<unset>"))
    if diff:
        shown = ", ".join(f"{k}: {have.get(k, '<unset>')!r} -> {want.get(k, '<unset>')!r}" for k in diff[:8])
        return f"config keys differ: {shown}" + (f" (and {len(diff) - 8} more)" if len(diff) > 8 else "")
    return "a stage before it was made from another config"


# The seeds of the stages' own random choices, each derived from cfg.seed by a fixed offset so
# that two purposes never share a random stream (and a run's choices never change silently).
SEED_OFFSETS = {
    "language_drills": 1,  # stage 01: held-out answer-comparison drills
    "fire100k_samples": 2,  # stage 02: which train samples FIRE-100K annotates
    "judgement_chats": 3,  # stage 03: the teacher's text-only judgement warm-up
    "refinement_look": 4,  # stage 04: val samples of the first refinement look
    "fire1m_samples": 5,  # stage 05: which unused train samples FIRE-1M simulates
    "dress_feedback": 6,  # stage 07: which unused train samples form DRESS's feedback set
    "dress_captions": 7,  # stage 07: the captioning regulariser's questions (the same for every variant)
    "false_premise": 8,  # stage 07: the false-premise questions of the harmlessness analog
    "judgement_heldout": 9,  # stage 03: held-out (val) judgement chats that measure the warm-up
    "family_warmup": 10,  # stage 01: the family warm-up's chats (train.family_warmup)
}


def derived_seed(seed: int, purpose: str) -> int:
    """The seed for one named purpose (``SEED_OFFSETS``), derived from the run's seed."""
    if purpose not in SEED_OFFSETS:
        raise KeyError(f"no seed purpose {purpose!r}; known: {sorted(SEED_OFFSETS)}")
    return seed + SEED_OFFSETS[purpose]


def make_deterministic(seed: int, num_threads: int) -> None:
    """Seed every generator and pin what else changes floating-point results between runs: the
    thread count (reductions split by thread) and torch's choice of algorithms."""
    import numpy as np
    import torch  # imported here: the planning CLI uses this module without torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)
    # torch.use_deterministic_algorithms(True) also sets inductor's flag and so imports
    # torch._dynamo and torch._inductor: about 2 s in every stage that never loads them
    # otherwise. Nothing here compiles with inductor, so where it is not loaded only the
    # eager switch (the same call the public function makes) is set.
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=False)
    torch.backends.mkldnn.deterministic = True  # oneDNN's own switch; the line above leaves it off


@dataclass
class StageRun:
    dir: Path
    cfg: FireConfig
    inputs: list[Path]
    started: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_datasets_cache(f: Path) -> bool:
    """A cache file that the datasets library writes beside a saved dataset whenever someone
    maps or filters it (``cache-<hash>.arrow``): derived, not content, so never hashed."""
    return f.name.startswith("cache-") and f.suffix == ".arrow"


def sha256_tree(path: Path, skip: set[str] = frozenset()) -> str:
    """One hash for a file or a folder (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in skip or rel.endswith(".ipynb") or "/." in f"/{rel}" or is_datasets_cache(f):
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def git_state() -> dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = run("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}
    # results/ is ignored by git, so a stage's own outputs never make the tree dirty.
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0  # Linux reports KiB


def require(path: Path, what: str, hint: str = "") -> Path:
    """Fail with a clear message when an input is missing."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"missing input: {what} at {path}" + (f". {hint}" if hint else ""))
    return path


def require_stage(cfg: FireConfig, stage: str) -> Path:
    """The output folder of an earlier stage, which must have finished (DONE written) from the
    config that ``cfg``'s overrides ask for; otherwise a clear error, never stale data."""
    d = cfg.stage_dir(stage)
    hint = f"Run `make stage STAGE={stage} SCALE={cfg.scale}` first."
    require(d / "DONE", f"stage {stage} output (run {d.parent.name})", hint)
    recorded = stage_identity(d)
    if recorded is None or recorded.get("hash") != expected_identity(stage, list(cfg.overrides)):
        raise StaleInputError(
            f"stage {stage} in {d} was made from another config than this run asks for: "
            f"{explain_difference(recorded, stage, list(cfg.overrides))}. `make` reruns stale stages "
            f"(make stage STAGE={cfg.stage} SCALE={cfg.scale} OVERRIDES=...), or give this run its own "
            "folder with paths.run=<name>.")
    return d


def _clean_stage_dir(out: Path, ident: str) -> None:
    """Start from a folder that holds only what this run will write: files of an earlier run go;
    resumable state stays only if the unfinished run there had this same identity."""
    if out.is_symlink():  # reused from another run: never write into that run's folder
        out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    attempt = out / ATTEMPT
    same = attempt.is_file() and attempt.read_text().strip() == ident
    for p in out.iterdir():
        if p.suffix == ".ipynb" or p.name == ATTEMPT or (same and p.name in RESUMABLE):
            continue  # papermill is writing the executed notebook here right now
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    attempt.write_text(ident + "\n")


LAUNCHED = ".launched"  # <run>/.launched/<stage>/: a stage's model trained by a multi-process launch


def launch_mode() -> bool:
    """True inside ``FIRE_LAUNCH=train``: a training stage runs its training only, on every
    process of a ``deepspeed``/``torchrun``/``accelerate`` launch, into :func:`launched_dir`;
    the stage's notebook then finds the trained model there and does the rest on one process."""
    return os.environ.get("FIRE_LAUNCH", "").strip().lower() == "train"


def launched_dir(cfg: FireConfig) -> Path:
    return cfg.run_dir() / LAUNCHED / cfg.stage


def device():
    """The one device policy for training, generation and the dialogue engine: CUDA when it is
    present (the ``LOCAL_RANK``'s GPU in a multi-process launch), else the CPU.
    ``FIRE_DEVICE=cpu|cuda`` (set from ``runtime.device`` by :func:`apply_runtime`) forces it."""
    import torch

    forced = os.environ.get("FIRE_DEVICE", "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"FIRE_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
    if forced == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FIRE_DEVICE=cuda, but torch sees no CUDA device on this machine")
    if forced == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def cuda_gpu_count() -> int:
    """CUDA GPUs torch can use. Without an NVIDIA driver node (``/proc/driver/nvidia``,
    ``/dev/nvidia*``, or WSL's ``/dev/dxg``) it is 0 and torch is not imported: importing it
    costs about 3 s of every ``make`` call's plan on this machine."""
    import glob

    if not (os.path.exists("/proc/driver/nvidia") or glob.glob("/dev/nvidia*") or os.path.exists("/dev/dxg")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def runtime_problems(cfg: FireConfig) -> list[str]:
    """What stops a run of ``cfg`` on this machine before any work: a GPU it needs and does not
    see, released data files that are not there. ``make plan`` lists them; stages raise."""
    out = []
    if cfg.runtime.device == "cuda" and not cuda_gpu_count():
        out.append(f"scale={cfg.scale} runs on CUDA GPUs (runtime.device=cuda) and torch sees none on this machine")
    out += [f"data.source=hub, and a released file is missing (nothing is downloaded at run time): {m}"
            for m in cfg.data.missing()]
    return out


def apply_runtime(cfg: FireConfig) -> None:
    """Fail before any work on :func:`runtime_problems`; hand ``runtime.device`` to the device
    policy (``FIRE_DEVICE``)."""
    problems = runtime_problems(cfg)
    if problems:
        raise RuntimeError("nothing was run: " + "; ".join(problems))
    if cfg.runtime.device != "auto":
        os.environ["FIRE_DEVICE"] = cfg.runtime.device


@contextmanager
def stage_run(cfg: FireConfig, inputs: list[Path] | None = None) -> Iterator[StageRun]:
    """Run a stage in a clean folder, seeded and deterministic; write its manifest when the work
    succeeds."""
    apply_runtime(cfg)
    out = cfg.stage_dir()
    ident = identity(cfg)
    inputs = [Path(p) for p in (inputs or [])]
    for p in inputs:
        require(p, "stage input")
    if launch_mode():  # training only, on several processes: never touch the stage's own folder
        d = launched_dir(cfg)
        d.mkdir(parents=True, exist_ok=True)
        make_deterministic(cfg.seed, cfg.train.num_threads)
        yield StageRun(dir=d, cfg=cfg, inputs=inputs, identity=ident)
        return
    _clean_stage_dir(out, ident["hash"])
    make_deterministic(cfg.seed, cfg.train.num_threads)
    run = StageRun(dir=out, cfg=cfg, inputs=inputs, identity=ident)
    yield run
    write_manifest(run)


def write_manifest(run: StageRun) -> Path:
    outputs = {
        p.relative_to(run.dir).as_posix(): sha256_tree(p)
        for p in sorted(run.dir.iterdir())
        if p.name not in BOOKKEEPING and not p.name.startswith(".") and p.suffix != ".ipynb"
    }
    manifest = {
        "stage": run.cfg.stage,
        "scale": run.cfg.scale,
        "run": run.dir.parent.name,
        "identity": run.identity,
        "seed": run.cfg.seed,
        "overrides": list(run.cfg.overrides),
        "config": to_dict(run.cfg),
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device().type,
        "inputs": {str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p): sha256_tree(p, BOOKKEEPING)
                   for p in run.inputs},
        "outputs": outputs,
        "wall_time_s": round(time.time() - run.started, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"extra": run.extra} if run.extra else {}),
    }
    path = run.dir / "manifest.json"
    write_json_atomic(path, manifest)
    return path


def mark_done(cfg: FireConfig) -> Path:
    """Called by the last cell of a stage notebook: the stage is complete."""
    d = cfg.stage_dir()
    manifest = require(d / "manifest.json", f"manifest of stage {cfg.stage}",
                       "The stage's work did not finish, so it cannot be marked done.")
    path = d / "DONE"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{cfg.stage} {time.strftime('%Y-%m-%dT%H:%M:%S%z')} manifest_sha256={sha256_file(manifest)}\n")
    os.replace(tmp, path)
    return path
