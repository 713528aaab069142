"""The paper-scale code path on the CPU, up to the device: training labels from the model's own
chat template (ours, and llama3-llava-next's on a tiny random LlavaNext of the 8B's
architecture), image placeholders expanded per image size and aspect ratio, the device policy,
and a real short fit of the paper-architecture model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from fire_core import config, models, prompts, sft, world
from fire_core.config import ModelConfig
from fire_core.prompts import Turn
from fire_core.sft import IGNORE

SIZE = 64
# sizes and aspect ratios that land on different anyres grids (scaled from 336: 28 px)
SIZES = [(28, 28), (40, 30), (28, 84), (90, 50), (61, 117)]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """A tiny random LlavaNext with llama3-llava-next-8b's architecture and chat format, loaded
    the way scale=paper loads the released model (``models.load_pretrained`` on a local path)."""
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.SEEN for i in range(6)]
    texts = [s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS
    d = tmp_path_factory.mktemp("llama3_llava_next")
    for part in models.build_paper_like(texts):
        part.save_pretrained(d)
    model, proc = models.load_pretrained(ModelConfig(kind="pretrained", pretrained_id=str(d), dtype="float32"))
    return samples, model, proc


@pytest.fixture(scope="module")
def tiny():
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.SEEN for i in range(4)]
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS, 600)
    return samples, models.build_processor(tok, config.load("01_train_base_vlm", ["scale=smoke"]).model, SIZE)


def _chats(s):
    turns = [Turn("I think it is wrong.", 2, "Look again at the left."), Turn(s.response, 9, "Correct.")]
    return {"base": prompts.base_messages([(s.question, s.response), ("How many shapes?", "Three.")]),
            "student": prompts.student_messages(s.question, turns),
            "teacher": prompts.teacher_messages(s.question, s.answer, turns)}


def test_our_template_gives_the_same_text_and_spans_as_its_python_renderer(tiny):
    samples, proc = tiny
    for s in samples[:6]:
        for msgs in _chats(s).values():
            assert sft.chat_spans(msgs, proc) == models.render_chat(msgs)


@pytest.mark.parametrize("role", ["base", "student", "teacher"])
def test_llama3_labels_fall_exactly_on_the_assistant_turns_and_their_eot(paper, role):
    samples, _, proc = paper
    tok = proc.tokenizer
    s = samples[4]
    msgs = _chats(s)[role]
    enc = sft.encode(msgs, proc, 4096)
    # every trained token is its own label; the labelled tokens decode to exactly the replies
    assert all(lab in (IGNORE, tid) for tid, lab in zip(enc["input_ids"], enc["labels"], strict=True))
    runs, cur = [], []
    for tid, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE:
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    assert runs == [m["content"] + "<|eot_id|>" for m in msgs if m.get("train")]
    # the header before a reply and the user turns carry no loss
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab == IGNORE
                       and t != models.image_token_id(proc)]).count("<|start_header_id|>assistant<|end_header_id|>")


def test_training_prompt_is_tokenised_as_generation_tokenises_it(paper):
    """Trained in one format, prompted in the same: the tokens before the first reply are the
    tokens generation feeds for that prompt (the processor, its template, one BOS)."""
    samples, _, proc = paper
    s = samples[1]
    msgs = prompts.base_messages([(s.question, s.response)])
    enc = sft.encode(msgs, proc, 4096, [s.image.size])
    prompt = proc.apply_chat_template([{k: v for k, v in m.items() if k != "train"} for m in msgs[:-1]],
                                      add_generation_prompt=True, tokenize=False)
    gen = proc(text=[prompt], images=[s.image], return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()
    assert enc["input_ids"][:len(gen)] == gen
    assert enc["labels"][len(gen) - 1] == IGNORE and enc["labels"][len(gen)] != IGNORE  # the reply starts right there
    assert gen.count(proc.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("size", SIZES)
def test_each_image_expands_to_the_processors_own_count_for_its_size(paper, size):
    samples, model, proc = paper
    img = Image.new("RGB", size, (200, 40, 40))
    msgs = prompts.student_messages(samples[0].question, [Turn("It is red.", 3, "Look again."), Turn("Blue.", 9, "Yes.")])
    enc = sft.encode(msgs, proc, 4096, [size])
    text, _ = sft.chat_spans(msgs, proc)
    ref = proc(text=[text], images=[img], return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()
    assert enc["input_ids"] == ref


def test_a_batch_of_mixed_sizes_runs_through_the_model(paper):
    samples, model, proc = paper
    ex = [sft.Example(prompts.base_messages([(samples[k].question, samples[k].response)]),
                      Image.new("RGB", sz, (30 * k, 90, 160))) for k, sz in enumerate(SIZES)]
    ds = sft.SFTDataset(ex, proc, 4096)
    counts = {sum(t == models.image_token_id(proc) for t in e["input_ids"]) for e in ds.encoded}
    assert len(counts) > 2  # the sizes really give different anyres layouts
    batch = sft.Collator(proc)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        loss = model(**batch).loss  # raises if image features and placeholder tokens disagree
    assert torch.isfinite(loss)


def test_a_template_that_is_not_append_only_is_refused(paper):
    _, _, proc = paper
    bad = copy.copy(proc)
    bad.chat_template = "{{ messages | length }}" + models.LLAMA3_TEMPLATE
    with pytest.raises(ValueError, match="not append-only"):
        sft.chat_spans(prompts.base_messages([("Q?", "A.")]), bad)


def test_the_paper_architecture_model_learns_through_the_trainer(paper, tmp_path):
    samples, model, proc = paper
    net = copy.deepcopy(model)
    train = [sft.Example(prompts.base_messages([(s.question, s.response)]), s.image) for s in samples[:40]]
    held = [sft.Example(prompts.base_messages([(s.question, s.response)]), s.image) for s in samples[40:]]
    tcfg = config.TrainConfig(learning_rate=3e-3, batch_size=8, epochs=1)
    res = sft.fit(net, proc, sft.SFTDataset(train, proc, 4096), tcfg, tmp_path, seed=0, max_steps=25,
                  heldout=sft.SFTDataset(held, proc, 4096))
    assert res.heldout_loss_after < res.heldout_loss_before - 0.5, (res.heldout_loss_before, res.heldout_loss_after)


def test_device_policy(monkeypatch):
    from fire_core.provenance import device

    monkeypatch.delenv("FIRE_DEVICE", raising=False)
    assert device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("FIRE_DEVICE", "cpu")
    assert device().type == "cpu"
    monkeypatch.setenv("FIRE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="FIRE_DEVICE must be 'cpu' or 'cuda'"):
        device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("FIRE_DEVICE", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            device()


def test_cuda_gpu_count_matches_torch_and_skips_torch_without_a_driver(monkeypatch):
    """The count the planner uses is torch's; without an NVIDIA driver node it is 0 and a fresh
    process that asks does not import torch."""
    import os
    import subprocess
    import sys

    from fire_core import provenance

    assert provenance.cuda_gpu_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    monkeypatch.setattr(os.path, "exists", lambda p: True)  # as if a driver node were there: torch decides
    assert provenance.cuda_gpu_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    monkeypatch.undo()
    # a fresh process on a machine without driver nodes (faked, so this holds on GPU machines too)
    probe = ("import glob, os, sys; os.path.exists = lambda p: False; glob.glob = lambda p: []; "
             "from fire_core import provenance; print(provenance.cuda_gpu_count(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False"]


# ----------------------------------------------------------------------------- the released data, end to end
HUB = ["scale=gpu_smoke", "runtime.device=cpu", "data.source=hub"]
HUB_STAGES = [("00_build_world", "world"), ("01_train_base_vlm", "base_vlm"), ("02_generate_fire100k", "fire100k"),
              ("03_train_teacher", "teacher"), ("04_train_student", "student"), ("05_simulate_fire1m", "fire1m"),
              ("06_fire_bench", "firebench")]


def _run_stages(root, data_dir, stages):
    import subprocess
    import sys

    code = ("import sys; from fire_core import config, provenance; import importlib\n"
            "for name, mod in [s.split(':') for s in sys.argv[2:]]:\n"
            "    cfg = config.load(name, " + repr(HUB) + " + ['data.dir=' + sys.argv[1], 'paths.results=" + str(root) + "'])\n"
            "    importlib.import_module('fire_core.stages.' + mod).run(cfg); provenance.mark_done(cfg)\n")
    return subprocess.run([sys.executable, "-c", code, str(data_dir), *[f"{n}:{m}" for n, m in stages]],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """Stages 00-06 at scale=gpu_smoke with data.source=hub on the fixture files, on the CPU."""
    root = tmp_path_factory.mktemp("hub")
    proc = _run_stages(root, Path(__file__).parent / "fixtures" / "fire", HUB_STAGES)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "gpu_smoke"


@pytest.mark.slow
def test_the_paper_classes_run_stages_00_to_06_on_the_released_data_layout(hub_run):
    """scale=gpu_smoke (LLaVA-NeXT-8B's classes, anyres and llama3 format at toy sizes) with
    data.source=hub on the fixture files, on the CPU: every stage that reads FIRE's data."""
    import json

    from fire_core import records

    fix = Path(__file__).parent / "fixtures" / "fire"
    run = hub_run
    got = [json.loads(x) for x in (run / "02_generate_fire100k" / "fire100k.jsonl").read_text().splitlines()]
    want = records.load_fire(fix / "FIRE-train-100K.json", fix / "images")
    assert [(r["id"], r["turns"]) for r in got] == [(r["id"], r["turns"]) for r in want]
    template = (run / "03_train_teacher" / "model" / "chat_template.jinja").read_text()
    assert "<|start_header_id|>" in template  # trained and saved in the 8B's own format
    sim = json.loads((run / "05_simulate_fire1m" / "simulation_stats.json").read_text())
    assert sim["samples"] == 1 and sim["generated"] == 1
    bench = json.loads((run / "06_fire_bench" / "fire_bench.json").read_text())
    assert bench["data"] == "hub" and {h["model"] for h in bench["headline"]} == {"base", "fire100k_student", "fire_student"}
    free = [json.loads(x) for x in (run / "06_fire_bench" / "free_dialogues.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in free} == {"teacher"} and all(t["correct"] is None for r in free for t in r["turns"])
    assert all(r["image"].endswith("000000000285.jpg") for r in free)
    curves = json.loads((run / "06_fire_bench" / "solved_by_turn_curves.json").read_text())
    assert all(set(c) == {"teacher"} for c in curves.values())  # no checker's curve on real data
    for stage, _ in HUB_STAGES:
        assert json.loads((run / stage / "manifest.json").read_text())["device"] == "cpu"


@pytest.mark.slow
def test_a_missing_image_stops_stage_02_before_it_writes(hub_run, tmp_path):
    import shutil

    fix = Path(__file__).parent / "fixtures" / "fire"
    data = tmp_path / "data"
    shutil.copytree(fix, data)
    (data / "images" / "textvqa" / "0a1b2c3d.jpg").unlink()
    for stage, _ in HUB_STAGES[:2]:  # stages 00-01 do not read the released files
        shutil.copytree(hub_run / stage, tmp_path / "gpu_smoke" / stage)
    proc = _run_stages(tmp_path, data, HUB_STAGES[2:3])
    assert proc.returncode != 0
    assert "1 of 2 records of" in proc.stderr and "0a1b2c3d.jpg" in proc.stderr
    assert not (tmp_path / "gpu_smoke" / "02_generate_fire100k" / "fire100k.jsonl").exists()
