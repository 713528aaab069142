"""Plan a pipeline run before ``make`` runs its stages: which stages are done, which can be reused
from another run, and which must (re)run because their config or an earlier stage changed.

    python -m fire_core.pipeline plan --results-root results --run default --upto 06_fire_bench \\
        --overrides '["seed=1"]' scale=default

The Makefile calls this first. For every stage up to ``--upto``, in pipeline order:

- **done**: ``<results>/<run>/<stage>/DONE`` exists and its manifest's identity is the one the
  config asks for (``fire_core.provenance.identity``);
- **stale**: it exists from another config, or a stage before it reruns; its ``DONE`` is
  removed, so ``make`` reruns it. The reason names the keys that differ;
- **reused**: another run under the same results root finished this stage with the same
  identity (say, a run that changed only a later stage's settings): the stage folder becomes a
  symbolic link to that run's folder, and nothing is recomputed. A stage that reruns replaces
  the link with a folder of its own; the other run's files are never written;
- **to run**: nothing usable exists.

Only ``DONE`` markers and links are touched; results are never deleted here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from fire_core import config, provenance, readiness

log = logging.getLogger(__name__)


def _donor(root: Path, run: str, stage: str, want: str) -> Path | None:
    """A finished folder of ``stage`` in another run under ``root`` with identity ``want``."""
    if not root.is_dir():
        return None
    for other in sorted(p for p in root.iterdir() if p.is_dir() and p.name != run):
        d = other / stage
        if d.is_dir() and not d.is_symlink():
            rec = provenance.stage_identity(d)
            if rec is not None and rec.get("hash") == want:
                return d
    return None


def plan(results_root: Path, run: str, overrides: list[str], upto: str) -> list[dict[str, str]]:
    """Bring ``<results_root>/<run>`` to a state where ``make`` reruns exactly the stale stages.
    ``overrides`` are those the notebooks will pass to ``config.load`` (scale included)."""
    if upto not in config.STAGES:
        raise config.ConfigError(f"unknown stage '{upto}'; stages: {config.STAGES}")
    root = Path(results_root)
    run_dir = root / run
    rows = []
    reruns = False  # once a stage (re)runs, every stage after it does too
    for stage in config.STAGES[: config.STAGES.index(upto) + 1]:
        want = provenance.expected_identity(stage, overrides)
        d = run_dir / stage
        if reruns:
            if d.is_symlink():
                d.unlink()
            elif (d / "DONE").exists():
                (d / "DONE").unlink()
                rows.append({"stage": stage, "status": "stale", "detail": "a stage before it reruns"})
                continue
            rows.append({"stage": stage, "status": "to run", "detail": ""})
            continue
        if d.is_symlink():
            rec = provenance.stage_identity(d) if d.exists() else None
            if rec is not None and rec.get("hash") == want:
                rows.append({"stage": stage, "status": "reused", "detail": os.readlink(d)})
                continue
            d.unlink()  # the other run changed or is gone; this run makes its own
        rec = provenance.stage_identity(d) if d.is_dir() else None
        if rec is not None and rec.get("hash") == want:
            rows.append({"stage": stage, "status": "done", "detail": ""})
            continue
        reruns = True
        if (d / "DONE").exists():
            (d / "DONE").unlink()
            rows.append({"stage": stage, "status": "stale",
                         "detail": provenance.explain_difference(rec, stage, overrides)})
            continue
        donor = _donor(root, run, stage, want) if not d.exists() else None
        if donor is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            d.symlink_to(Path("..") / donor.parent.name / stage, target_is_directory=True)
            rows.append({"stage": stage, "status": "reused", "detail": os.readlink(d)})
            reruns = False
            continue
        rows.append({"stage": stage, "status": "to run", "detail": ""})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fire_core.pipeline", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="mark stale stages, reuse finished ones, print what make will do")
    p.add_argument("--results-root", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--upto", default=config.STAGES[-1])
    p.add_argument("--overrides", default="[]", help="a YAML list, as OVERRIDES in the Makefile")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the ones torch sees)")
    p.add_argument("--no-check", action="store_true", help="skip the readiness check (models, data, keys, device)")
    p.add_argument("scale")
    args = ap.parse_args(argv)
    try:
        extra = yaml.safe_load(args.overrides) or []
        if not isinstance(extra, list):
            raise config.ConfigError(f"OVERRIDES must be a YAML list like '[\"seed=1\"]', got {args.overrides!r}")
        overrides = [f"scale={args.scale}", *map(str, extra)]
        ready = None if args.no_check else readiness.check(overrides, args.upto, gpus=args.gpus)
        if ready is not None and ready.problems:  # nothing marked or linked: fail before any stage
            sys.stdout.write(readiness.report(ready, _gpu_text(args.gpus)))
            return 3
        rows = plan(Path(args.results_root), args.run, overrides, args.upto)
    except (config.ConfigError, yaml.YAMLError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    width = max(len(r["stage"]) for r in rows)
    sys.stdout.write(f"run {args.run} in {args.results_root} (overrides {json.dumps(extra)}):\n")
    for r in rows:
        sys.stdout.write(f"  {r['stage']:<{width}}  {r['status']:<7} {r['detail']}\n")
    if ready is not None:
        sys.stdout.write(readiness.report(ready, _gpu_text(args.gpus)))
    return 0


def _gpu_text(gpus: int | None) -> str:
    if gpus is not None:
        return f"planned for {gpus} GPU(s)"
    n = provenance.cuda_gpu_count()
    return f"{n} CUDA GPU(s) visible" if n else "no CUDA GPU visible; CPU"


if __name__ == "__main__":
    sys.exit(main())
