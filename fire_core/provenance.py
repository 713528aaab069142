"""Provenance for every stage: ``manifest.json`` and the ``DONE`` marker.

A stage entry point wraps its work in :func:`stage_run`::

    with provenance.stage_run(cfg, inputs=[cfg.stage_dir("00_build_world")]) as run:
        ...write files into run.dir...
        run.extra["n_samples"] = 123

On exit it writes ``<stage_dir>/manifest.json`` atomically (temp file + rename) with the git
commit and dirty flag, the resolved config and overrides, package versions, the seed, sha256
hashes of the inputs and outputs, wall time and peak memory. The notebook's last cell calls
:func:`mark_done`; the Makefile treats a stage as finished only when ``DONE`` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
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

from fire_core.config import REPO_ROOT, FireConfig, to_dict

# Files a stage writes about itself; they are not part of its hashed outputs.
BOOKKEEPING = {"manifest.json", "DONE"}
PACKAGES = ["fire_core", "torch", "transformers", "peft", "deepspeed", "datasets", "hydra-core",
            "omegaconf", "papermill", "pillow", "numpy", "openai", "pycocoevalcap", "accelerate"]


class MissingInputError(FileNotFoundError):
    """A stage's input (usually an earlier stage's output) is not there."""


@dataclass
class StageRun:
    dir: Path
    cfg: FireConfig
    inputs: list[Path]
    started: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)


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


def sha256_tree(path: Path, skip: set[str] = frozenset()) -> str:
    """One hash for a file or a folder (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in skip or rel.endswith(".ipynb") or "/." in f"/{rel}":
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
    """The output folder of an earlier stage, which must have finished (DONE written)."""
    d = cfg.stage_dir(stage)
    require(d / "DONE", f"stage {stage} output (scale={cfg.scale})",
            f"Run `make stage STAGE={stage} SCALE={cfg.scale}` first.")
    return d


@contextmanager
def stage_run(cfg: FireConfig, inputs: list[Path] | None = None) -> Iterator[StageRun]:
    """Run a stage in its folder and write its manifest when the work succeeds."""
    out = cfg.stage_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "DONE").unlink(missing_ok=True)  # a rerun is unfinished until its notebook ends
    inputs = [Path(p) for p in (inputs or [])]
    for p in inputs:
        require(p, "stage input")
    run = StageRun(dir=out, cfg=cfg, inputs=inputs)
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
        "seed": run.cfg.seed,
        "overrides": list(run.cfg.overrides),
        "config": to_dict(run.cfg),
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
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
