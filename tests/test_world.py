"""fire_core.world: determinism, answerability from the scene record and the pixels, the
answer checker on tricky cases, and the saved dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fire_core import checker, config, world
from fire_core.checker import is_correct
from fire_core.stages import world as stage_world
from fire_core.world import COLORS, FAMILIES, SHAPES


# ----------------------------------------------------------------------------- answerability
def derive(scene: dict) -> str:
    """Re-derive the answer from the scene record alone (independent of the generators)."""
    q, size = scene["query"], scene["size"]
    objs = scene.get("objects", [])
    by_name = {f"{o['color']} {o['shape']}": o for o in objs}
    t = q["type"]
    if t == "color_of":
        (o,) = [o for o in objs if o["shape"] == q["shape"]]  # exactly one such shape
        return o["color"]
    if t == "count":
        return str(sum(1 for o in objs if q["color"] in (None, o["color"]) and q["shape"] in (None, o["shape"])))
    if t in ("lr", "ab"):
        assert len(by_name) == len(objs), "names must identify objects"
        a, b = by_name[q["a"]], by_name[q["b"]]
        axis = "x" if t == "lr" else "y"
        assert abs(a[axis] - b[axis]) >= 0.15 * size, "the relation must be clear"
        if t == "lr":
            return "left" if a["x"] < b["x"] else "right"
        return "above" if a["y"] < b["y"] else "below"
    if t == "extreme":
        sign = {"left": ("x", 1), "right": ("x", -1), "top": ("y", 1), "bottom": ("y", -1)}[q["side"]]
        ranked = sorted(objs, key=lambda o: sign[1] * o[sign[0]])
        assert abs(ranked[0][sign[0]] - ranked[1][sign[0]]) >= 6
        assert len({o["shape"] for o in objs}) == len(objs)
        return ranked[0]["shape"]
    bars = scene.get("chart", {}).get("bars", [])
    vals = {b["label"]: b["value"] for b in bars}
    if t == "bar_value":
        return str(vals[q["label"]])
    if t in ("bar_max", "bar_min"):
        best = (max if t == "bar_max" else min)(vals.values())
        (label,) = [k for k, v in vals.items() if v == best]
        return label
    if t == "bar_diff":
        return str(abs(vals[q["a"]] - vals[q["b"]]))
    if t == "bar_sum":
        return str(sum(vals.values()))
    if t == "read":
        return scene["text"]["value"]
    if t == "arithmetic":
        a, b = q["a"], q["b"]
        assert scene["text"]["value"] == f"{a} {q['op']} {b} = ?"
        return str({"+": a + b, "-": a - b, "x": a * b}[q["op"]])
    if t == "digit_sum":
        return str(sum(int(c) for c in scene["text"]["value"]))
    tab = scene.get("table")
    if t == "cell":
        return str(tab["cells"][tab["rows"].index(q["row"])][tab["cols"].index(q["col"])])
    if t == "row_max":
        row = tab["cells"][tab["rows"].index(q["row"])]
        assert sorted(row)[-1] != sorted(row)[-2]
        return str(max(row))
    if t == "choice_color":
        (o,) = [o for o in objs if o["shape"] == q["shape"]]
        return "ABCD"[q["options"].index(o["color"])]
    if t == "choice_shape":
        (o,) = [o for o in objs if o["color"] == q["color"] and o["region"] == q["region"]]
        return "ABCD"[q["options"].index(o["shape"])]
    if t == "caption":
        return " | ".join(sorted(f"{o['color']} {o['shape']}" for o in objs))
    if t in ("largest", "smallest"):
        rs = sorted(objs, key=lambda o: o["r"], reverse=(t == "largest"))
        assert rs[0]["r"] != rs[1]["r"]
        return rs[0]["shape"]
    if t == "odd_color":
        colors = [o["color"] for o in objs]
        (odd,) = [o for o in objs if colors.count(o["color"]) == 1]
        assert len(set(colors)) == 2
        return odd["shape"]
    if t == "quadrant":
        o = by_name[q["target"]]
        assert min(abs(o["x"] - size / 2), abs(o["y"] - size / 2)) >= o["r"]
        return f"{'top' if o['y'] < size / 2 else 'bottom'} {'left' if o['x'] < size / 2 else 'right'}"
    raise AssertionError(f"no derivation for query type {t}")


def check_pixels(sample: world.Sample) -> None:
    """The image shows what the scene record says."""
    img, scene = sample.image, sample.scene
    px = img.load()
    if scene["kind"] == "shapes":
        for o in scene["objects"]:
            assert px[round(o["x"]), round(o["y"])] == COLORS[o["color"]], (sample.id, o)
    elif scene["kind"] == "chart":
        c = scene["chart"]
        x0, x1, y0, y1 = c["plot"]
        unit = (y1 - y0) / c["y_max"]
        rgb = COLORS[c["color"]]
        for b in c["bars"]:
            mid = round((b["x0"] + b["x1"]) / 2)
            top = y1 - b["value"] * unit
            assert px[mid, round(top + 2)] == rgb, (sample.id, b)  # just inside the bar
            assert px[mid, round(top - 2)] != rgb, (sample.id, b)  # just above it
    elif scene["kind"] == "text":
        x0, y0, x1, y1 = scene["text"]["bbox"]
        ink, bg = world.TEXT_COLORS[scene["text"]["color"]], tuple(scene["background"])

        def inky(p):  # antialiased: nearer the ink than the background
            return sum((a - b) ** 2 for a, b in zip(p, ink, strict=True)) < sum((a - b) ** 2 for a, b in zip(p, bg, strict=True))

        inside = {(x, y) for x in range(max(0, x0), min(img.width, x1)) for y in range(max(0, y0), min(img.height, y1))}
        assert sum(inky(px[x, y]) for x, y in inside) >= 5, sample.id  # the text is drawn in its box
        outside = [(x, y) for x in range(img.width) for y in range(img.height) if (x, y) not in inside]
        assert not any(inky(px[x, y]) for x, y in outside), sample.id  # and nowhere else


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", [64, 96])
def test_every_answer_follows_from_the_scene(family, size):
    for i in range(60):
        s = world.make_sample(family, "test", i, seed=3, size=size)
        got = derive(s.scene)
        if family == "caption":
            assert got == " | ".join(sorted(re.findall(r"(?:a|an) (\w+ \w+)", s.answer))), s
        else:
            assert got == s.answer, (s.id, s.question, s.scene)
        check_pixels(s)
        assert s.image.size == (size, size) and s.image.mode == "RGB"
        # the reference response gives the answer, and the checker accepts it
        assert is_correct(family, s.response, s.answer), (s.id, s.response, s.answer)
        assert s.annotation.startswith(f"A {size}x{size} image.")


def test_questions_vary_within_a_family():
    for family in FAMILIES:
        stems = {re.sub(r"\b(" + "|".join(list(COLORS) + SHAPES) + r")\b", "_", world.make_sample(family, "train", i, 0, 96).question.split("\n")[0])
                 for i in range(80)}
        assert len(stems) >= 2, (family, stems)


def test_samples_are_deterministic_and_seed_dependent():
    a = world.make_sample("chart", "train", 5, seed=0, size=96)
    b = world.make_sample("chart", "train", 5, seed=0, size=96)
    c = world.make_sample("chart", "train", 5, seed=1, size=96)
    assert a.image.tobytes() == b.image.tobytes() and a.scene == b.scene and a.question == b.question
    assert a.scene != c.scene


# ----------------------------------------------------------------------------- checker
@pytest.mark.parametrize(
    "family, prediction, answer, expected",
    [
        ("count", "There are five stars. The answer is five.", "5", True),
        ("count", "The answer is 5.0", "5", True),
        ("count", "I see 3 red and 2 blue shapes, so the answer is 2.", "3", False),
        ("count", "3", "3", True),
        ("count", "", "3", False),
        ("count", "I cannot tell.", "3", False),
        ("ocr", "It reads 1,024. The answer is 1,024.", "1024", True),
        ("math", "The image shows 3 + 5 = 8", "8", True),
        ("math", "The answer is 12.5", "12", False),
        ("math", "So the answer is 12.", "12", True),
        ("digit_sum", "4 + 8 + 6 = 18", "18", True),
        ("choice", "B", "B", True),
        ("choice", "(b)", "B", True),
        ("choice", "The answer is C.", "C", True),
        ("choice", "Option d", "D", True),
        ("choice", "B. red", "B", True),
        ("choice", "The square is red, which is option A. The answer is A.", "B", False),
        ("choice", "red", "B", False),
        ("color", "Red.", "red", True),
        ("color", "The circle is red.", "red", True),
        ("color", "The colour is RED", "red", True),
        ("color", "It is red or blue.", "red", False),
        ("color", "The answer is blue.", "red", False),
        ("spatial", "The answer is left.", "left", True),
        ("spatial", "to the left", "left", True),
        ("spatial", "The red circle is left of the blue square", "left", False),
        ("spatial", "The answer is triangles.", "triangle", True),
        ("quadrant", "It is in the upper left.", "top left", True),
        ("quadrant", "top-left corner", "top left", True),
        ("quadrant", "The answer is top right.", "top left", False),
        ("quadrant", "left", "top left", False),
        ("caption", "A blue square and a red circle.", "a red circle and a blue square", True),
        ("caption", "From left to right: a red circle at the top, a blue square.", "a red circle and a blue square", True),
        ("caption", "A red circle.", "a red circle and a blue square", False),
        ("caption", "A red circle, a blue square and a green star.", "a red circle and a blue square", False),
        ("caption", "Two red circles.", "a red circle and a red circle", True),
        ("ocr", 'The text says "lamp". The answer is lamp.', "lamp", True),
        ("ocr", "LAMP", "lamp", True),
        ("ocr", "The answer is lame.", "lamp", False),
        ("chart", "Reading the bars, bee is 9. The answer is bee.", "bee", True),
        ("chart", "The answer is 9.", "bee", False),
    ],
)
def test_is_correct(family, prediction, answer, expected):
    assert is_correct(family, prediction, answer) is expected


def test_is_correct_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'colour'"):
        is_correct("colour", "red", "red")


def test_extract_answer():
    assert checker.extract_answer("Blah. So the answer is 3.5 apples. Extra.") == "3.5 apples"
    assert checker.extract_answer("No marker here. Just this") == "Just this"
    assert checker.extract_answer("The answer: C") == "C"


# ----------------------------------------------------------------------------- the dataset
TINY = ["scale=smoke", "world.train_per_family=12", "world.val_per_family=3", "world.test_per_family=3",
        "world.unseen_per_family=3"]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for name, extra in [("a", ["world.num_workers=2"]), ("b", ["world.num_workers=1"]), ("c", ["seed=1"])]:
        root = tmp_path_factory.mktemp(name)
        cfg = config.load("00_build_world", [*TINY, f"paths.results={root}", *extra])
        out[name] = (cfg, stage_world.run(cfg))
    return out


def test_same_seed_gives_byte_identical_datasets(built):
    (_, a), (_, b) = built["a"], built["b"]  # also: 2 workers and 1 worker agree
    fa, fb = _files(a.dataset_dir), _files(b.dataset_dir)
    assert fa.keys() == fb.keys() and len(fa) >= 4
    assert fa == fb
    assert a.stats_csv.read_bytes() == b.stats_csv.read_bytes()
    assert a.grid[0].read_bytes() == b.grid[0].read_bytes()  # figures are reproducible too
    assert a.grid[1].read_bytes() == b.grid[1].read_bytes()


def test_different_seed_differs(built):
    (_, a), (_, c) = built["a"], built["c"]
    fa, fc = _files(a.dataset_dir), _files(c.dataset_dir)
    arrow = [k for k in fa if k.endswith(".arrow")]
    assert arrow and all(fa[k] != fc[k] for k in arrow)


def test_dataset_splits_and_contents(built):
    import datasets

    cfg, res = built["a"]
    ds = datasets.load_from_disk(str(res.dataset_dir))
    assert set(ds) == {"train", "val", "test", "unseen"}
    assert len(ds["train"]) == 12 * len(cfg.world.seen_families)
    assert len(ds["unseen"]) == 3 * len(cfg.world.unseen_families)
    assert set(ds["train"]["family"]) == set(cfg.world.seen_families)
    assert set(ds["test"]["family"]) == set(cfg.world.seen_families)
    assert set(ds["unseen"]["family"]) == set(cfg.world.unseen_families)
    assert all(ds["unseen"]["seen"]) is False and all(ds["train"]["seen"])
    assert isinstance(ds["train"].features["image"], datasets.Image)
    row = ds["test"][0]
    assert row["image"].size == (cfg.world.image_size, cfg.world.image_size)
    scene = json.loads(row["scene"])
    assert derive(scene) == row["answer"] or row["family"] == "caption"
    ids = [i for s in ds for i in ds[s]["id"]]
    assert len(ids) == len(set(ids))


def test_no_test_sample_repeats_a_training_sample(built):
    import datasets

    _, res = built["a"]
    ds = datasets.load_from_disk(str(res.dataset_dir))

    def keys(split):
        return {(r["family"], r["question"], r["scene"]) for r in ds[split].select_columns(["family", "question", "scene"])}

    train = keys("train")
    assert not (train & keys("test")) and not (train & keys("val")) and not (keys("val") & keys("test"))


def test_statistics_csv(built):
    import pandas as pd

    cfg, res = built["a"]
    stats = pd.read_csv(res.stats_csv)
    assert set(stats.columns) >= {"split", "family", "n", "question_words_mean", "answer_words_mean", "response_words_mean"}
    train = stats[stats.split == "train"]
    assert set(train.family) == set(cfg.world.seen_families) and (train.n == 12).all()
    assert (stats.response_words_mean > stats.answer_words_mean).all()


def test_manifest_records_the_run(built):
    cfg, res = built["a"]
    m = json.loads((res.dir / "manifest.json").read_text())
    assert m["stage"] == "00_build_world" and m["scale"] == "smoke" and m["seed"] == 0
    assert m["config"]["world"]["train_per_family"] == 12
    assert m["overrides"] == cfg.overrides
    assert {"dataset", "world_stats.csv", "world_examples.png"} <= set(m["outputs"])
    assert m["packages"]["torch"].startswith("2.13.0") and m["wall_time_s"] > 0 and m["peak_rss_mb"] > 0
    assert set(m["git"]) == {"commit", "dirty"}
    sidecar = json.loads((res.dir / "world_examples.json").read_text())
    assert any(k.endswith("world_stats.csv") for k in sidecar["sources"]) and sidecar["seed"] == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_caption_and_follow_ups_are_true_to_the_scene(family):
    import random

    for i in range(20):
        s = world.make_sample(family, "train", i, seed=4, size=96)
        cap = world.dense_caption(s.scene)
        kind = s.scene["kind"]
        if kind == "shapes":
            assert checker.objects_in(cap) == checker.objects_in(" and ".join(f"a {o['color']} {o['shape']}" for o in s.scene["objects"]))
        elif kind == "chart":
            assert all(f"{b['label']} is {b['value']}" in cap for b in s.scene["chart"]["bars"])
        elif kind == "table":
            assert all(", ".join(map(str, row)) in cap for row in s.scene["table"]["cells"])
        else:
            assert f'"{s.scene["text"]["value"]}"' in cap
        q, a = world.follow_up(s.scene, random.Random(i))
        assert q.endswith("?") and "The answer is" in a


@pytest.mark.parametrize("family", ["color", "count", "chart", "ocr", "table", "caption"])
def test_patch_labels_match_the_pixels(family):
    grid = 6
    for i in range(15):
        s = world.make_sample(family, "train", i, seed=5, size=96)
        labels = world.patch_labels(s.scene, grid)
        assert len(labels) == grid * grid
        px = s.image.load()
        cell = 96 // grid
        shown = 0
        for k, (c, kind, _ch) in enumerate(labels):
            gi, gj = divmod(k, grid)
            pixels = [px[x, y] for x in range(gj * cell, (gj + 1) * cell) for y in range(gi * cell, (gi + 1) * cell)]
            name = world.PATCH_COLORS[c]
            if name in COLORS:  # a labelled colour really is painted in that cell
                assert pixels.count(COLORS[name]) >= 4, (s.id, k, name)
                shown += 1
            if world.PATCH_KINDS[kind] in ("text", "table"):  # ink under a character label
                assert any(sum(p) < 400 for p in pixels), (s.id, k)
                shown += 1
        assert shown > 0, s.id
