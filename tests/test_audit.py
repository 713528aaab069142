"""`make audit`: an untouched run passes; a tampered results file, table number or figure
source fails, naming the file."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, copy_stages

from fire_core import audit, config


def _failed(run) -> list[str]:
    return [c.line() for c in audit.audit(run) if c.status == "FAIL"]


@pytest.mark.slow
def test_audit_passes_an_untouched_run_and_names_what_was_tampered(smoke_root, tmp_path):
    root = copy_stages(smoke_root, tmp_path, config.STAGES)
    run = root / "smoke"
    checks = audit.audit(run)
    assert not _failed(run), _failed(run)
    lines = [c.line() for c in checks]
    # every kind of check ran
    for what in ("output smoke/07_train_dress/dress_table.csv", "input smoke/00_build_world/dataset of 01_train_base_vlm",
                 "figure smoke/06_fire_bench/solved_by_turn.png", "commit of smoke/05_simulate_fire1m",
                 "number smoke/06_fire_bench/free_dialogue.csv oracle/base ADR",
                 "number smoke/01_train_base_vlm/accuracy.csv test accuracy",
                 "number smoke/07_train_dress/dress_table.csv dress CHAIR_i"):
        assert any(line.startswith("ok") and what in line for line in lines), what
    assert audit.main([str(run), "--quiet"]) == 0

    # a table number edited: the file's hash and the recomputed number both say so
    table = run / "07_train_dress" / "dress_table.csv"
    text = table.read_text().splitlines()
    cells = text[1].split(",")
    col = text[0].split(",").index("accuracy_seen")
    cells[col] = f"{float(cells[col]) + 0.25:.4f}"
    table.write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    failed = _failed(run)
    assert any("output smoke/07_train_dress/dress_table.csv" in f for f in failed), failed
    assert any("dress_table.csv" in f and "accuracy_seen" in f and "the raw file gives" in f for f in failed), failed
    proc = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "audit", "SCALE=smoke",
                           f"RESULTS_ROOT={root}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "FAIL  output smoke/07_train_dress/dress_table.csv" in proc.stdout

    # a raw dialogue file edited: its hash, the figure drawn from it, and the stage that read it
    dialogues = run / "06_fire_bench" / "free_dialogues.jsonl"
    recs = [json.loads(line) for line in dialogues.open()]
    recs[0]["turns"][0]["score"] = 10 if recs[0]["turns"][0]["score"] != 10 else 1
    dialogues.write_text("".join(json.dumps(r) + "\n" for r in recs))
    failed = _failed(run)
    assert any("output smoke/06_fire_bench/free_dialogues.jsonl" in f for f in failed), failed
    assert any("figure smoke/06_fire_bench/example_dialogues.png" in f for f in failed), failed

    # a datasets cache written into the world's folder (someone mapped it): a warning, not a failure
    (run / "00_build_world" / "dataset" / "train" / "cache-0123abcd.arrow").write_bytes(b"derived")
    assert any(c.status == "warn" and "datasets cache" in c.detail for c in audit.audit(run))

    # a file the stage never made
    (run / "03_train_teacher" / "extra.csv").write_text("x\n")
    assert any("extra.csv" in f and "not made by the stage" in f for f in _failed(run))


def test_audit_of_an_empty_folder_fails_clearly(tmp_path):
    assert audit.main([str(tmp_path)]) == 1
    assert "no finished stage" in audit.audit(tmp_path)[0].detail
