"""Stage 07 (DRESS): the feedback set, the trajectories, the training data of each variant, the
evaluation table against its raw files, and a resumed generation."""

from __future__ import annotations

import json
import shutil

import pytest

from fire_core import config, dress, feedback, metrics, models, prompts, records, world
from fire_core import eval as evaluate
from fire_core.client import Tally
from fire_core.files import ShardStore
from fire_core.stages import dress as stage_dress

MODELS = ["base", "fire100k_student", "fire_student", "dress", "no_critique", "no_refinement", "no_regulariser"]


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_variants_are_checked():
    with pytest.raises(config.ConfigError, match="dress.variants"):
        config.load("07_train_dress", ["scale=smoke", "dress.variants=[no_critique]"])  # DRESS itself is missing
    with pytest.raises(config.ConfigError, match="dress.variants"):
        config.load("07_train_dress", ["scale=smoke", "dress.variants=[dress,no_critic]"])
    with pytest.raises(config.ConfigError, match="dress.max_turns"):
        config.load("07_train_dress", ["scale=smoke", "dress.max_turns=1"])


def test_an_exhausted_train_split_fails_with_what_to_change():
    import datasets

    cfg = config.load("07_train_dress", ["scale=smoke"])
    train = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "family": ["color", "color", "count"]})
    with pytest.raises(ValueError, match="no unused train samples.*world.train_per_family"):
        stage_dress.feedback_rows(cfg, train, used={"a", "b", "c"})


def test_single_turn_prompts():
    with pytest.raises(ValueError, match="prompt must be one of"):
        evaluate.single_turn("What color is the star?", "teacher")
    msgs = evaluate.single_turn("What color is the star?", "dress")
    assert msgs[-1]["role"] == "user" and prompts.BEST_CONDITION in json.dumps(msgs[-1]["content"])
    assert prompts.BEST_CONDITION not in json.dumps(evaluate.single_turn("What color is the star?", "base"))


@pytest.mark.slow
def test_feedback_set_is_disjoint_from_every_earlier_stage(smoke_root):
    trajs = _jsonl(smoke_root / "07_train_dress" / "dress_feedback.jsonl")
    ids = {t["id"] for t in trajs}
    assert trajs and len(ids) == len(trajs)
    base_ids = set(json.loads((smoke_root / "01_train_base_vlm" / "train_ids.json").read_text()))
    f100 = {r["id"] for r in ShardStore(smoke_root / "02_generate_fire100k" / "raw").records()}
    f1m = {r["id"] for r in ShardStore(smoke_root / "05_simulate_fire1m" / "raw").records()}
    assert base_ids and f100 and f1m
    assert not ids & base_ids and not ids & f100 and not ids & f1m
    cfg = config.load("07_train_dress", ["scale=smoke"])
    assert {t["task"] for t in trajs} == set(cfg.world.seen_families)
    assert {t["split"] for t in trajs} == {"train"}


@pytest.mark.slow
def test_trajectories_follow_the_dress_rules(smoke_root):
    cfg = config.load("07_train_dress", ["scale=smoke"])
    trajs = _jsonl(smoke_root / "07_train_dress" / "dress_feedback.jsonl")
    reasons = set()
    for t in trajs:
        turns = t["turns"]
        model_turns = [x for x in turns if not x["reference"]]
        ratings = [x["rating"] for x in model_turns]
        assert 1 <= len(turns) <= cfg.dress.max_turns and model_turns and all(r in (1, 2, 3, 4) for r in ratings)
        assert all(x["reason"] and x["critique"] and x["refinement"] for x in model_turns)
        assert not any(feedback.leaks_answer(x["refinement"], t["answer"], t["task"], t["question"])
                       for x in model_turns if x["rating"] < 4)
        for k in range(1, len(ratings)):  # another turn only after a continuing rating
            assert dress.continues(ratings[:k], cfg.dress.max_turns)
        assert t["stop"] == dress.stop_reason(ratings)
        reasons.add(t["stop"])
        went_on = len(model_turns) > 1 or ratings[0] <= 2
        assert turns[-1]["reference"] == (went_on and ratings[-1] < 4)
        if turns[-1]["reference"]:
            ref = turns[-1]
            assert ref["rating"] == 4 and ref["critique"] == prompts.BEST_CRITIQUE
    assert "no_improvement" in reasons  # the smoke base VLM is mostly wrong: trajectories go on, then stop


@pytest.mark.slow
def test_each_variant_trains_on_its_own_data(smoke_root):
    cfg = config.load("07_train_dress", ["scale=smoke"])
    d = smoke_root / "07_train_dress"
    summary = json.loads((d / "dress.json").read_text())
    trajs = [t for t in _jsonl(d / "dress_feedback.jsonl") if not records.is_heldout(t["id"], cfg.dialogue.heldout_fraction)]
    tr = summary["training"]
    assert set(tr) == set(cfg.dress.variants)
    singles = sum(1 + (len(t["turns"]) > 1 and t["turns"][-1]["reference"]) for t in trajs)
    for name, chats in (("dress", len(trajs)), ("no_critique", len(trajs)), ("no_refinement", singles)):
        assert tr[name]["caption_chats"] == round(cfg.dress.caption_lambda * chats)
        assert tr[name]["chats"] == chats + tr[name]["caption_chats"]
    assert tr["no_regulariser"]["caption_chats"] == 0 and tr["no_regulariser"]["chats"] == len(trajs)
    for info in tr.values():
        assert info["heldout_loss_after"] < info["heldout_loss_before"]
    for name in cfg.dress.variants:
        assert (d / "models" / name / "DONE").is_file()


@pytest.mark.slow
def test_the_table_is_what_the_raw_files_say(smoke_root):
    cfg = config.load("07_train_dress", ["scale=smoke", f"paths.results={smoke_root.parent}"])
    import pandas as pd

    d = smoke_root / "07_train_dress"
    table = pd.read_csv(d / "dress_table.csv").set_index("model")
    assert list(table.index) == MODELS
    answers, captions = _jsonl(d / "eval_answers.jsonl"), _jsonl(d / "eval_captions.jsonl")
    premises = _jsonl(d / "eval_premises.jsonl")
    worlds = world.load(cfg)
    scene = {r["id"]: json.loads(r["scene"]) for split in ("test", "unseen") for r in worlds[split]}
    for name in MODELS:
        mine = [a for a in answers if a["model"] == name]
        seen = [a["correct"] for a in mine if a["split"] == "test"]
        assert table.loc[name, "accuracy_seen"] == pytest.approx(sum(seen) / len(seen), abs=1e-4)
        caps = [c for c in captions if c["model"] == name]
        ch = metrics.chair([c["caption"] for c in caps], [[o["shape"] for o in scene[c["id"]]["objects"]] for c in caps],
                           n_bootstrap=10)
        assert table.loc[name, "CHAIR_i"] == pytest.approx(ch["CHAIR_i"], abs=1e-4)
        assert table.loc[name, "CHAIR_s"] == pytest.approx(ch["CHAIR_s"], abs=1e-4)
        prem = [p for p in premises if p["model"] == name]
        assert table.loc[name, "premise_safe"] == pytest.approx(sum(p["safe"] for p in prem) / len(prem), abs=1e-4)
        for key in ("accuracy_seen", "helpfulness_seen", "CHAIR_i", "premise_safe", "score_t4_oracle"):
            assert table.loc[name, f"{key}_lo"] - 1e-9 <= table.loc[name, key] <= table.loc[name, f"{key}_hi"] + 1e-9
        assert 1 <= table.loc[name, "helpfulness_seen"] <= 10
    curves = json.loads((d / "multi_turn_scores.json").read_text())
    assert set(curves) == {f"{p}/{m}" for p in ("oracle", "teacher") for m in MODELS}
    assert all(c["turn"] == [1, 2, 3, 4] for c in curves.values())
    dialogues = _jsonl(d / "eval_dialogues.jsonl")
    oracle_dress = [r for r in dialogues if r["provider"] == "oracle" and r["model"] == "dress"]
    again = metrics.score_curve(oracle_dress, 4, cfg.dialogue.score_min, n_bootstrap=10)
    assert again["mean"] == pytest.approx(curves["oracle/dress"]["mean"])
    free = pd.read_csv(d / "free_dialogue.csv")
    assert len(free) == 2 * len(MODELS) and set(free.provider) == {"oracle", "teacher"}
    again = metrics.dialogue_metrics(oracle_dress, cfg.dialogue.threshold, 4)
    assert free[(free.provider == "oracle") & (free.model == "dress")].iloc[0].RR == pytest.approx(again["RR"], abs=1e-4)
    for p in ("score_curves.png", "loss_curve.png", "paired_accuracy.csv", "feedback_stats.csv", "07_train_dress.ipynb",
              "example_trajectories.png"):
        assert (d / p).is_file()


@pytest.mark.slow
def test_generation_resumes_to_the_same_trajectories(smoke_root, tmp_path):
    cfg = config.load("07_train_dress", ["scale=smoke", f"paths.results={smoke_root.parent}", "dress.chunk=4"])
    ds = world.load(cfg)
    used = set(json.loads((smoke_root / "01_train_base_vlm" / "train_ids.json").read_text()))
    rows = stage_dress.feedback_rows(cfg, ds["train"], used)
    rows = rows.select(range(min(10, len(rows))))
    model, processor = models.load(smoke_root / "01_train_base_vlm" / "model")
    whole = tmp_path / "whole"
    stage_dress.generate_trajectories(cfg, rows, model, processor, whole, Tally())
    broken = tmp_path / "broken"
    shutil.copytree(whole, broken)
    store = ShardStore(broken / "raw", cfg.annotator.n_shards)
    shard = max(store.shards(), key=lambda p: p.stat().st_size)
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    counts = stage_dress.generate_trajectories(cfg, rows, model, processor, broken, Tally())
    assert counts["torn_bytes_dropped"] > 0 and counts["skipped_done"] < len(rows)

    def load(p):
        return sorted(ShardStore(p / "raw", cfg.annotator.n_shards).records(), key=lambda r: r["id"])

    assert load(broken) == load(whole) and len(load(whole)) == len(rows)


def test_example_trajectories_prefer_refinements_from_different_families():
    def traj(i, fam, n):
        return {"id": i, "task": fam, "turns": [{}] * n}

    trajs = [traj("a", "color", 1), traj("b", "color", 3), traj("c", "count", 3), traj("d", "color", 4),
             traj("e", "ocr", 1), traj("f", "math", 2)]
    picked = stage_dress.example_trajectories(trajs, 3)
    assert [t["id"] for t in picked] == ["b", "c", "e"]  # b before d (id order), one per family, then the rest
