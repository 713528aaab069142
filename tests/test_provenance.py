"""fire_core.provenance and fire_core.plots: manifests, DONE markers, traceable figures."""

from __future__ import annotations

import json
import os

import matplotlib.pyplot as plt
import pytest

from fire_core import config, plots, provenance


@pytest.fixture
def cfg(tmp_path):
    return config.load("00_build_world", ["scale=smoke", f"paths.results={tmp_path}", "seed=5"])


def test_stage_run_writes_a_complete_manifest(cfg, tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("hello")
    with provenance.stage_run(cfg, inputs=[src]) as run:
        (run.dir / "out.txt").write_text("result")
        run.extra["n"] = 3
    m = json.loads((run.dir / "manifest.json").read_text())
    assert m["seed"] == 5 and m["scale"] == "smoke" and m["stage"] == "00_build_world"
    assert m["config"]["seed"] == 5 and m["overrides"] == cfg.overrides
    assert m["outputs"] == {"out.txt": provenance.sha256_file(run.dir / "out.txt")}
    assert list(m["inputs"].values()) == [provenance.sha256_file(src)]
    assert m["extra"] == {"n": 3}
    for key in ("git", "packages", "python", "wall_time_s", "peak_rss_mb", "finished_at"):
        assert key in m
    assert oct((run.dir / "manifest.json").stat().st_mode)[-3:] == "644"


def test_failed_stage_writes_no_manifest_and_cannot_be_marked_done(cfg):
    with pytest.raises(RuntimeError), provenance.stage_run(cfg) as run:
        raise RuntimeError("boom")
    assert not (run.dir / "manifest.json").exists()
    with pytest.raises(provenance.MissingInputError, match="did not finish"):
        provenance.mark_done(cfg)


def test_rerun_clears_done_until_finished(cfg):
    with provenance.stage_run(cfg):
        pass
    done = provenance.mark_done(cfg)
    assert done.read_text().startswith("00_build_world ")
    with provenance.stage_run(cfg) as run:
        assert not (run.dir / "DONE").exists()  # unfinished while running


def test_missing_stage_input_names_the_stage_and_the_fix(cfg):
    with pytest.raises(provenance.MissingInputError) as info:
        provenance.require_stage(cfg, "00_build_world")
    assert "make stage STAGE=00_build_world SCALE=smoke" in str(info.value)
    with pytest.raises(provenance.MissingInputError, match="missing input"):
        with provenance.stage_run(cfg, inputs=[cfg.stage_dir() / "nope.json"]):
            pass


def test_atomic_json_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.json"
    provenance.write_json_atomic(path, {"a": 1})
    provenance.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


def test_tree_hash_tracks_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("1")
    h1 = provenance.sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("2")
    assert provenance.sha256_tree(tmp_path / "d") != h1


def test_figures_are_byte_reproducible_with_a_sidecar(cfg, tmp_path):
    src = tmp_path / "data.csv"
    src.write_text("x,y\n1,2\n")
    outs = []
    for k in range(2):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [3, 1, 2])
        outs.append(plots.save(fig, tmp_path / f"fig{k}", sources=[src], cfg=cfg))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert a.read_bytes() == b.read_bytes()
    side = json.loads((tmp_path / "fig0.json").read_text())
    assert side["seed"] == 5 and side["stage"] == "00_build_world"
    assert list(side["sources"].values()) == [provenance.sha256_file(src)]


def test_a_figure_never_overwrites_its_own_source(cfg, tmp_path):
    data = tmp_path / "curves.json"  # a data file named like the figure's sidecar
    data.write_text('{"turn": [1, 2]}')
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="overwrite its source"):
        plots.save(fig, tmp_path / "curves", sources=[data], cfg=cfg)
    assert data.read_text() == '{"turn": [1, 2]}' and not (tmp_path / "curves.png").exists()
    plt.close(fig)


def test_tree_hash_ignores_the_caches_datasets_writes_beside_a_saved_dataset(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "train" / "data-00000-of-00001.arrow").write_bytes(b"rows")
    h1 = provenance.sha256_tree(tmp_path / "d")
    (tmp_path / "d" / "train" / "cache-0123abcd.arrow").write_bytes(b"a .map() result")
    assert provenance.sha256_tree(tmp_path / "d") == h1
    (tmp_path / "d" / "train" / "cached-rows.arrow").write_bytes(b"not a datasets cache")
    assert provenance.sha256_tree(tmp_path / "d") != h1


def test_conversation_figures_show_every_word(cfg, tmp_path):
    long = " ".join(f"word{k}" for k in range(120))  # far wider than one line
    panels = [{"image": None, "title": f"panel {p}", "messages": [("question", "Q", "What color is the star?"),
                                                                 ("left", "turn 1", long), ("right", "critique", "x")]}
              for p in range(3)]
    fig = plots.conversations(panels, columns=2)
    shown = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert all(f"word{k}" in shown.split() for k in range(120)) and shown.count("panel") == 3
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one panel"):
        plots.conversations([])


def test_make_deterministic_turns_on_torchs_deterministic_algorithms_without_loading_inductor():
    """In a fresh interpreter, as a stage starts: the switch is on, and torch._inductor (2 s to
    import) is not loaded by it."""
    import subprocess
    import sys

    code = ("import sys, torch; from fire_core import provenance; provenance.make_deterministic(0, 1); "
            "print(torch.are_deterministic_algorithms_enabled(), 'torch._inductor.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
