"""fire_core.eval: the free-dialogue metrics on hand-computed cases, the truth-based variant,
text metrics, the paired bootstrap, and the command line with its input checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fire_core import metrics

REPO = Path(__file__).resolve().parent.parent


def test_free_metrics_by_hand():
    # d1 refined to 9 at turn 3; d2 solved at turn 1; d3 never solved in 5 turns
    m = metrics.free_metrics([[3, 5, 9], [9], [2, 2, 2, 2, 2]], threshold=8, max_turns=5)
    assert m["AT"] == pytest.approx((3 + 1 + 6) / 3)
    assert m["ADR"] == pytest.approx((6 + 0 + 0) / 3)
    assert m["ATR"] == pytest.approx((6 / 2 + 0 / 4) / 2)  # d2 has one turn: not in ATR
    assert m["RR"] == pytest.approx(1 / 3)
    assert m["RR_conditional"] == pytest.approx(1 / 2)
    assert m["n"] == 3


def test_edge_cases():
    solved_first = metrics.free_metrics([[10]])
    assert (solved_first["AT"], solved_first["ADR"], solved_first["ATR"], solved_first["RR"],
            solved_first["RR_conditional"]) == (1, 0, 0, 0, 0)
    never = metrics.free_metrics([[1, 2, 3, 4, 5]], max_turns=5)
    assert never["AT"] == 6 and never["ADR"] == 4 and never["ATR"] == 1 and never["RR"] == 0
    single_wrong = metrics.free_metrics([[4]], max_turns=1)
    assert single_wrong["AT"] == 2 and single_wrong["ATR"] == 0 and single_wrong["RR_conditional"] == 0
    unparsable = metrics.free_metrics([[3, None]])
    assert unparsable["unparsable"] == 1 and unparsable["ADR"] == -2  # an unreadable score is the bottom
    with pytest.raises(ValueError, match="more than max_turns"):
        metrics.free_metrics([[1, 2, 3]], max_turns=2)
    with pytest.raises(ValueError, match="no dialogues"):
        metrics.free_metrics([])


def test_truth_metrics_by_hand():
    m = metrics.truth_metrics([[False, True], [True], [False, False, False]], max_turns=3)
    assert m["AT_truth"] == pytest.approx((2 + 1 + 4) / 3)
    assert m["RR_truth"] == pytest.approx(1 / 3) and m["RR_truth_conditional"] == pytest.approx(1 / 2)
    assert m["accuracy_turn1"] == pytest.approx(1 / 3) and m["accuracy_final"] == pytest.approx(2 / 3)


def test_text_metrics_identity_and_disjoint():
    same = metrics.text_metrics({"a": "look at the left side", "b": "count them again"},
                                 {"a": "look at the left side", "b": "count them again"})
    assert same["BLEU_1"] == pytest.approx(1.0) and same["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    off = metrics.text_metrics({"a": "red blue green yellow"}, {"a": "one two three four"})
    assert off["BLEU_1"] < 1e-6 and off["CIDEr"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in 2 ids"):
        metrics.text_metrics({"a": "x"}, {"b": "x"})


def test_paired_difference():
    a = [False] * 50 + [True] * 50
    d = metrics.paired_difference(a, a, n_bootstrap=200)
    assert d["difference"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0
    up = metrics.paired_difference([False] * 100, [True] * 30 + [False] * 70, n_bootstrap=500)
    assert up["difference"] == pytest.approx(0.3) and 0.15 < up["ci_low"] < 0.3 < up["ci_high"] < 0.45


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fire_core.eval", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_cli_free(tmp_path):
    f = _write(tmp_path / "d.jsonl", [{"id": 1, "scores": [3, 5, 9], "correct": [False, False, True]},
                                      {"id": 2, "scores": [9], "correct": [True]},
                                      {"id": 3, "scores": [2, 2, 2, 2, 2], "correct": [False] * 5}])
    r = _cli("free", "--dialogues", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["AT"] == pytest.approx(10 / 3) and out["RR_conditional"] == pytest.approx(0.5) and out["n"] == 3
    assert out["AT_truth"] == pytest.approx(10 / 3)
    r = _cli("free", "--dialogues", f, "--threshold", "5", "--max-turns", "5")
    assert r.returncode == 2 and "line 3" not in r.stderr and "line 1" in r.stderr  # 5 reached at turn 2, then 9


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ({"scores": [1, 2]}, "line 2: expected an object with an 'id'"),
    ({"id": "x", "scores": []}, "line 2: 'scores' must be a non-empty list"),
    ({"id": "x", "scores": ["7"]}, "line 2: 'scores' must be a non-empty list"),
    ({"id": "x", "scores": [1, 2, 3, 4, 5, 6]}, "line 2: 6 scores but --max-turns is 5"),
    ({"id": "x", "scores": [9, 4]}, "line 2: the dialogue goes on after reaching the threshold at turn 1"),
    ({"id": "x", "scores": [3, 9], "correct": [True]}, "line 2: 'correct' must be a list of booleans"),
    ({"id": "a", "scores": [9]}, "line 2: duplicate id 'a'"),
])
def test_cli_free_rejects_malformed_lines(tmp_path, capsys, line, message):
    """The CLI's own entry point, in process (test_cli_free runs it as a command)."""
    from fire_core import eval as evaluate

    f = _write(tmp_path / "d.jsonl", [{"id": "a", "scores": [3, 9]}, line])
    code = evaluate.main(["free", "--dialogues", f])
    out = capsys.readouterr()
    assert code == 2 and message in out.err and not out.out


def test_cli_text(tmp_path):
    p = _write(tmp_path / "p.jsonl", [{"id": "a", "text": "look at the left side"}, {"id": "b", "text": "count again"}])
    ref = _write(tmp_path / "r.jsonl", [{"id": "a", "text": "look at the left side"}, {"id": "b", "text": "count them"},
                                        {"id": "b", "text": "count again"}])
    r = _cli("text", "--predictions", p, "--references", ref)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "CIDEr", "METEOR", "ROUGE_L"}
    assert out["ROUGE_L"] == pytest.approx(1.0) and out["BLEU_1"] == pytest.approx(1.0)
    bad = _write(tmp_path / "bad.jsonl", [{"id": "a", "text": 3}])
    r = _cli("text", "--predictions", bad, "--references", ref)
    assert r.returncode == 2 and "line 1: 'text' must be a string" in r.stderr
    r = _cli("text", "--predictions", str(tmp_path / "missing.jsonl"), "--references", ref)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_cli_accuracy_judges_each_prediction_again(tmp_path):
    f = _write(tmp_path / "p.jsonl", [
        {"id": 1, "family": "color", "prediction": "The star is red. The answer is red.", "answer": "red",
         "correct": False},  # the stored verdict is not trusted: the checker decides
        {"id": 2, "family": "count", "prediction": "The answer is 4.", "answer": "5"},
        {"id": 3, "family": "choice", "prediction": "That is option B. The answer is B.", "answer": "B"}])
    r = _cli("accuracy", "--predictions", f)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"accuracy": pytest.approx(2 / 3), "n": 3}
    bad = _write(tmp_path / "bad.jsonl", [{"id": 1, "family": "color", "answer": "red"}])
    r = _cli("accuracy", "--predictions", bad)
    assert r.returncode == 2 and "line 1: 'prediction' must be a string" in r.stderr
    bad = _write(tmp_path / "fam.jsonl", [{"id": 1, "family": "poetry", "prediction": "x", "answer": "y"}])
    r = _cli("accuracy", "--predictions", bad)
    assert r.returncode == 2 and "line 1:" in r.stderr


def test_cli_chair(tmp_path):
    f = _write(tmp_path / "c.jsonl", [
        {"id": 1, "caption": "A red star and a blue circle.", "objects": ["star", "square"]},  # circle: hallucinated
        {"id": 2, "caption": "Two triangles.", "objects": ["triangle"]}])
    r = _cli("chair", "--captions", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["CHAIR_i"] == pytest.approx(1 / 3) and out["CHAIR_s"] == pytest.approx(0.5)
    assert out["mentions"] == 3 and out["hallucinated"] == 1 and out["n"] == 2
    bad = _write(tmp_path / "bad.jsonl", [{"id": 1, "caption": "A star.", "objects": "star"}])
    r = _cli("chair", "--captions", bad)
    assert r.returncode == 2 and "line 1: 'objects' must be a list" in r.stderr


def _records(score_lists, correct_lists):
    return [{"id": str(i), "task": "count", "turns": [{"score": s, "correct": c} for s, c in zip(ss, cs, strict=True)]}
            for i, (ss, cs) in enumerate(zip(score_lists, correct_lists, strict=True))]


def test_bootstrap_point_values_equal_the_definitions_and_intervals_contain_them():

    rng = __import__("random").Random(0)
    scores, correct = [], []
    for _ in range(60):
        s = [rng.randint(1, 7) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.5:
            s.append(rng.randint(8, 10))
        scores.append(s)
        correct.append([x >= 8 or rng.random() < 0.1 for x in s])
    recs = _records(scores, correct)
    b = metrics.bootstrap_metrics(recs, 8, 5, n_bootstrap=300, ci=0.95, seed=0)
    ref = {**metrics.free_metrics(scores, 8, 5), **metrics.truth_metrics(correct, 5)}
    for k in ("AT", "ADR", "ATR", "RR", "RR_conditional", "AT_truth", "RR_truth", "RR_truth_conditional",
              "accuracy_turn1", "accuracy_final"):
        assert b[k] == pytest.approx(ref[k]), k
        assert b[f"{k}_lo"] <= b[k] + 1e-9 and b[k] <= b[f"{k}_hi"] + 1e-9, k
    assert b["AT_hi"] - b["AT_lo"] > 0  # a real interval
    curves = metrics.solved_by_turn(recs, 8, 5)
    assert curves["teacher"][-1] == pytest.approx(ref["RR"] + sum(s[0] >= 8 for s in scores) / len(scores))
    assert curves["teacher"] == sorted(curves["teacher"])


def _pair(n=80, improve=8, seed=0):
    """Model A's dialogues, and model B's on the same samples: the same, except that B refines
    ``improve`` of A's unrefined dialogues (a small, consistent gain)."""
    rng = __import__("random").Random(seed)
    a_scores, a_correct = [], []
    for _ in range(n):
        s = [rng.randint(1, 7) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.4 and len(s) < 5:
            s.append(rng.randint(8, 10))
        a_scores.append(s)
        a_correct.append([x >= 8 for x in s])
    b_scores = [list(s) for s in a_scores]
    fixable = [i for i, s in enumerate(b_scores) if s[-1] < 8 and len(s) >= 2][:improve]
    for i in fixable:
        b_scores[i][-1] = 9
    b_correct = [[x >= 8 for x in s] for s in b_scores]
    return _records(a_scores, a_correct), _records(b_scores, b_correct), len(fixable)


def test_paired_bootstrap_point_is_the_plain_difference():
    a, b, _ = _pair()
    d = metrics.paired_bootstrap(a, b, 8, 5, n_bootstrap=400, ci=0.95, seed=0)
    ma = metrics.bootstrap_metrics(a, 8, 5, n_bootstrap=10, ci=0.95, seed=0)
    mb = metrics.bootstrap_metrics(b, 8, 5, n_bootstrap=10, ci=0.95, seed=0)
    for k in ("AT", "ADR", "ATR", "RR", "RR_conditional", "AT_truth", "RR_truth", "accuracy_final",
              "teacher_truth_agreement"):
        assert d[k] == pytest.approx(mb[k] - ma[k]), k
        assert d[f"{k}_lo"] <= d[k] + 1e-9 <= d[f"{k}_hi"] + 2e-9, k
    assert d["n"] == 80
    same = metrics.paired_bootstrap(a, a, 8, 5, n_bootstrap=100, ci=0.95, seed=0)
    assert all(same[k] == 0 and same[f"{k}_lo"] == 0 and same[f"{k}_hi"] == 0 for k in ("AT", "RR", "ADR"))


def test_paired_bootstrap_sees_a_small_consistent_gain_that_overlapping_intervals_miss():
    """B refines 8 more of 80 dialogues than A and is never worse. Per-model intervals overlap
    (the wrong test would call it noise); the paired interval of B - A excludes 0."""
    a, b, fixed = _pair(n=80, improve=8)
    assert fixed == 8
    ma = metrics.bootstrap_metrics(a, 8, 5, n_bootstrap=1000, ci=0.95, seed=0)
    mb = metrics.bootstrap_metrics(b, 8, 5, n_bootstrap=1000, ci=0.95, seed=0)
    assert ma["RR_hi"] > mb["RR_lo"]  # the per-model intervals overlap
    d = metrics.paired_bootstrap(a, b, 8, 5, n_bootstrap=1000, ci=0.95, seed=0)
    assert d["RR"] == pytest.approx(8 / 80)
    assert d["RR_lo"] > 0 and d["ADR_lo"] > 0 and d["AT_hi"] < 0


def test_paired_bootstrap_matches_by_sample_and_refuses_other_samples():
    a, b, _ = _pair()
    shuffled = list(reversed(b))
    assert metrics.paired_bootstrap(a, shuffled, 8, 5, 200, 0.95, 0) == metrics.paired_bootstrap(a, b, 8, 5, 200, 0.95, 0)
    with pytest.raises(ValueError, match="different samples"):
        metrics.paired_bootstrap(a, b[1:], 8, 5, 200, 0.95, 0)
    with pytest.raises(ValueError, match="one dialogue per sample id"):
        metrics.paired_bootstrap(a + a[:1], b + b[:1], 8, 5, 200, 0.95, 0)


def test_text_metrics_tokenize_as_the_coco_caption_evaluation():
    """Punctuation and case do not count (PTBTokenizer as pycocoevalcap runs it): a prediction
    that differs from its reference only in those scores as identical."""
    assert metrics.coco_tokenize({"a": ["Look at the LEFT side, again!"], "b": ["...", ""]}) == {
        "a": ["look at the left side again"], "b": [metrics.EMPTY, metrics.EMPTY]}
    m = metrics.text_metrics({"a": "Look at the left side, again!", "b": "Count them: one by one."},
                             {"a": "look at the left side again", "b": "count them one by one"})
    assert m["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    # several references per id, and ids tokenized apart (no line shift from embedded newlines)
    m2 = metrics.text_metrics({"a": "the red\ncircle", "b": "two"}, {"a": ["a red circle", "the red circle"], "b": "two"})
    assert m2["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
