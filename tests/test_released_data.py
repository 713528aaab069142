"""Loaders of the released data (FIRE's files in both conversation layouts, DRESS's LVLM_NLF
is in test_dress) on fixture files written in those formats, and the readiness check that
``make plan`` runs before any stage (models, data, keys, device)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fire_core import models, pipeline, records

FIX = Path(__file__).parent / "fixtures" / "fire"


def test_fire_layout_becomes_internal_records():
    recs = records.load_fire(FIX / "FIRE-train-100K.json", FIX / "images")
    assert [r["id"] for r in recs] == ["fire100k-000001", "fire100k-000002"]
    r = recs[0]
    assert r["question"] == "What color is the square in the corner?" and r["task"] == "llava"
    assert r["turns"] == [
        {"response": "The square is red.", "score": 3,
         "feedback": "Look at the small square in the top left corner, not the background."},
        {"response": "The square in the corner is green.", "score": 9, "feedback": "Correct, the small square is green."}]
    assert r["answer"] == "" and r["meta"]["schema"] == "fire"
    assert records.missing_images(recs) == (0, [])
    assert records.open_image(r["image"]).size == (64, 48)


def test_test_file_carries_the_ground_truth():
    [r] = records.load_fire(FIX / "FIRE-test.json", FIX / "images", split="test")
    assert r["answer"] == "blue" and r["split"] == "test" and r["turns"][-1]["score"] == 10


def test_llava_layout_from_jsonl():
    [r] = records.load_fire(FIX / "FIRE-1M.json", FIX / "images")
    assert r["question"] == "What shape is drawn in the corner?" and r["meta"]["schema"] == "llava"
    assert r["turns"] == [{"response": "A circle.", "score": None, "feedback": "Look at its corners: a circle has none."},
                          {"response": "It is a square.", "score": None, "feedback": ""}]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("conversations"), "needs a non-empty 'conversations' list"),
    (lambda r: r.pop("question"), "has no question"),
    (lambda r: r["conversations"][1].update(value="Looks fine to me."), "no readable 'Score: N'"),
    (lambda r: r["conversations"].insert(0, r["conversations"][1]), "a teacher turn where a student turn belongs"),
    (lambda r: r.pop("image"), "has no 'image'"),
])
def test_malformed_fire_records_name_the_record_and_the_fault(tmp_path, mutate, message):
    data = json.loads((FIX / "FIRE-train-100K.json").read_text())
    mutate(data[1])
    bad = tmp_path / "FIRE-train-100K.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"FIRE-train-100K.json: record 1: .*{message}"):
        records.load_fire(bad)


def test_llava_layout_needs_the_image_in_the_first_human_turn(tmp_path):
    row = json.loads((FIX / "FIRE-1M.json").read_text().splitlines()[0])
    row["conversations"][0]["value"] = "What shape is drawn?"
    bad = tmp_path / "FIRE-1M.json"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="line 1: the first turn .* with <image> in it"):
        records.load_fire(bad)


def test_missing_file_and_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="FIRE file not found: .*FIRE-1M.json"):
        records.load_fire(tmp_path / "FIRE-1M.json")
    recs = records.load_fire(FIX / "FIRE-train-100K.json", tmp_path)
    n, first = records.missing_images(recs)
    assert n == 2 and first[0].endswith("coco/000000000139.jpg")
    with pytest.raises(FileNotFoundError, match="image not found: .*0a1b2c3d.jpg"):
        records.open_image(recs[1]["image"])


# ----------------------------------------------------------------------------- make plan
@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("paper_like")
    for part in models.build_paper_like(["What color is the star?"] * 20):
        part.save_pretrained(d)
    return d


def _plan(tmp_path, overrides, capsys, scale="paper", gpus="8"):
    rc = pipeline.main(["plan", "--results-root", str(tmp_path), "--run", "r", "--gpus", gpus,
                        "--overrides", json.dumps(overrides), scale])
    return rc, capsys.readouterr().out


def test_plan_at_paper_scale_with_local_model_and_data(tmp_path, paper_dir, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-printed")
    rc, out = _plan(tmp_path, [f"model.pretrained_id={paper_dir}", "data.source=hub", f"data.dir={FIX}",
                               "runtime.device=cpu"], capsys)
    assert rc == 0, out
    assert "reads FIRE-train-100K as FIRE-100K (2 sequences)" in out
    assert "FIRE-Bench on FIRE-test, teacher-judged (1 sequences)" in out
    assert "GB/GPU" in out and " h" in out and "parameters (LlavaNextConfig, vision clip_vision_model, text llama)" in out
    assert "sk-test-not-printed" not in out
    assert not (tmp_path / "r").exists()  # a plan of stages to run creates nothing


def test_plan_lists_everything_missing_and_fails_before_any_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "FIRE-train-100K.json").write_text("[]")
    rc, out = _plan(tmp_path, ["model.pretrained_id=/nonexistent/llava", "data.source=hub", f"data.dir={data}"], capsys)
    assert rc == 3
    assert "model.pretrained_id=/nonexistent/llava is neither a local folder nor in the Hugging Face cache" in out
    assert f"data.fire_test -> {data / 'FIRE-test.json'}" in out and f"data.fire_1m -> {data / 'FIRE-1M.json'}" in out
    assert "data.image_dir" in out
    assert not (tmp_path / "r").exists()  # nothing marked, linked or run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_gpu_smoke_says_it_needs_a_gpu_and_stops(tmp_path, capsys):
    rc, out = _plan(tmp_path, [], capsys, scale="gpu_smoke", gpus="0")
    assert rc == 3 and "scale=gpu_smoke runs on CUDA GPUs (runtime.device=cuda) and torch sees none on this machine" in out
    from fire_core import config, provenance
    with pytest.raises(RuntimeError, match="nothing was run: scale=gpu_smoke runs on CUDA GPUs .* torch sees none"):
        provenance.apply_runtime(config.load("00_build_world", ["scale=gpu_smoke", f"paths.results={tmp_path}"]))
    assert os.environ.get("FIRE_DEVICE") != "cuda"


@pytest.mark.parametrize("chunk", [7, 15, 1 << 24])
def test_plan_counts_released_records_across_read_chunks(tmp_path, chunk):
    from fire_core import readiness

    rows = json.loads((FIX / "FIRE-train-100K.json").read_text()) * 37
    path = tmp_path / "FIRE-1M.json"
    path.write_text(json.dumps(rows))
    assert readiness.count_records(path, 0, chunk) == 74 and readiness.count_records(path, 10, chunk) == 10
