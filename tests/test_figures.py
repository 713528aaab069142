"""Stage 08 (figures and tables from results files only, the papers beside ours) and the HTML
report with its link check."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import copy_stages

from fire_core import config, report
from fire_core.stages import figures

FIGURES = ["dataset_stats", "free_dialogue", "solved_by_turn", "dress_multi_turn", "dress_measurements",
           "example_dialogues"]


def test_verdicts():
    assert figures.verdict([(0.3, 0.1, 0.5), (0.2, 0.05, 0.4)], [+1, +1]) == "holds"
    assert figures.verdict([(0.3, 0.1, 0.5), (0.1, -0.1, 0.3)], [+1, +1]) == "not shown (interval includes 0)"
    assert figures.verdict([(0.3, 0.1, 0.5), (-0.3, -0.5, -0.1)], [+1, +1]) == "mixed (one measure each way)"
    assert figures.verdict([(0.1, -0.1, 0.3), (-0.3, -0.5, -0.1)], [+1, +1]) == "reversed"
    assert figures.verdict([(-0.3, -0.5, -0.1)], [-1]) == "holds"  # lower is the paper's direction (AT, CHAIR)


def test_the_papers_numbers_name_their_source():
    import yaml

    papers = yaml.safe_load((config.CONF_DIR / "papers.yaml").read_text())
    assert papers["fire"]["source"] and papers["dress"]["source"]
    assert set(papers["fire"]["free_dialogue"]) == {"base", "fire100k_student", "fire_student"}
    assert {f["id"] for f in papers["dress"]["findings"]} == {"dress_more_helpful", "dress_more_honest",
                                                              "dress_more_harmless", "dress_learns_from_feedback",
                                                              "ablations_below_dress"}


@pytest.mark.slow
def test_stage_08_draws_every_figure_from_results_files(smoke_root):
    d = smoke_root / "08_make_figures"
    for stem in FIGURES:
        for ext in ("png", "pdf", "json"):
            assert (d / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
        side = json.loads((d / f"{stem}.json").read_text())
        assert side["sources"] and all(k.startswith("smoke/0") for k in side["sources"])
    manifest = json.loads((d / "manifest.json").read_text())
    assert not any(k.endswith("model") or "fire_student" in k for k in manifest["inputs"])  # no model is read
    pvo = pd.read_csv(d / "paper_vs_ours.csv", keep_default_na=False)
    assert set(pvo.paper) == {"FIRE", "DRESS"} and (pvo.source != "").all()
    verdicts = set(pvo[pvo.holds != ""].holds)
    assert verdicts and verdicts <= {"holds", "reversed", "mixed (one measure each way)", "not shown (interval includes 0)"}
    # helpful, honest, harmless, learning from feedback with 2 providers, 3 ablations
    assert len(pvo[(pvo.paper == "DRESS") & (pvo.holds != "")]) == 8
    # the free-dialogue table is stage 06's numbers, reformatted
    free = pd.read_csv(smoke_root / "06_fire_bench" / "free_dialogue.csv")
    table = pd.read_csv(d / "free_dialogue_table.csv")
    r = free[(free.subset == "all") & (free.provider == "oracle") & (free.model == "base")].iloc[0]
    t = table[(table.provider == "oracle") & (table.model == "base VLM")].iloc[0]
    assert t.ADR == f"{r.ADR:.2f} [{r.ADR_lo:.2f}, {r.ADR_hi:.2f}]"
    stats = pd.read_csv(d / "dataset_stats.csv")
    f100 = [json.loads(line) for line in open(smoke_root / "02_generate_fire100k" / "fire100k.jsonl")]
    row = stats[(stats.dataset == "FIRE-100K") & (stats.family == "all")].iloc[0]
    assert row.dialogues == len(f100)
    assert row.avg_turns == pytest.approx(sum(len(x["turns"]) for x in f100) / len(f100), abs=0.01)


@pytest.mark.slow
def test_report_opens_from_disk_with_every_figure_and_link(smoke_root, tmp_path):
    run = copy_stages(smoke_root, tmp_path, config.STAGES) / "smoke"
    index = report.build(run)
    text = index.read_text()
    assert report.broken_links(index) == []
    for stage in config.STAGES:  # every figure of every stage, and every executed notebook
        for side in (run / stage).glob("*.json"):
            if "figure" in json.loads(side.read_text()):
                assert f"../{stage}/{side.stem}.png" in text, side
        assert (index.parent / "notebooks" / f"{stage}.html").is_file()
    assert "The papers beside ours" in text and "http" not in text.split("<body>", 1)[1].split("Figures")[0]
    (run / "06_fire_bench" / "solved_by_turn.png").unlink()
    assert report.broken_links(index) == ["../06_fire_bench/solved_by_turn.png"]
    shot, note = report.screenshot(index)
    if report.chromium() is None:
        assert shot is None and "not installed" in note
    else:
        assert shot is not None and shot.stat().st_size > 10_000 and note.endswith(" 1 failed")  # the removed one
