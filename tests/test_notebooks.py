"""Notebook hygiene, the smoke pipeline through papermill, and no secrets anywhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from fire_core import config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
STAGES = re.findall(r"^STAGES := (.+)$", (REPO / "Makefile").read_text(), re.M)[0].split()

# Strings that look like credentials: OpenAI/Anthropic keys, HF tokens, bearer headers.
KEY_PATTERNS = [r"sk-[A-Za-z0-9_\-]{16,}", r"hf_[A-Za-z0-9]{20,}", r"Bearer\s+[A-Za-z0-9_\-\.]{16,}",
                r"OPENAI_API_KEY\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{8,}"]


def test_every_stage_has_a_notebook_and_a_config():
    assert STAGES and STAGES[0] == "00_build_world"
    for stage in STAGES:
        assert (REPO / "notebooks" / f"{stage}.ipynb").is_file()
        assert (config.CONF_DIR / f"{stage}.yaml").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    src = params[0].source
    assert re.search(r"^scale = ", src, re.M) and re.search(r"^overrides = \[\]", src, re.M)
    names = re.findall(r"^(\w+)\s*=", src, re.M)
    assert set(names) <= {"scale", "overrides", "results_root", "run_id"}, f"raw, non-secret parameters only: {names}"
    assert not any(re.search(r"key|token|secret|password", n, re.I) for n in names)
    for c in code:
        assert not re.search(r"^\s*(def|class) ", c.source, re.M), "logic belongs in fire_core"
    assert nb.metadata["kernelspec"]["name"] == "fire-core"
    assert "mark_done" in code[-1].source, "the last cell writes the DONE marker"


def _scan_for_keys(root: Path) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and p.suffix in {".ipynb", ".json", ".csv", ".txt", ".md", ".yaml", ".jsonl", ""}:
            text = p.read_text(errors="ignore")
            hits += [f"{p}: {m.group()[:12]}..." for pat in KEY_PATTERNS for m in re.finditer(pat, text)]
    return hits


def test_key_scanner_finds_keys(tmp_path):
    (tmp_path / "leak.json").write_text(json.dumps({"api_key": "sk-" + "a1B2" * 8}))
    assert _scan_for_keys(tmp_path)


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage(smoke_root):
    for stage in STAGES:
        d = smoke_root / stage
        assert (d / "DONE").is_file(), f"{stage} did not finish"
        assert (d / f"{stage}.ipynb").is_file(), "the executed notebook is kept with the results"
        m = json.loads((d / "manifest.json").read_text())
        assert m["scale"] == "smoke" and m["stage"] == stage
        nb = nbformat.read(d / f"{stage}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors


@pytest.mark.slow
def test_smoke_world_is_complete(smoke_root):
    import datasets

    ds = datasets.load_from_disk(str(smoke_root / "00_build_world" / "dataset"))
    cfg = config.load("00_build_world", ["scale=smoke"])
    assert len(ds["train"]) == cfg.world.train_per_family * len(cfg.world.seen_families)
    nb = nbformat.read(smoke_root / "00_build_world" / "00_build_world.ipynb", as_version=4)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook shows the example grid"


@pytest.mark.slow
def test_no_key_like_strings_in_results_or_notebooks(smoke_root):
    hits = _scan_for_keys(REPO / "notebooks") + _scan_for_keys(smoke_root) + _scan_for_keys(REPO / "conf")
    if (REPO / "results").is_dir():
        hits += _scan_for_keys(REPO / "results")
    assert not hits, hits


@pytest.mark.slow
def test_smoke_base_vlm_outputs(smoke_root):
    import pandas as pd

    from fire_core import models

    d = smoke_root / "01_train_base_vlm"
    cfg = config.load("01_train_base_vlm", ["scale=smoke"])
    acc = pd.read_csv(d / "accuracy.csv")
    assert set(acc.split) == {"val", "test", "unseen"}
    assert set(acc[acc.split == "unseen"].family) == set(cfg.world.unseen_families) | {"all"}
    assert ((acc.accuracy >= 0) & (acc.accuracy <= 1)).all()
    extra = json.loads((d / "manifest.json").read_text())["extra"]
    # learned: the loss on fixed held-out val chats fell, by far more than any rounding
    assert extra["heldout_loss_after"] < extra["heldout_loss_before"] - 1.0, extra
    lang = extra["language_pretraining"]  # text-only pretraining ran first, and learned
    assert lang["steps"] == cfg.train.language_pretrain_steps and lang["last_loss"] < lang["first_loss"] - 0.5
    model, proc = models.load(d / "model")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    m = json.loads((d / "manifest.json").read_text())
    assert any(k.endswith("00_build_world/dataset") for k in m["inputs"]), "inputs are hashed"
    assert {"model", "accuracy.csv", "loss_curve.png"} <= set(m["outputs"])
    never_feedback = [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]
    assert len(never_feedback) == int(acc[acc.family == "all"].n.sum())
