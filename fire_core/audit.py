"""Audit a run: every result still is what its stage made, from a commit of this repository,
and the headline numbers follow from the raw files.

    python -m fire_core.audit results/default        # make audit SCALE=default

One line per check, ``ok``, ``warn`` or ``FAIL``, naming the file; the exit status is 1 when any
check fails (``--strict``: a warning too). The checks:

- **outputs**: each stage's files hash to what its manifest recorded, the manifest to what its
  ``DONE`` recorded, and no file is there that the stage did not make;
- **inputs**: the upstream files a stage read still hash to what it recorded;
- **figures**: every figure sidecar's sources hash to what the sidecar recorded;
- **commit**: each manifest names HEAD or an ancestor of it (warn: made from a dirty tree);
- **numbers**: stage 01's accuracies, stage 06's free-dialogue metrics and stage 07's accuracies
  and CHAIR are recomputed from the raw prediction, dialogue and caption files by the public
  metric commands (``python -m fire_core.eval accuracy|free|chair``, run in-process) and compared
  with the tables.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_core import config
from fire_core import eval as evaluate
from fire_core.files import read_jsonl
from fire_core.provenance import BOOKKEEPING, is_datasets_cache, sha256_file, sha256_tree

TOLERANCE = 1e-4  # the tables are written with 4 decimals


@dataclass
class Check:
    status: str  # ok | warn | FAIL
    what: str  # the check and the file it is about
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}" + (f": {self.detail}" if self.detail else "")


def _stages(run: Path) -> list[Path]:
    return [run / s for s in config.STAGES if (run / s / "manifest.json").is_file()]


def _rel(p: Path, run: Path) -> str:
    """A path as the report names it: relative to the results root, or to the repository."""
    for base in (run.parent, config.REPO_ROOT):
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return str(p)


def check_outputs(stage: Path, manifest: dict[str, Any], run: Path) -> Iterator[Check]:
    done = stage / "DONE"
    if not done.is_file():
        yield Check("FAIL", f"done {_rel(stage, run)}", "no DONE marker: the stage did not finish")
    elif f"manifest_sha256={sha256_file(stage / 'manifest.json')}" not in done.read_text():
        yield Check("FAIL", f"manifest {_rel(stage / 'manifest.json', run)}", "changed after the stage finished")
    outputs = manifest.get("outputs", {})
    for name, digest in sorted(outputs.items()):
        p = stage / name
        if not p.exists():
            yield Check("FAIL", f"output {_rel(p, run)}", "missing")
        elif sha256_tree(p) != digest:
            yield Check("FAIL", f"output {_rel(p, run)}", "its contents differ from what the stage wrote")
        else:
            yield Check("ok", f"output {_rel(p, run)}")
    caches = [f for f in stage.rglob("cache-*.arrow") if is_datasets_cache(f)]
    if caches:
        yield Check("warn", f"output {_rel(stage, run)}", f"{len(caches)} datasets cache files were written into it "
                    f"after the stage (by a .map or .filter on its dataset; not hashed, safe to delete), e.g. "
                    f"{_rel(caches[0], run)}")
    for p in sorted(stage.iterdir()):
        if p.name not in outputs and p.name not in BOOKKEEPING and p.suffix != ".ipynb" and not p.name.startswith("."):
            yield Check("FAIL", f"output {_rel(p, run)}", "not made by the stage (not in its manifest)")


def _locate(recorded: str, run: Path) -> Path | None:
    """An input path as recorded (repository-relative or absolute) inside the audited run."""
    parts = Path(recorded).parts
    for k, part in enumerate(parts):
        if part in config.STAGES:
            return run.joinpath(*parts[k:])
    repo_file = config.REPO_ROOT / recorded  # a file of the repository (stage 08 reads conf/papers.yaml)
    return repo_file if not Path(recorded).is_absolute() and repo_file.exists() else None


def check_inputs(stage: Path, manifest: dict[str, Any], run: Path) -> Iterator[Check]:
    for recorded, digest in sorted(manifest.get("inputs", {}).items()):
        p = _locate(recorded, run)
        if p is None or not p.exists():
            yield Check("FAIL", f"input of {stage.name}", f"{recorded} is not in this run")
        elif sha256_tree(p, BOOKKEEPING) != digest:
            yield Check("FAIL", f"input {_rel(p, run)}", f"changed since {stage.name} read it")
        else:
            yield Check("ok", f"input {_rel(p, run)} of {stage.name}")


def check_figures(stage: Path, run: Path) -> Iterator[Check]:
    for side in sorted(stage.glob("*.json")):
        try:
            data = json.loads(side.read_text())
        except json.JSONDecodeError:
            continue
        if not (isinstance(data, dict) and "figure" in data and "sources" in data):
            continue
        bad = []
        for rel, digest in sorted(data["sources"].items()):
            src = run.parent / rel
            if not src.exists():
                bad.append(f"{rel} is missing")
            elif sha256_tree(src) != digest:
                bad.append(f"{rel} changed since the figure was drawn")
        bad += [f"{rel} is missing" for rel in data["figure"] if not (run.parent / rel).exists()]
        yield Check("FAIL" if bad else "ok", f"figure {_rel(side.with_suffix('.png'), run)}", "; ".join(bad))


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=config.REPO_ROOT, capture_output=True, text=True)


def check_commit(stage: Path, manifest: dict[str, Any], run: Path) -> Iterator[Check]:
    git = manifest.get("git") or {}
    commit, what = git.get("commit"), f"commit of {_rel(stage, run)}"
    if not commit:
        yield Check("warn", what, "the manifest names no commit (made outside a git checkout)")
        return
    try:
        res = _git("merge-base", "--is-ancestor", commit, "HEAD")
    except FileNotFoundError:
        yield Check("warn", what, "git is not installed: cannot check")
        return
    if res.returncode == 0:
        yield Check("ok", what, commit[:12])
    else:
        yield Check("FAIL", what, f"{commit[:12]} is not HEAD or an ancestor of it")
    if git.get("dirty"):
        yield Check("warn", what, f"made from a dirty tree (uncommitted changes on top of {commit[:12]})")


def _command(*argv: str) -> dict[str, Any]:
    """A public metric command (``python -m fire_core.eval ...``), run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main(list(argv))
    if code != 0:
        raise ValueError(err.getvalue().strip())
    return json.loads(out.getvalue())



def _compare(what: str, table: float, recomputed: float) -> Check:
    if abs(float(table) - float(recomputed)) <= TOLERANCE:
        return Check("ok", what, f"{float(table):.4f}")
    return Check("FAIL", what, f"the table says {float(table):.4f}, the raw file gives {float(recomputed):.4f}")


def _write(tmp: Path, name: str, rows: list[dict[str, Any]]) -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def check_numbers(run: Path, tmp: Path) -> Iterator[Check]:
    import pandas as pd

    base = run / "01_train_base_vlm"
    if (base / "accuracy.csv").is_file():
        acc = pd.read_csv(base / "accuracy.csv")
        preds = read_jsonl(base / "predictions.jsonl")
        for row in acc[acc.family == "all"].itertuples():
            sel = [p for p in preds if p["split"] == row.split]
            got = _command("accuracy", "--predictions", _write(tmp, f"01_{row.split}.jsonl", sel))["accuracy"]
            yield _compare(f"number {_rel(base / 'accuracy.csv', run)} {row.split} accuracy", row.accuracy, got)
    bench = run / "06_fire_bench"
    if (bench / "free_dialogue.csv").is_file():
        d = json.loads((bench / "manifest.json").read_text())["config"]["dialogue"]
        free = pd.read_csv(bench / "free_dialogue.csv")
        recs = read_jsonl(bench / "free_dialogues.jsonl")
        for row in free[free.subset == "all"].itertuples():
            sel = [{"id": r["id"], "scores": [d["score_min"] if t["score"] is None else t["score"] for t in r["turns"]]}
                   for r in recs if r["provider"] == row.provider and r["model"] == row.model]
            got = _command("free", "--dialogues", _write(tmp, f"06_{row.provider}_{row.model}.jsonl", sel),
                           "--threshold", str(d["threshold"]), "--max-turns", str(d["max_turns"]))
            for key in ("AT", "ADR", "ATR", "RR"):
                yield _compare(f"number {_rel(bench / 'free_dialogue.csv', run)} {row.provider}/{row.model} {key}",
                               getattr(row, key), got[key])
    dress = run / "07_train_dress"
    if (dress / "dress_table.csv").is_file():
        yield from _dress_numbers(run, dress, tmp)


def _dress_numbers(run: Path, dress: Path, tmp: Path) -> Iterator[Check]:
    import datasets
    import pandas as pd

    table = pd.read_csv(dress / "dress_table.csv")
    answers = read_jsonl(dress / "eval_answers.jsonl")
    captions = read_jsonl(dress / "eval_captions.jsonl")
    world = datasets.load_from_disk(str(run / "00_build_world" / "dataset"))
    scenes = {i: json.loads(s) for split in ("test", "unseen") for i, s in zip(world[split]["id"], world[split]["scene"],
                                                                               strict=True)}
    where = _rel(dress / "dress_table.csv", run)
    for row in table.itertuples():
        for subset, split in (("seen", "test"), ("unseen", "unseen")):
            sel = [a for a in answers if a["model"] == row.model and a["split"] == split]
            if sel:
                got = _command("accuracy", "--predictions", _write(tmp, f"07_{row.model}_{split}.jsonl", sel))
                yield _compare(f"number {where} {row.model} accuracy_{subset}", getattr(row, f"accuracy_{subset}"),
                               got["accuracy"])
        sel = [{"id": c["id"], "caption": c["caption"], "objects": [o["shape"] for o in scenes[c["id"]]["objects"]]}
               for c in captions if c["model"] == row.model]
        if sel:
            got = _command("chair", "--captions", _write(tmp, f"07_{row.model}_captions.jsonl", sel))
            for key in ("CHAIR_i", "CHAIR_s"):
                yield _compare(f"number {where} {row.model} {key}", getattr(row, key), got[key])


def audit(run: Path) -> list[Check]:
    """Every check on the run folder ``run`` (results/<run>)."""
    run = Path(run).absolute()
    stages = _stages(run)
    if not stages:
        return [Check("FAIL", f"run {run}", "no finished stage (no manifest.json) in it")]
    checks: list[Check] = []
    for stage in stages:
        manifest = json.loads((stage / "manifest.json").read_text())
        for part in (check_outputs(stage, manifest, run), check_inputs(stage, manifest, run),
                     check_figures(stage, run), check_commit(stage, manifest, run)):
            checks.extend(part)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            checks.extend(check_numbers(run, Path(tmp)))
        except (OSError, KeyError, ValueError) as exc:
            checks.append(Check("FAIL", "numbers", f"could not be recomputed: {exc}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fire_core.audit", description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder, e.g. results/default")
    ap.add_argument("--strict", action="store_true", help="fail on warnings too (a dirty tree)")
    ap.add_argument("--quiet", action="store_true", help="print only warnings and failures, and the summary")
    args = ap.parse_args(argv)
    checks = audit(Path(args.run))
    for c in checks:
        if not (args.quiet and c.status == "ok"):
            sys.stdout.write(c.line() + "\n")
    n = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "FAIL")}
    sys.stdout.write(f"audit {args.run}: {n['ok']} ok, {n['warn']} warnings, {n['FAIL']} failed\n")
    failed = n["FAIL"] > 0 or (args.strict and n["warn"] > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
