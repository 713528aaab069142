"""fire_core.annotate and fire_core.serve: resumable shards, filtering, statistics, and the
openai backend against the local server for real (clean and with injected faults)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_stages, run_stage, start_server

from fire_core import annotate, checker, client, config, files, sft
from fire_core.stages import fire100k as stage_fire100k

REPO = Path(__file__).resolve().parent.parent


def _turn(score, fb="Look again.", resp="It is 3. The answer is 3.", correct=False):
    return {"response": resp, "score": score, "feedback": fb, "critique": "a b c d e", "refinement": "x",
            "rating": 1, "correct": correct}


def _record(i, scores, fb="Look again at the left.", answer="7", task="count"):
    return {"id": f"count-train-{i:05d}", "request_id": f"r{i}", "task": task, "answer": answer,
            "question": "How many?", "turns": [_turn(s, fb) for s in scores]}


def test_shard_store_appends_resumes_and_repairs_torn_lines(tmp_path):
    store = files.ShardStore(tmp_path, n_shards=3)
    for i in range(10):
        store.append(_record(i, [3, 9]))
    assert store.done_ids() == {f"r{i}" for i in range(10)}
    victim = next(store.path(k) for k in range(3) if store.path(k).is_file())
    with open(victim, "a") as fh:
        fh.write('{"id": "half a rec')  # a kill in the middle of a write
    assert len(list(store.records())) == 10  # the torn line is never read as a record
    assert store.repair() == len('{"id": "half a rec')
    assert victim.read_bytes().endswith(b"\n")
    store2 = files.ShardStore(tmp_path, n_shards=3)
    assert [r["id"] for r in store2.all_sorted()] == sorted(f"count-train-{i:05d}" for i in range(10))
    # a reader with another shard count still sees every record
    assert files.ShardStore(tmp_path, n_shards=1).done_ids() == store.done_ids()


def test_request_ids_are_deterministic():
    a = files.request_id("img", "v1", "oracle", 0.0, 5, 0)
    assert a == files.request_id("img", "v1", "oracle", 0.0, 5, 0)
    assert a != files.request_id("img", "v1", "oracle", 0.7, 5, 0)


@pytest.mark.parametrize("scores, fb, reason", [
    ([3, 6, 9], "Look again at the left.", None),
    ([9], "Correct.", "no_improvement"),  # solved at once: no refinement to learn from
    ([5, 5, 4], "Look again.", "no_improvement"),
    ([3, 9], "The answer is 7.", "leaked_answer"),
    ([3, 11], "Look again.", "malformed"),
])
def test_filter_reasons(scores, fb, reason):
    assert annotate.filter_reason(_record(0, scores, fb), threshold=8) == reason


def test_statistics_table():
    recs = [_record(0, [3, 9]), _record(1, [2, 5, 9])]
    t = annotate.statistics(recs)
    row = t[t.family == "all"].iloc[0]
    assert row.dialogues == 2 and row.avg_turns == pytest.approx(2.5)
    assert row.avg_feedback_words == pytest.approx(5.0)  # "Look again at the left."
    assert set(t.family) == {"all", "count"}
    sbt = annotate.score_by_turn(recs)
    assert sbt.loc[1].sum() == 2 and sbt.loc[3, 9] == 1


def test_parse_dialogue_checks_the_schema():
    sample = {"family": "count", "answer": "3"}
    good = json.dumps({"turns": [{"response": "x", "score": 4, "feedback": "f", "critique": "c", "refinement": "r",
                                  "rating": 2}, {"response": "The answer is 3.", "score": 10, "feedback": "ok",
                                                 "critique": "c", "refinement": "r", "rating": 4}]})
    turns = annotate.parse_dialogue("Here you go:\n" + good, sample, first="It is 2.")
    assert turns[0]["response"] == "It is 2." and turns[1]["correct"] is True
    for bad, msg in [("no json at all", "no JSON"), ('{"turns": []}', "no 'turns'"),
                     ('{"turns": [{"response": "x"}]}', "lacks one of"),
                     (good.replace('"score": 4', '"score": 12'), "score 12"),
                     (good.replace('"rating": 2', '"rating": "bad"'), "rating")]:
        with pytest.raises(ValueError, match=msg):
            annotate.parse_dialogue(bad, sample, first="It is 2.")


def test_openai_backend_needs_the_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = config.load("02_generate_fire100k", ["scale=smoke", "annotator=openai"])
    stats = annotate.GenStats()
    with pytest.raises(client.AnnotatorError, match="OPENAI_API_KEY"):
        client.run_async(annotate.openai_dialogues([], cfg.annotator, cfg.dialogue, 0, stats, print))


# ----------------------------------------------------------------------------- end to end


def _kept(root: Path) -> list[str]:
    return (root / "smoke" / "02_generate_fire100k" / "fire100k.jsonl").read_text().splitlines()


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_rerun_gives_the_same_dataset(smoke_root, tmp_path):
    reference = (smoke_root / "02_generate_fire100k" / "fire100k.jsonl").read_text().splitlines()
    assert reference
    root = copy_stages(smoke_root, tmp_path, ("00_build_world", "01_train_base_vlm"))
    raw = root / "smoke" / "02_generate_fire100k" / "raw"
    proc = run_stage("fire100k", "02_generate_fire100k", root, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.stat().st_size for p in raw.glob("*.jsonl")):
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.5))  # a random moment after the first records
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sum(1 for p in raw.glob("*.jsonl") for _ in p.open())
    assert 0 < written  # it was killed mid-run with work on disk
    run_stage("fire100k", "02_generate_fire100k", root)
    assert _kept(root) == reference  # nothing lost, nothing duplicated
    # records of another plan (an older prompt version) left in the shards are ignored
    store = files.ShardStore(raw, n_shards=config.load("02_generate_fire100k", ["scale=smoke"]).annotator.n_shards)
    stale = json.loads(reference[0])
    store.append({**stale, "request_id": "stale-prompt-v0", "turns": stale["turns"][:1]})
    run_stage("fire100k", "02_generate_fire100k", root)
    assert _kept(root) == reference
    extra = json.loads((root / "smoke" / "02_generate_fire100k" / "manifest.json").read_text())["extra"]
    assert extra["generation_run"]["skipped_done"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("faults", [[], ["--fault-429", "0.12", "--fault-500", "0.12", "--fault-malformed", "0.08",
                                         "--fault-truncated", "0.08", "--fault-timeout", "0.05", "--timeout-delay", "1.2"]],
                         ids=["clean", "faults"])
def test_openai_backend_against_the_local_server(smoke_root, tmp_path, faults):
    """Over real HTTP the served oracle writes the same dialogues as the in-process oracle."""
    reference = (smoke_root / "02_generate_fire100k" / "fire100k.jsonl").read_text().splitlines()
    server, port = start_server(*faults)
    try:
        root = copy_stages(smoke_root, tmp_path, ("00_build_world", "01_train_base_vlm"))
        run_stage("fire100k", "02_generate_fire100k", root, ["annotator=openai", f"annotator.base_url=http://127.0.0.1:{port}/v1", "annotator.model=oracle",
                          f"annotator.timeout_s={0.6 if faults else 5.0}", "annotator.max_retries=8", "annotator.concurrency=4",
                          "annotator.max_failure_rate=1.0",
                          "annotator.requests_per_minute=100000"],  # the limiter has its own test
                   env={"OPENAI_API_KEY": "local-test-key", "FIRE_RETRY_BACKOFF_S": "0.05"})
    finally:
        server.kill()
    got = [json.loads(line) for line in _kept(root)]
    ref = [json.loads(line) for line in reference]
    assert [(r["id"], r["turns"]) for r in got] == [(r["id"], r["turns"]) for r in ref]
    stats = json.loads((root / "smoke" / "02_generate_fire100k" / "gen_stats.json").read_text())
    assert not stats["failures"]  # every request got through in the end: failures count requests, not attempts
    if faults:
        retried = stats["retried"]
        assert retried.get("transient", 0) + retried.get("rate_limited", 0) > 0 and retried.get("truncated", 0) > 0
        rejects = (root / "smoke" / "02_generate_fire100k" / "rejects.jsonl").read_text().splitlines()
        assert any(json.loads(r)["class"] == "truncated" and json.loads(r)["raw"] for r in rejects)
    else:
        assert not stats["retried"]


@pytest.mark.slow
def test_server_lists_models_and_serves_a_trained_model(smoke_root):
    import httpx
    from PIL import Image

    server, port = start_server("--model", f"base={smoke_root / '01_train_base_vlm' / 'model'}")
    try:
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert {m["id"] for m in models["data"]} == {"oracle", "base"}
        img = client.image_data_url(Image.new("RGB", (64, 64), (200, 30, 30)))
        body = {"model": "base", "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                         {"type": "text", "text": "What color is the image?"}]}]}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "model": "nope"}, timeout=10)
        assert bad.status_code == 404 and "not found" in bad.json()["error"]["message"]
    finally:
        server.kill()


def test_image_check_catches_corrupt_and_missing_images():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    good = buf.getvalue()
    assert stage_fire100k.image_ok({"image": {"bytes": good, "path": None}}).size == (8, 8)
    assert stage_fire100k.image_ok({"image": {"bytes": good[: len(good) // 2], "path": None}}) is None  # truncated
    assert stage_fire100k.image_ok({"image": {"bytes": b"not a png", "path": None}}) is None
    assert stage_fire100k.image_ok({"image": {"bytes": None, "path": "/no/such.png"}}) is None
    assert stage_fire100k.image_ok({"image": None}) is None


@pytest.mark.slow
def test_corrupt_images_are_skipped_counted_and_named(smoke_root, tmp_path):
    import datasets

    root = copy_stages(smoke_root, tmp_path, ("00_build_world", "01_train_base_vlm"))
    wdir = root / "smoke" / "00_build_world" / "dataset"
    dsd = datasets.load_from_disk(str(wdir)).cast_column("image", datasets.Image(decode=False))
    corrupt = set(dsd["train"]["id"][::7])

    def damage(row):
        if row["id"] in corrupt:
            row["image"] = {"bytes": row["image"]["bytes"][:40], "path": None}
        return row

    dsd["train"] = dsd["train"].map(damage)
    dsd.save_to_disk(str(wdir.with_name("damaged")))  # a dataset cannot overwrite its own files
    shutil.rmtree(wdir)
    wdir.with_name("damaged").rename(wdir)
    run_stage("fire100k", "02_generate_fire100k", root)
    stats = json.loads((root / "smoke" / "02_generate_fire100k" / "gen_stats.json").read_text())
    assert stats["bad_images"] and set(stats["bad_images"]) <= corrupt
    assert stats["generated"] + len(stats["bad_images"]) == stats["requested"]
    kept_ids = {json.loads(line)["id"] for line in _kept(root)}
    assert not kept_ids & corrupt


@pytest.mark.slow
def test_a_failing_endpoint_stops_the_run_with_a_clear_message(smoke_root, tmp_path):
    server, port = start_server("--fault-500", "1.0")
    try:
        root = copy_stages(smoke_root, tmp_path, ("00_build_world", "01_train_base_vlm"))
        code = ("import sys; from fire_core import config; from fire_core.stages import fire100k as stage_fire100k; "
                "cfg = config.load('02_generate_fire100k', sys.argv[1:]); stage_fire100k.run(cfg)")
        proc = subprocess.run([sys.executable, "-c", code, "scale=smoke", f"paths.results={root}", "annotator=openai",
                               f"annotator.base_url=http://127.0.0.1:{port}/v1", "annotator.model=oracle",
                               "annotator.max_retries=0",
                               "annotator.requests_per_minute=100000"],  # the limiter has its own test
                              cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OPENAI_API_KEY": "local-test-key"})
    finally:
        server.kill()
    assert proc.returncode != 0
    assert "'transient' failures" in proc.stderr and "exceed annotator.max_failure_rate=0.2" in proc.stderr
    stats = json.loads((root / "smoke" / "02_generate_fire100k" / "gen_stats.json").read_text())
    assert stats["failures"]["transient"] >= 1  # what failed is on disk for the user


def test_rejects_survive_a_rerun(tmp_path):
    first, second = annotate.GenStats(), annotate.GenStats()
    stage_fire100k.save_failures(tmp_path, first, [{"id": "a", "class": "unparsable", "raw": "oops"}])
    stage_fire100k.save_failures(tmp_path, second, [{"id": "b", "class": "truncated", "raw": "cut"}])
    lines = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b"]  # the first run's raw text is still there


def test_judgement_dialogues_are_balanced_at_every_turn_position_and_train_only_the_last_reply():
    from collections import Counter

    from fire_core import prompts, world

    rows = [world.make_sample(f, "train", i, 0, 64) for f in world.SEEN for i in range(6)]
    samples = [{"id": f"{s.family}-{i}", "split": "train", "family": s.family, "question": s.question,
                "answer": s.answer, "response": s.response, "scene": s.scene} for i, s in enumerate(rows)]
    given = {samples[0]["id"]: ["Not sure. The answer is 12345.", samples[0]["response"]]}  # a right one is skipped
    recs = annotate.judgement_dialogues(samples, 8, max_turns=5, seed=0, first_responses=given)
    assert len(recs) == 8 * len(samples)
    assert recs == annotate.judgement_dialogues(samples, 8, max_turns=5, seed=0, first_responses=given)
    by_pos = Counter((len(r["turns"]), r["turns"][-1]["correct"]) for r in recs)
    for k in range(1, 6):  # every position has right and wrong final answers, near half and half
        right, wrong = by_pos[(k, True)], by_pos[(k, False)]
        assert right + wrong > 40 and 0.3 < right / (right + wrong) < 0.7, (k, right, wrong)
    for r in recs:
        s = next(x for x in samples if x["id"] == r["id"])
        *earlier, last = r["turns"]
        assert r["trained_turns"] == [len(r["turns"]) - 1]
        assert all(not t["correct"] for t in earlier)  # a dialogue goes on only after a wrong answer
        for t in r["turns"]:  # the oracle's judgement, consistent with the answer checker
            assert t["correct"] == checker.is_correct(s["family"], t["response"], s["answer"])
            assert (t["score"] >= 8) == t["correct"]
    first = [r for r in recs if r["id"] == samples[0]["id"] and len(r["turns"]) > 1]
    assert first and all(r["turns"][0]["response"] == given[samples[0]["id"]][0] for r in first)
    # the loss falls on the last teacher reply only
    ex = sft.teacher_examples(recs[:20], lambda i: None)
    for r, e in zip(recs[:20], ex, strict=True):
        replies = [m for m in e.messages if m["role"] == "assistant"]
        assert [m["train"] for m in replies] == [k == len(replies) - 1 for k in range(len(replies))]
        last = r["turns"][-1]
        assert replies[-1]["content"] == prompts.teacher_reply(prompts.Turn(last["response"], last["score"],
                                                                            last["feedback"], verdict=last["correct"]))
        assert replies[-1]["content"].startswith(f"Same answer: {'yes' if last['correct'] else 'no'}\nScore: ")
