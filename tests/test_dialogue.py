"""fire_core.dialogue and stages 03-05: role masking of teacher vs student data, the engine's
stop rules on real tiny models, batch-size invariance, the prefix cache, resume after SIGKILL,
the openai backend against the local server, and the smoke outputs of stages 03-05."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import start_server

from fire_core import (
    annotate,
    config,
    dialogue,
    metrics,
    models,
    prompts,
    records,
    sft,
    world,
)
from fire_core.sft import IGNORE

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


def _record(sample, turns):
    return {"id": sample.id, "question": sample.question, "answer": sample.answer, "task": sample.family,
            "turns": [{"response": r, "score": s, "feedback": f} for r, s, f in turns]}


@pytest.fixture(scope="module")
def kit():
    cfg = config.load("03_train_teacher", ["scale=smoke"])
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.SEEN for i in range(4)]
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS, 600)
    return cfg, samples, models.build_processor(tok, cfg.model, SIZE)


def test_teacher_data_trains_only_the_teacher_and_student_data_only_the_student(kit):
    _, samples, proc = kit
    s = next(x for x in samples if x.family == "count")
    rec = _record(s, [("There are 2 stars. The answer is 2.", 4, "Count the small ones too."),
                      (s.response, 9, "Correct, well counted.")])
    tok = proc.tokenizer
    image = s.image
    (teach,) = sft.teacher_examples([rec], lambda _: image)
    (stud,) = sft.student_examples([rec], lambda _: image)
    t_enc = sft.encode(teach.messages, proc, 1024)
    s_enc = sft.encode(stud.messages, proc, 1024)
    labelled = lambda enc: tok.decode([t for t in enc["labels"] if t != IGNORE])  # noqa: E731
    assert labelled(t_enc) == ("Score: 4\nFeedback: Count the small ones too.<|end|>"
                               "Score: 9\nFeedback: Correct, well counted.<|end|>")
    assert labelled(s_enc) == f"There are 2 stars. The answer is 2.<|end|>{s.response}<|end|>"
    t_text, s_text = tok.decode(t_enc["input_ids"]), tok.decode(s_enc["input_ids"])
    assert f"Correct answer: {s.answer}" in t_text  # the teacher's prompt holds the ground truth
    assert "Correct answer" not in s_text and "Score:" not in s_text  # the student sees neither
    assert "Feedback: Count the small ones too." in s_text


def test_heldout_split_is_fixed_by_id_and_near_its_fraction():
    ids = [f"count-train-{i:05d}" for i in range(4000)]
    held = [i for i in ids if records.is_heldout(i, 0.05)]
    assert 0.035 < len(held) / len(ids) < 0.065
    assert held == [i for i in ids if records.is_heldout(i, 0.05)]


@pytest.mark.parametrize("scores, reason", [
    ([3, 5, 9], None), ([9], "not_increasing"), ([3, 3, 9], "not_increasing"), ([4, 6, 5], "not_increasing"),
    ([3, None], "unparsable")])
def test_simulation_filter(scores, reason):
    rec = {"question": "How many?", "answer": "7", "task": "count",
           "turns": [{"response": "It is 3.", "score": s, "feedback": "Look again.", "parsable": s is not None,
                      "correct": False} for s in scores]}
    assert dialogue.filter_reason(rec) == reason


def test_simulation_filter_drops_leaked_answers():
    rec = {"question": "How many?", "answer": "7", "task": "count",
           "turns": [{"response": "It is 3.", "score": 3, "feedback": "There are 7.", "parsable": True, "correct": False},
                     {"response": "It is 7.", "score": 9, "feedback": "Yes.", "parsable": True, "correct": True}]}
    assert dialogue.filter_reason(rec) == "leaked_answer"


def test_config_rejects_an_openai_role_without_its_endpoint():
    with pytest.raises(config.ConfigError, match="dialogue.student_endpoint"):
        config.load("05_simulate_fire1m", ["dialogue.student=openai"])
    with pytest.raises(config.ConfigError, match="dialogue.teacher"):
        config.load("05_simulate_fire1m", ["dialogue.teacher=gpt"])


# ----------------------------------------------------------------------------- real tiny models

@pytest.fixture(scope="module")
def trained(smoke_root):
    torch.set_num_threads(2)
    cfg = config.load("05_simulate_fire1m", ["scale=smoke", f"paths.results={smoke_root.parent}"])
    ds = world.load(cfg)
    student = models.load(smoke_root / "04_train_student" / "model")
    teacher = models.load(smoke_root / "03_train_teacher" / "model")
    rows = ds["val"].select(range(0, len(ds["val"]), max(1, len(ds["val"]) // 12)))
    samples = list(records.world_samples(rows, lambda i: f"t-{i}"))
    return cfg, samples, student, teacher


def _turns(records):
    return sorted((r["id"], [(t["response"], t["score"], t["feedback"]) for t in r["turns"]], r["stop"])
                  for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("threshold, max_turns", [(10, 2), (6, 3), (1, 4)])
def test_stop_rules_with_a_real_student(trained, threshold, max_turns):
    cfg, samples, (sm, sp), _ = trained
    d = replace(cfg.dialogue, threshold=threshold, max_turns=max_turns, batch_size=4)
    res = dialogue.run(samples, dialogue.hf_role("s", sm, sp, 12), dialogue.oracle_role(), d, seed=0, progress=False)
    assert len(res.records) == len(samples)
    for r in res.records:
        scores = [t["score"] for t in r["turns"]]
        assert all(s < threshold for s in scores[:-1]), "no dialogue goes on after the threshold"
        if r["stop"] == "satisfied":
            assert scores[-1] >= threshold
        else:
            assert r["stop"] == "max_turns" and len(scores) == max_turns and scores[-1] < threshold
    if threshold == 1:
        assert all(len(r["turns"]) == 1 and r["stop"] == "satisfied" for r in res.records)


@pytest.mark.slow
def test_a_real_teacher_ends_dialogues_by_its_own_replies(trained):
    cfg, samples, (sm, sp), (tm, tp) = trained
    d = replace(cfg.dialogue, batch_size=5)
    res = dialogue.run(samples, dialogue.hf_role("s", sm, sp, 12), dialogue.hf_role("t", tm, tp, 16), d, seed=0,
                       progress=False)
    for r in res.records:
        last = r["turns"][-1]
        assert last["score"] == prompts.parse_teacher(last["raw"]).score  # the score is the teacher's own
        assert {"satisfied": last["parsable"] and last["score"] is not None and last["score"] >= d.threshold,
                "unparsable": not last["parsable"],
                "max_turns": len(r["turns"]) == d.max_turns}[r["stop"]]
    assert sum(res.stops.values()) == len(samples)


@pytest.mark.slow
def test_greedy_dialogues_do_not_depend_on_the_batch_size(trained):
    cfg, samples, (sm, sp), (tm, tp) = trained
    out = []
    for bs in (1, 3, 8):
        d = replace(cfg.dialogue, batch_size=bs, max_turns=3)
        res = dialogue.run(samples, dialogue.hf_role("s", sm, sp, 12), dialogue.hf_role("t", tm, tp, 16), d,
                           seed=0, progress=False)
        out.append(_turns(res.records))
    assert out[0] == out[1] == out[2]


@pytest.mark.slow
def test_prefix_cache_matches_plain_generation(trained):
    """Turn 2 from the cache equals a full re-encode of the whole conversation."""
    _, samples, (sm, sp), _ = trained
    gen = models.PrefixCachedGenerator(sm, sp, max_new_tokens=12)
    keys = [s["id"] for s in samples]
    images = [s["image"] for s in samples]
    first = [prompts.student_prompt(s["question"], []) for s in samples]
    got1 = gen(keys, first, images)
    second = [prompts.student_prompt(s["question"], [prompts.Turn(r, 3, "Look again at the left side.")])
              for s, r in zip(samples, got1, strict=True)]
    got2 = gen(keys, second, images)
    assert gen.reused_tokens > 0  # turn 2 reused turn 1's cache
    assert got1 == models.generate(sm, sp, first, images, max_new_tokens=12)
    assert got2 == models.generate(sm, sp, second, images, max_new_tokens=12)
    with pytest.raises(ValueError, match="same length"):
        gen(keys[:1], first, images)


# ----------------------------------------------------------------------------- stage 05 end to end


@pytest.mark.slow
def test_openai_backend_simulation_against_the_local_server(trained, smoke_root, monkeypatch):
    """Both roles served over HTTP give the same dialogues as the same models in process."""
    cfg, samples, (sm, sp), (tm, tp) = trained
    server, port = start_server("--model", f"student={smoke_root / '04_train_student' / 'model'}",
                           "--model", f"teacher={smoke_root / '03_train_teacher' / 'model'}",
                           "--fault-429", "0.1", "--fault-500", "0.1", "--seed", "3")
    monkeypatch.setenv("FIRE_STUDENT_API_KEY", "local-student-key")
    monkeypatch.setenv("FIRE_TEACHER_API_KEY", "local-teacher-key")
    import openai

    made = []

    class Counted(openai.AsyncOpenAI):
        def __init__(self, *a, **kw):
            made.append(kw["api_key"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(openai, "AsyncOpenAI", Counted)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        d = replace(cfg.dialogue, batch_size=4, max_turns=3)
        remote = dialogue.run(samples[:6], dialogue.openai_role("student", url, "FIRE_STUDENT_API_KEY", 4, 60, 8, 12),
                              dialogue.openai_role("teacher", url, "FIRE_TEACHER_API_KEY", 4, 60, 8, 16), d, seed=0,
                              progress=False)
    finally:
        server.kill()
    local = dialogue.run(samples[:6], dialogue.hf_role("student", sm, sp, 12, cache_prefix=False),
                         dialogue.hf_role("teacher", tm, tp, 16, cache_prefix=False), d, seed=0, progress=False)
    assert _turns(remote.records) == _turns(local.records)
    assert remote.steps > 1  # several engine steps, and still one client per role for the run
    assert sorted(made) == ["local-student-key", "local-teacher-key"]
    assert remote.retried["rate_limited"] + remote.retried["transient"] > 0  # faults were met and retried
    assert not remote.failures  # and every request got through in the end


@pytest.mark.slow
def test_smoke_outputs_of_stages_03_to_05(smoke_root):
    import pandas as pd

    t = pd.read_csv(smoke_root / "03_train_teacher" / "teacher_eval.csv")
    assert {"unseen"} <= set(t.group) and ((t.score_mae >= 0) & (t.score_mae <= 10)).all()
    for stage in ("03_train_teacher", "04_train_student", "05_simulate_fire1m"):
        extra = json.loads((smoke_root / stage / "manifest.json").read_text())["extra"]
        # learned: the loss on held-out FIRE-100K dialogues fell (0.3 to 0.5 at smoke scale)
        assert extra["heldout_loss_after"] < extra["heldout_loss_before"] - 0.1, (stage, extra)
    first = pd.read_csv(smoke_root / "04_train_student" / "first_turn_accuracy.csv")
    assert first.family.iloc[0] == "all" and first.n.iloc[0] > 0
    look = pd.read_csv(smoke_root / "04_train_student" / "refinement_first_look.csv")
    assert list(look.model) == ["base", "fire100k_student"] and (look.AT >= 1).all()
    d = smoke_root / "05_simulate_fire1m"
    stats = json.loads((d / "simulation_stats.json").read_text())
    assert stats["generated"] == stats["kept"] + sum(stats["dropped"].values()) == stats["samples"]
    # the smoke teacher writes scores (stage 03's smoke settings), so the engine's score paths run:
    # turns scored, dialogues that go on past a low score and stop when satisfied
    ev = json.loads((smoke_root / "03_train_teacher" / "manifest.json").read_text())["extra"]["eval"]
    assert ev["seen"]["unparsable_share"] < 0.1 and ev["unseen"]["unparsable_share"] < 0.1, ev
    assert stats["metrics"]["unparsable"] < stats["samples"] / 10 and stats["stops"].get("satisfied", 0) > 0, stats
    assert stats["metrics"]["n_multi_turn"] > 0 and stats["kept"] > 0, stats
    f100 = {json.loads(line)["id"] for p in (smoke_root / "02_generate_fire100k" / "raw").glob("*.jsonl")
            for line in p.open()}
    f1m = [json.loads(p) for p in (d / "fire1m.jsonl").read_text().splitlines()]
    assert not f100 & {json.loads(line)["id"] for p in (d / "raw").glob("*.jsonl") for line in p.open()}
    assert all(dialogue.filter_reason(r) is None for r in f1m)
    assert (d / "fire_student" / "config.json").is_file()
    models.load(d / "fire_student")
    m = metrics.dialogue_metrics  # the simulation's own metrics are recomputable from raw
    raw = [json.loads(line) for p in sorted((d / "raw").glob("*.jsonl")) for line in p.open()]
    assert stats["metrics"]["AT"] == pytest.approx(m(raw, 8, 5)["AT"])
    assert annotate.statistics(f1m).dialogues.iloc[0] == len(f1m)


@pytest.mark.slow
def test_smoke_outputs_of_stage_06(smoke_root):
    import pandas as pd

    d = smoke_root / "06_fire_bench"
    free = pd.read_csv(d / "free_dialogue.csv")
    assert set(free.provider) == {"teacher", "oracle"}  # both providers, never only the better one
    assert set(free.model) == {"base", "fire100k_student", "fire_student"}
    assert {"all", "seen", "unseen"} <= set(free.subset)
    for k in ("AT", "ADR", "ATR", "RR"):
        assert ((free[f"{k}_lo"] <= free[k] + 1e-9) & (free[k] <= free[f"{k}_hi"] + 1e-9)).all()
    base = free[free.model == "base"]  # every subset is relative to its own base AT
    assert (base.AT_rel == 1).all()
    fixed = pd.read_csv(d / "fixed_student.csv")
    assert {"BLEU_1", "BLEU_4", "CIDEr", "METEOR", "ROUGE_L"} <= set(fixed.columns)
    teacher = pd.read_csv(d / "fixed_teacher.csv")
    assert {"score_mae", "failed_to_follow"} <= set(teacher.columns)
    gold = [json.loads(line) for line in (d / "gold_dialogues.jsonl").read_text().splitlines()]
    assert gold and all(g["split"] in ("test", "unseen") for g in gold)  # never training samples
    raw = [json.loads(line) for line in (d / "free_dialogues.jsonl").read_text().splitlines()]
    one = [r for r in raw if r["provider"] == "oracle" and r["model"] == "base"]
    recomputed = metrics.free_metrics([[t["score"] for t in r["turns"]] for r in one], 8, 5)
    row = free[(free.provider == "oracle") & (free.model == "base") & (free.subset == "all")].iloc[0]
    assert row.AT == pytest.approx(recomputed["AT"]) and row.RR == pytest.approx(recomputed["RR"])
    assert (d / "solved_by_turn.png").is_file() and (d / "example_dialogues.png").is_file()
    # paired differences: every pair, provider and subset; the point is the difference of the rows above
    paired = pd.read_csv(d / "paired_differences.csv")
    assert set(zip(paired.model_a, paired.model_b, strict=True)) == {
        ("base", "fire100k_student"), ("fire100k_student", "fire_student"), ("base", "fire_student")}
    assert set(paired.provider) == {"teacher", "oracle"} and {"all", "seen", "unseen"} <= set(paired.subset)
    for _, p in paired.iterrows():
        a = free[(free.provider == p.provider) & (free.model == p.model_a) & (free.subset == p.subset)].iloc[0]
        b = free[(free.provider == p.provider) & (free.model == p.model_b) & (free.subset == p.subset)].iloc[0]
        for k in ("AT", "ADR", "RR"):
            assert p[k] == pytest.approx(b[k] - a[k], abs=2e-4)  # both rounded to 4 places in the CSVs
            assert p[f"{k}_lo"] <= p[k] + 1e-4 and p[k] <= p[f"{k}_hi"] + 1e-4
