"""The pipeline as a whole: same seed, same bytes; a SIGKILL at any stage, then a rerun, ends where
an uninterrupted run ends; other overrides never reuse stale results (fire_core.pipeline)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import copy_stages

from fire_core import config, pipeline, provenance

REPO = Path(__file__).resolve().parent.parent
SKIP = {"manifest.json", "DONE", ".attempt"}


def _outputs(stage_dir: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote (not its manifest, marker or executed notebook)."""
    return {p.relative_to(stage_dir).as_posix(): provenance.sha256_file(p)
            for p in sorted(stage_dir.rglob("*")) if p.is_file() and p.name not in SKIP and p.suffix != ".ipynb"}


def _make(root: Path, *args: str, wait: bool = True):
    cmd = ["make", "-C", str(REPO), "--no-print-directory", f"RESULTS_ROOT={root}", "SCALE=smoke", *args]
    if not wait:  # its own process group, so that SIGKILL reaches papermill and the kernel
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the stage ended before {what}: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"never saw {what}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _checkpoint(d: Path):
    return lambda: any(d.glob("checkpoints/checkpoint-*"))


def _records(d: Path):
    return lambda: any(p.stat().st_size for p in d.glob("raw/*.jsonl"))


@pytest.mark.slow
def test_a_second_run_killed_in_three_stages_gives_the_same_bytes(smoke_root, tmp_path):
    """The training stages (01, 03, 04, 05) and FIRE-1M (05) of a second run, with SIGKILL
    mid-training in 01 and 03 and mid-simulation in 05 and a rerun after each, are byte-identical
    to the first run's. (FIRE-100K, 02, is copied in: its own SIGKILL-and-rerun test in
    test_annotate.py checks its bytes.)"""
    run = tmp_path / "smoke"
    copy_stages(smoke_root, tmp_path, ["00_build_world"])  # the world's own test checks its bytes
    kills = [("01_train_base_vlm", _checkpoint, "a checkpoint of the base VLM"),
             ("03_train_teacher", _checkpoint, "a checkpoint of the teacher"),
             ("05_simulate_fire1m", _records, "the first simulated dialogues")]
    for stage, ready, what in kills:
        proc = _make(tmp_path, "stage", f"STAGE={stage}", wait=False)
        _kill_when(proc, ready(run / stage), what)
        assert not (run / stage / "DONE").exists()
        # killed mid-work: training had not saved its model; the simulation had more to do
        assert not (run / stage / ("fire_student" if stage.startswith("05") else "model")).exists()
        _make(tmp_path, "stage", f"STAGE={stage}")
        if stage == "01_train_base_vlm":  # 02 copied in, its marker newer than 01's: make keeps it
            copy_stages(smoke_root, tmp_path, ["02_generate_fire100k"])
            (run / "02_generate_fire100k" / "DONE").touch()
    for stage in [s for s in config.STAGES[1:6] if s != "02_generate_fire100k"]:
        assert (run / stage / "DONE").is_file()
        ref, got = _outputs(smoke_root / stage), _outputs(run / stage)
        assert got == ref, f"{stage}: files differ: {sorted(k for k in ref if got.get(k) != ref[k])}"
        # the manifests agree on every output hash too
        m_ref = json.loads((smoke_root / stage / "manifest.json").read_text())
        m_got = json.loads((run / stage / "manifest.json").read_text())
        assert m_got["outputs"] == m_ref["outputs"] and m_got["identity"] == m_ref["identity"]
    simulated = json.loads((run / "05_simulate_fire1m" / "manifest.json").read_text())["extra"]["simulation_run"]
    assert 0 < simulated["simulated_now"] < 54, "the rerun finished what the kill left"


def _run_name(plan_output: str) -> str:
    """The run folder the plan printed: 'run <name> in <root> ...'."""
    line = next(ln for ln in plan_output.splitlines() if ln.startswith("run "))
    return line.split()[1]


def _planned_stages(root: Path, run: str) -> list[str]:
    """The stages whose notebooks `make` would run now (a dry run)."""
    proc = subprocess.run(["make", "-C", str(REPO), "-n", "--no-print-directory", f"RESULTS_ROOT={root}",
                           "SCALE=smoke", f"RUN={run}", f"{root}/{run}/{config.STAGES[-1]}/DONE"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [s for s in config.STAGES if f"papermill notebooks/{s}.ipynb" in proc.stdout]


@pytest.mark.slow
def test_other_overrides_get_their_own_run_and_reuse_only_what_matches(smoke_root, tmp_path):
    root = copy_stages(smoke_root, tmp_path, config.STAGES)
    base = root / "smoke"
    before = {s: _outputs(base / s) for s in config.STAGES}
    out = _make(root, "plan").stdout
    assert all(f"{s}" in out for s in config.STAGES) and "stale" not in out and "to run" not in out
    assert _planned_stages(root, "smoke") == []  # everything is done

    # another seed: a run of its own, every stage to run, the seed-0 run untouched
    seed1 = ["OVERRIDES=[\"seed=1\"]"]
    out = _make(root, "plan", *seed1).stdout
    run1 = root / _run_name(out)
    assert run1.name.startswith("smoke-") and not run1.exists()  # nothing made yet
    assert out.count("to run") == len(config.STAGES), out
    _make(root, "stage", "STAGE=00_build_world", *seed1)
    assert json.loads((run1 / "00_build_world" / "manifest.json").read_text())["seed"] == 1
    assert _outputs(run1 / "00_build_world")["world_stats.csv"] != before["00_build_world"]["world_stats.csv"]
    assert _planned_stages(root, run1.name) == config.STAGES[1:]
    assert {s: _outputs(base / s) for s in config.STAGES} == before

    # a setting only stages 06-08 read: stages 00-05 are reused from the seed-0 run, 06 onwards run
    per_family = ["OVERRIDES=[\"bench.per_family=2\"]"]
    out = _make(root, "plan", *per_family).stdout
    run2 = root / _run_name(out)
    assert run2 != run1
    for s in config.STAGES[:6]:
        assert (run2 / s).is_symlink() and (run2 / s).resolve() == (base / s).resolve()
    assert _planned_stages(root, run2.name) == config.STAGES[6:]

    # a setting only stage 07 reads: 00-06 are reused, 07 and the figures made from it run
    run4 = root / _run_name(_make(root, "plan", "OVERRIDES=[\"dress.eval_per_family=1\"]").stdout)
    assert (run4 / "06_fire_bench").is_symlink() and _planned_stages(root, run4.name) == config.STAGES[7:]

    # a setting that stage 04 reads reruns 04-06 and reuses 00-03
    run3 = root / _run_name(_make(root, "plan", "OVERRIDES=[\"bench.n_bootstrap=50\"]").stdout)
    assert run3 not in (run1, run2)
    assert _planned_stages(root, run3.name) == config.STAGES[4:]

    # the same run's config changed since stage 03 finished (a conf file edited): 03-06 are
    # stale, their DONE goes, and the reason names the key
    manifest = json.loads((base / "03_train_teacher" / "manifest.json").read_text())
    manifest["identity"]["hash"] = "0" * 64
    manifest["identity"]["keys"]["train.learning_rate"] = 0.5
    provenance.write_json_atomic(base / "03_train_teacher" / "manifest.json", manifest)
    rows = pipeline.plan(root, "smoke", ["scale=smoke"], config.STAGES[-1])
    status = {r["stage"]: r for r in rows}
    assert [status[s]["status"] for s in config.STAGES] == ["done"] * 3 + ["stale"] * (len(config.STAGES) - 3)
    assert "train.learning_rate: 0.5 -> " in status["03_train_teacher"]["detail"]
    assert _planned_stages(root, "smoke") == config.STAGES[3:]
    assert (base / "03_train_teacher" / "model").is_dir()  # the plan removes markers, never results


def test_a_stage_refuses_an_upstream_made_from_another_config(smoke_root, tmp_path):
    root = tmp_path
    shutil.copytree(smoke_root / "00_build_world", root / "smoke" / "00_build_world")
    cfg = config.load("01_train_base_vlm", ["scale=smoke", f"paths.results={root}"])
    assert provenance.require_stage(cfg, "00_build_world") == root / "smoke" / "00_build_world"
    other = config.load("01_train_base_vlm", ["scale=smoke", f"paths.results={root}", "world.image_size=32"])
    with pytest.raises(provenance.StaleInputError, match=r"world\.image_size: 64 -> 32"):
        provenance.require_stage(other, "00_build_world")


def test_a_stage_folder_holds_only_what_this_run_wrote(tmp_path):
    cfg = config.load("00_build_world", ["scale=smoke", f"paths.results={tmp_path}"])
    d = cfg.stage_dir()
    (d / "raw").mkdir(parents=True)
    (d / "raw" / "part-00000.jsonl").write_text('{"request_id": "x"}\n')
    (d / "left_over.csv").write_text("from an older run\n")
    (d / "00_build_world.ipynb").write_text("{}")  # papermill's output, being written right now
    with provenance.stage_run(cfg) as run:
        (run.dir / "new.csv").write_text("a\n")
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"new.csv"}  # another identity's raw shards went too
    assert (d / "00_build_world.ipynb").is_file() and not (d / "left_over.csv").exists()
    # an unfinished run of the same identity keeps its resumable state
    (d / "raw").mkdir()
    (d / "raw" / "part-00000.jsonl").write_text('{"request_id": "x"}\n')
    with provenance.stage_run(cfg) as run:
        pass
    assert (d / "raw" / "part-00000.jsonl").is_file() and not (d / "new.csv").exists()


def test_plan_rejects_a_bad_override_list(tmp_path):
    assert pipeline.main(["plan", "--results-root", str(tmp_path), "--run", "x", "--overrides", "seed=1",
                          "smoke"]) == 2
    with pytest.raises(config.ConfigError, match="unknown stage"):
        pipeline.plan(tmp_path, "x", ["scale=smoke"], "07_nope")


@pytest.mark.slow
def test_a_launched_training_is_used_by_the_stage_and_gives_the_same_model(smoke_root, tmp_path):
    """FIRE_LAUNCH=train (what `deepspeed --num_gpus N --module fire_core.stages.teacher` runs on
    every GPU) trains stage 03's model outside the stage's folder; the stage then uses it instead
    of training again. One process here: the weights equal the smoke run's own stage 03."""
    import hashlib
    import sys

    from conftest import REPO, run_stage

    root = copy_stages(smoke_root, tmp_path, ("00_build_world", "01_train_base_vlm", "02_generate_fire100k"))
    env = {**os.environ, "FIRE_LAUNCH": "train"}
    proc = subprocess.run([sys.executable, "-m", "fire_core.stages.teacher", "scale=smoke", f"paths.results={root}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = root / "smoke" / ".launched" / "03_train_teacher"
    assert (launched / "TRAINED.json").is_file() and (launched / "model" / "model.safetensors").is_file()
    assert not (root / "smoke" / "03_train_teacher").exists()  # the stage's own folder is never touched
    run_stage("teacher", "03_train_teacher", root)
    stage = root / "smoke" / "03_train_teacher"
    extra = json.loads((stage / "manifest.json").read_text())["extra"]
    assert extra["trained_by_launch"]["world_size"] == 1
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(stage / "model" / "model.safetensors") == digest(smoke_root / "03_train_teacher" / "model" / "model.safetensors")
    assert (stage / "teacher_eval.csv").is_file() and (stage / "loss.csv").is_file()
