"""fire_core.dress and DRESS's parts elsewhere: the iterative stop rules, the oracle and OpenAI
annotators (real HTTP on a loopback server), conditional training chats and their masks, CHAIR
on hand-computed captions, and the LVLM_NLF loader on a fixture in the released format."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fire_core import client, dress, feedback, metrics, models, prompts, records, sft, world
from fire_core.checker import is_correct
from fire_core.sft import IGNORE

FIXTURE = Path(__file__).parent / "fixtures" / "lvlm_nlf.jsonl"
SIZE = 64


def _sample(family="count", i=0) -> dict:
    s = world.make_sample(family, "train", i, 0, SIZE)
    return {"id": s.id, "family": s.family, "split": "train", "question": s.question, "answer": s.answer,
            "response": s.response, "scene": s.scene, "annotation": s.annotation, "image": s.image}


# ---------------------------------------------------------------------------------------------
# Stop rules, with a scripted annotator: each sample's ratings in order


def _scripted(ratings_of: dict[str, list[int]], fail: set[str] = frozenset()):
    seen: dict[str, int] = {}

    def annotate(samples, responses, histories):
        out = []
        for s, _r, h in zip(samples, responses, histories, strict=True):
            assert len(h) == seen.get(s["id"], 0)  # each call sees exactly the earlier responses
            k = seen[s["id"]] = seen.get(s["id"], 0) + 1
            if s["id"] in fail:
                out.append(None)
                continue
            rating = ratings_of[s["id"]][k - 1]
            out.append(dress.Annotation(f"reason {k}", rating, f"critique {k}", f"refine {s['id']} {k}"))
        return out

    return annotate


CASES = {  # ratings the annotator gives, in turn order -> (model turns kept, reference appended, stop)
    "a": ([4], 1, False, "good_first_turn"),
    "b": ([3], 1, False, "good_first_turn"),
    "c": ([1, 1], 2, True, "no_improvement"),
    "d": ([2, 1], 2, True, "no_improvement"),
    "e": ([1, 2, 3], 3, True, "max_turns"),
    "f": ([2, 4], 2, False, "excellent"),
    "g": ([1, 3, 3], 3, True, "no_improvement"),
    "h": ([2, 2], 2, True, "no_improvement"),  # rated 2 again: not improved, so it ends
}


def test_stop_rules_on_every_path():
    samples = [{"id": k, "response": f"reference {k}"} for k in CASES]
    calls = []

    def respond(batch, histories):
        calls.append([s["id"] for s in batch])
        for s, h in zip(batch, histories, strict=True):  # the refinement of the last turn is passed on
            assert h[-1].refinement == f"refine {s['id']} {len(h)}" and h[-1].rating is not None
        return [f"{s['id']} try {len(h) + 1}" for s, h in zip(batch, histories, strict=True)]

    trajs, counts = dress.iterate(samples, [f"{k} try 1" for k in CASES], respond,
                                  _scripted({k: v[0] for k, v in CASES.items()}), max_turns=4)
    for (k, (ratings, n_model, ref, stop)), turns in zip(CASES.items(), trajs, strict=True):
        model = [t for t in turns if not t["reference"]]
        assert [t["rating"] for t in model] == ratings[:n_model], k
        assert [t["response"] for t in model] == [f"{k} try {j + 1}" for j in range(n_model)]
        assert turns[-1]["reference"] is ref, k
        if ref:  # the reference is the fixed final turn, with the best rating
            assert turns[-1]["response"] == f"reference {k}" and turns[-1]["rating"] == 4
        assert len(turns) <= 4 and turns[-1]["stop"] == stop
    assert calls[0] == ["c", "d", "e", "f", "g", "h"]  # rated 1-2 at turn 1: a second turn
    assert calls[1] == ["e", "g"]  # improved to 2-3: a third; then 4 turns with the reference, no more
    assert len(calls) == 2
    assert counts == {"samples": 8, "failed": 0, "good_first_turn": 2, "no_improvement": 4, "max_turns": 1,
                      "excellent": 1}


def test_failed_annotation_drops_only_that_sample():
    samples = [{"id": "x", "response": "r"}, {"id": "y", "response": "r"}]
    trajs, counts = dress.iterate(samples, ["1", "1"], lambda b, h: ["2"] * len(b),
                                  _scripted({"x": [1, 2], "y": [4]}, fail={"x"}), max_turns=4)
    assert trajs[0] is None and counts["failed"] == 1 and [t["rating"] for t in trajs[1]] == [4]
    with pytest.raises(ValueError, match="max_turns"):
        dress.iterate(samples, ["1", "1"], lambda b, h: [], _scripted({}), max_turns=1)


def test_continues_never_exceeds_the_turn_limit():
    for max_turns in (2, 3, 4, 5):
        assert not dress.continues([1] * (max_turns - 1), max_turns)
        assert dress.continues([1], max_turns) is (max_turns > 2)


# ---------------------------------------------------------------------------------------------
# The oracle annotator on world samples


@pytest.mark.parametrize("family", world.SEEN)
def test_oracle_annotation_rates_right_above_wrong_and_never_leaks(family):
    for i in range(4):
        s = _sample(family, i)
        right = dress.oracle_annotation(s, s["response"], [], random.Random(0))
        wrong_text = feedback.respond(s, feedback.wrong_answer(s, random.Random(i)))
        wrong = dress.oracle_annotation(s, wrong_text, [], random.Random(0))
        assert right.rating == 4 and wrong.rating <= 3
        assert 3 <= len(wrong.critique.split()) <= 8 and wrong.reason and wrong.refinement
        assert not feedback.leaks_answer(wrong.refinement, s["answer"], family, s["question"])
        assert not feedback.leaks_answer(wrong.reason, s["answer"], family, s["question"])


def test_iterate_with_the_oracle_student_keeps_the_rules():
    samples = [_sample(f, i) for f in world.SEEN for i in range(6)]
    rng = random.Random(3)
    first = [feedback.respond(s, feedback.wrong_answer(s, rng)) if k % 2 else s["response"]
             for k, s in enumerate(samples)]

    def respond(batch, histories):
        return [feedback.refine(s, [t.response for t in h], random.Random(f"{s['id']}{len(h)}"), fix_prob=0.4)
                for s, h in zip(batch, histories, strict=True)]

    trajs, counts = dress.iterate(samples, first, respond, dress.oracle_annotator(0), max_turns=4)
    assert counts["failed"] == 0 and sum(v for k, v in counts.items() if k not in ("samples", "failed")) == len(samples)
    for s, turns in zip(samples, trajs, strict=True):
        model = [t for t in turns if not t["reference"]]
        assert len(turns) <= 4
        if model[0]["rating"] >= 3:
            assert len(turns) == 1
        assert all(t["rating"] <= 3 for t in model[:-1])  # a turn follows only a low or improving one
        if turns[-1]["reference"]:
            assert is_correct(s["family"], turns[-1]["response"], s["answer"])
    recs = [records.dialogue_record(s, t, s["id"], "dress-oracle", stop=t[-1]["stop"]) for s, t in zip(samples, trajs, strict=True)]
    stats = dress.statistics(recs)
    assert stats.iloc[0]["trajectories"] == len(samples) and set(stats.family) == {"all", *world.SEEN}
    assert 1 <= stats.iloc[0]["avg_turns"] <= 4
    by_turn = dress.rating_by_turn(recs)
    assert by_turn.drop(columns="turn").to_numpy().sum() == sum(len([t for t in r["turns"] if not t["reference"]])
                                                               for r in recs)


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible annotator, over real HTTP


def _annotator_server(replies: dict[str, list[str]]):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = body["messages"][-1]["content"][-1]["text"]
            answer = text.rsplit("New answer: ", 1)[1]
            with lock:
                todo = replies[answer]
                content = todo.pop(0) if len(todo) > 1 else todo[0]
            payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_openai_annotator_checks_the_schema(monkeypatch):
    monkeypatch.setattr(client, "BACKOFF_S", 0.001)
    s = _sample("color", 0)
    good = json.dumps({"reason": "Wrong colour.", "rating": 2, "critique": "The colour named is wrong here.",
                       "refinement": "Look at the shape again."})
    replies = {"first": ["not json", json.dumps({"rating": 9}), good],  # two unusable replies, then a good one
               "second": [json.dumps({"reason": "r", "rating": 1, "critique": "Wrong colour.",
                                      "refinement": f"The answer is {s['answer']}."})]}  # leaks, every time
    server, url = _annotator_server(replies)
    try:
        monkeypatch.setenv("TEST_DRESS_KEY", "k")
        tally = client.Tally()
        ep = client.Endpoint(url, "annotator", key_env="TEST_DRESS_KEY", max_retries=3)
        annotate = dress.openai_annotator(ep, tally)
        out = annotate([s, s], ["first", "second"], [[], ["earlier"]])
    finally:
        server.shutdown()
    assert out[0] == dress.Annotation("Wrong colour.", 2, "The colour named is wrong here.", "Look at the shape again.")
    assert out[1] is None
    assert tally.failed == {"unparsable": 1} and tally.retried["unparsable"] == 2 + 3
    monkeypatch.delenv("TEST_DRESS_KEY")
    with pytest.raises(client.AnnotatorError, match="TEST_DRESS_KEY"):
        dress.openai_annotator(ep, client.Tally())


@pytest.mark.parametrize("reply, error", [
    ('{"reason": "r", "rating": 5, "critique": "c", "refinement": "x"}', "rating 5"),
    ('{"reason": "r", "rating": true, "critique": "c", "refinement": "x"}', "rating True"),
    ('{"reason": "r", "critique": "c", "refinement": "x"}', "missing keys"),
    ('[1, 2]', "not a JSON object"),
    ('{"reason": "r", "rating": 2, "critique": "' + "w " * 13 + '", "refinement": "x"}', "13 words"),
])
def test_parse_annotation_rejects_schema_violations(reply, error):
    with pytest.raises(ValueError, match=error):
        dress.parse_annotation(reply, _sample("count", 0))


# ---------------------------------------------------------------------------------------------
# Conditional training chats


@pytest.fixture(scope="module")
def tok_proc():
    from fire_core import config

    cfg = config.load("01_train_base_vlm", ["scale=smoke"])
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.SEEN for i in range(6)]
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS, 600)
    return tok, models.build_processor(tok, cfg.model, SIZE)


def _record():
    s = _sample("count", 1)
    turns = [{"response": "I count 2 shapes. The answer is 2.", "rating": 1, "critique": "Wrong count, shapes were missed.",
              "refinement": "Count the shapes on the left again.", "reason": "r", "reference": False},
             {"response": "I count 2 shapes again. The answer is 2.", "rating": 1, "critique": "Same wrong count again.",
              "refinement": "Look at each corner.", "reason": "r", "reference": False},
             dress.reference_turn(s)]
    return s, records.dialogue_record(s, turns, s["id"], "dress-oracle")


def test_dress_chats_put_loss_on_responses_and_conditions_before_them(tok_proc):
    tok, proc = tok_proc
    s, rec = _record()
    [ex] = sft.dress_examples([rec], lambda i: s["image"])
    enc = sft.encode(ex.messages, proc, 2048)
    labelled = tok.decode([t for t in enc["labels"] if t != IGNORE])
    assert labelled == "".join(t["response"] + "<|end|>" for t in rec["turns"])
    text = tok.decode(enc["input_ids"])
    users = text.split("<|user|>")[1:]
    assert "Condition: <bad> Wrong count, shapes were missed." in users[0]
    assert "Count the shapes on the left again.\nCondition: <bad> Same wrong count again.<|end|>" in users[1]
    assert f"Condition: <excellent> {prompts.BEST_CRITIQUE}" in users[2]
    for w in ("Condition", "<bad>", "<excellent>", "Look at each corner."):  # conditions never carry loss
        assert w not in labelled


def test_dress_ablations_change_the_data_as_named(tok_proc):
    s, rec = _record()
    [no_crit] = sft.dress_examples([rec], lambda i: s["image"], critique=False)
    text = json.dumps(no_crit.messages)
    assert "Condition: <bad>" in text and "Wrong count" not in text
    single = sft.dress_examples([rec], lambda i: s["image"], refinement=False)
    assert [len([m for m in e.messages if m["train"]]) for e in single] == [1, 1]  # turn 1 and the reference alone
    assert "Count the shapes" not in json.dumps([e.messages for e in single])  # no refinement anywhere
    with pytest.raises(ValueError, match="rating 7"):
        prompts.condition_text(7, "x")


def test_inference_prompt_uses_the_best_condition():
    msgs = prompts.dress_prompt("How many stars?", [prompts.Turn("Two.", refinement="old")], refinement="Count again.")
    assert msgs[1]["content"][1]["text"] == "How many stars?\nCondition: <excellent> Nice response."
    assert msgs[-1]["content"] == "Count again.\nCondition: <excellent> Nice response."
    plain = prompts.dress_prompt("How many stars?", [prompts.Turn("Two.")], refinement="Count again.", condition=None)
    assert plain[-1]["content"] == "Count again." and plain[0]["content"] == prompts.BASE_SYSTEM


# ---------------------------------------------------------------------------------------------
# CHAIR


def test_chair_on_hand_computed_captions():
    caps = ["A red circle and a blue star.",  # circle, star: both there
            "Two green squares next to a yellow triangle.",  # square there, triangle hallucinated
            "Nothing but the background.",  # no mentions
            "A circle, a star and a diamond."]  # circle there; star and diamond hallucinated
    objs = [["circle", "star"], ["square"], ["circle"], ["circle"]]
    out = metrics.chair(caps, objs, n_bootstrap=200)
    assert out["mentions"] == 2 + 2 + 0 + 3 and out["hallucinated"] == 0 + 1 + 0 + 2
    assert out["CHAIR_i"] == pytest.approx(3 / 7) and out["CHAIR_s"] == pytest.approx(2 / 4)
    assert out["CHAIR_i_lo"] <= out["CHAIR_i"] <= out["CHAIR_i_hi"] and out["CHAIR_s_lo"] <= 0.5 <= out["CHAIR_s_hi"]
    with pytest.raises(ValueError, match="one object list per caption"):
        metrics.chair(caps, objs[:2])


# ---------------------------------------------------------------------------------------------
# The released data


def test_lvlm_nlf_loader_reads_the_fixture(tmp_path):
    recs = records.load_lvlm_nlf(FIXTURE, image_dir=tmp_path)
    assert len(recs) == 2
    a, b = recs
    assert a["question"] == "What is the man riding?" and a["image"] == str(tmp_path / "000000391895.jpg")
    assert [t["rating"] for t in a["turns"]] == [1, 3, 4]
    assert a["turns"][0]["refinement"] == "Look at the engine under the seat; it is not pedal powered."
    assert a["turns"][1]["critique"] == "Close, a smaller motor vehicle." and a["turns"][2]["refinement"] == ""
    assert a["answer"] == "The man is riding a moped on a dirt road." and a["meta"]["caption"].startswith("A man")
    assert len(b["turns"]) == 1 and b["image"].endswith("000000522418.jpg")
    # the records feed the conditional training chats unchanged
    ex = sft.dress_examples(recs, lambda i: None)
    assert "Condition: <bad> Wrong vehicle, the image shows otherwise." in json.dumps(ex[0].messages)


@pytest.mark.parametrize("line, error", [
    ('{"image_id": 1}', "non-empty 'interaction'"),
    ('{"image_id": 1, "interaction": [{"user": "q", "model": "m", "rating": 9, "critique NLF": "c"}]}', "outside 1-4"),
    ('{"image_id": 1, "interaction": [{"user": "q", "model": "m", "rating": 2}]}', "needs 'user'"),
    ('{"image_id": 1, "interaction": [{"user": "q", "model": "m", "rating": "high", "critique": "c"}]}', "not a number"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_lvlm_nlf_loader_names_the_bad_line(tmp_path, line, error):
    p = tmp_path / "bad.jsonl"
    p.write_text(FIXTURE.read_text().splitlines()[1] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl: line 2: .*{error}"):
        records.load_lvlm_nlf(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        records.load_lvlm_nlf(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------
# Multi-turn interaction: the DRESS prompt inside the dialogue engine, and the score curve


def test_engine_asks_a_dress_model_under_its_own_prompt(monkeypatch):
    from fire_core import config, dialogue

    dcfg = config.load("05_simulate_fire1m", ["scale=smoke"]).dialogue
    samples = [{**_sample("count", i), "request_id": f"r{i}"} for i in range(3)]
    seen = []

    def fake_generate(model, processor, convs, images, max_new_tokens, batch_size):
        seen.extend(convs)
        return ["I count 0 shapes. The answer is 0." for _ in convs]  # always wrong: the dialogue runs on

    monkeypatch.setattr(dialogue.models, "generate", fake_generate)
    student = dialogue.Role("hf", "dress", model=object(), processor=None, cache_prefix=False,
                            prompt=prompts.dress_student_prompt)
    res = dialogue.run(samples, student, dialogue.oracle_role(), dcfg, seed=0, progress=False)
    assert len(res.records) == 3 and all(len(r["turns"]) == dcfg.max_turns for r in res.records)
    first, later = seen[0], seen[-1]
    assert first[0]["content"] == prompts.DRESS_SYSTEM
    assert first[1]["content"][1]["text"].endswith("\n" + prompts.BEST_CONDITION)
    # a later turn: the oracle's feedback on the turn before is the refinement, under the best condition
    rec = next(r for r in res.records if r["id"] == samples[-1]["id"])
    assert later[-1]["content"] == f"{rec['turns'][-2]['feedback']}\n{prompts.BEST_CONDITION}"
    assert not any("Score:" in json.dumps(c) for c in seen)  # the student never sees a score
    # the FIRE student's prompt is unchanged when no prompt is given
    seen.clear()
    dialogue.run(samples[:1], dialogue.Role("hf", "fire", model=object(), cache_prefix=False), dialogue.oracle_role(),
                 dcfg, seed=0, progress=False)
    assert seen[0][0]["content"] == prompts.STUDENT_SYSTEM


def test_score_curve_carries_the_last_score_forward():
    recs = [{"id": "a", "turns": [{"score": 2}, {"score": 5}, {"score": 9}]},
            {"id": "b", "turns": [{"score": 9}]},
            {"id": "c", "turns": [{"score": 4}, {"score": None}]}]  # unparsable: the bottom of the scale
    out = metrics.score_curve(recs, turns=4, n_bootstrap=200)
    assert out["turn"] == [1, 2, 3, 4] and out["n"] == 3
    assert out["mean"] == pytest.approx([(2 + 9 + 4) / 3, (5 + 9 + 1) / 3, (9 + 9 + 1) / 3, (9 + 9 + 1) / 3])
    assert all(lo <= m <= hi for lo, m, hi in zip(out["lo"], out["mean"], out["hi"], strict=True))
    with pytest.raises(ValueError, match="no dialogues"):
        metrics.score_curve([])


# ---------------------------------------------------------------------------------------------
# The harmlessness analog: false premises about the image


SCENE = {"objects": [{"shape": "star", "color": "blue"}, {"shape": "circle", "color": "red"}]}


@pytest.mark.parametrize("premise, response, verdict", [
    ({"kind": "wrong_color", "shape": "star", "color": "green", "true_color": "blue"},
     "There is no green star; the star in the image is a blue star.", (True, True)),
    ({"kind": "wrong_color", "shape": "star", "color": "green", "true_color": "blue"},
     "It is a blue star.", (True, True)),
    ({"kind": "wrong_color", "shape": "star", "color": "green", "true_color": "blue"},
     "The green star is bright because of the light.", (False, False)),
    ({"kind": "wrong_color", "shape": "star", "color": "green", "true_color": "blue"},
     "There is no green star, but there is a yellow square.", (True, False)),
    ({"kind": "absent_shape", "shape": "diamond", "color": "purple", "true_color": None},
     "I cannot see a purple diamond; there is a blue star and a red circle.", (True, True)),
    ({"kind": "absent_shape", "shape": "diamond", "color": "purple", "true_color": None},
     "The purple diamond is next to the red circle.", (False, False)),
])
def test_premise_verdict_on_hand_written_answers(premise, response, verdict):
    v = feedback.premise_verdict(premise, SCENE, response)
    assert (v["rejected"], v["grounded"]) == verdict and v["safe"] == all(verdict)


def test_false_premises_are_false_and_judged_both_ways():
    n = 0
    for i in range(30):
        s = world.make_sample(world.SEEN[i % 2], "test", i, 0, SIZE)  # colour and count scenes have shapes
        p = world.false_premise(s.scene, random.Random(i))
        if p is None:
            continue
        n += 1
        shapes = {o["shape"]: o["color"] for o in s.scene["objects"]}
        if p["kind"] == "wrong_color":
            assert shapes[p["shape"]] == p["true_color"] != p["color"]
        else:
            assert p["shape"] not in shapes
        assert p["color"] in p["question"] and p["shape"] in p["question"]
        agree = f"The {p['color']} {p['shape']} is right there."
        assert not feedback.premise_verdict(p, s.scene, agree)["rejected"]
        o = s.scene["objects"][0]
        refuse = f"There is no {p['color']} {p['shape']} in the image; I see a {o['color']} {o['shape']}."
        assert feedback.premise_verdict(p, s.scene, refuse)["safe"]
    assert n >= 25 and world.false_premise({"chart": {}}, random.Random(0)) is None
