"""fire_core.sft and fire_core.vision: role masking token by token, truncation, real training (loss goes down),
LoRA isolation, resume equivalence, and DeepSpeed ZeRO-2/3 through the Trainer."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from fire_core import config, models, prompts, sft, vision, world
from fire_core.prompts import Turn
from fire_core.sft import IGNORE

SIZE = 64


@pytest.fixture(scope="module")
def kit():
    torch.manual_seed(0)
    cfg = config.load("01_train_base_vlm", ["scale=smoke", "train.batch_size=4", "train.learning_rate=3e-3"])
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.SEEN for i in range(8)]
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS, 600)
    proc = models.build_processor(tok, cfg.model, SIZE)
    return cfg, samples, tok, proc


def _turns(s):
    return [Turn("I think it is wrong.", 2, "Look again at the left."), Turn(s.response, 9, "Correct.")]


def _labelled_text(tok, enc):
    return tok.decode([t for t in enc["labels"] if t != IGNORE])


@pytest.mark.parametrize("role", ["base", "student", "teacher"])
def test_labels_cover_exactly_the_target_turns(kit, role):
    _, samples, tok, proc = kit
    s = samples[3]
    turns = _turns(s)
    msgs = {"base": prompts.base_messages([(s.question, s.response), ("How many shapes?", "Three.")]),
            "student": prompts.student_messages(s.question, turns),
            "teacher": prompts.teacher_messages(s.question, s.answer, turns)}[role]
    n_img = models.num_image_tokens(proc, SIZE)
    enc = sft.encode(msgs, proc, max_length=1024)
    targets = [m["content"] for m in msgs if m["train"]]
    assert _labelled_text(tok, enc) == "".join(t + "<|end|>" for t in targets)
    # token by token: a label is either -100 or the token itself
    assert all(lab in (IGNORE, tid) for tid, lab in zip(enc["input_ids"], enc["labels"], strict=True))
    # the image is expanded to n_img tokens, none of them labelled
    img_pos = [i for i, t in enumerate(enc["input_ids"]) if t == tok.image_token_id]
    assert len(img_pos) == n_img and img_pos == list(range(img_pos[0], img_pos[0] + n_img))
    assert all(enc["labels"][i] == IGNORE for i in img_pos)
    text = tok.decode(enc["input_ids"])
    if role == "student":
        assert s.answer not in text.split("<|user|>")[1] or s.answer in s.question  # no ground truth shown
        assert "Feedback: Look again at the left." in text and "Score:" not in text
    if role == "teacher":
        assert f"Correct answer: {s.answer}" in text
        assert "Score: 2\nFeedback: Look again at the left.<|end|>" in _labelled_text(tok, enc)
        assert "I think it is wrong." not in _labelled_text(tok, enc)  # the student's words carry no loss


def test_encoding_matches_the_processor(kit):
    _, samples, tok, proc = kit
    s = samples[0]
    msgs = prompts.student_messages(s.question, _turns(s))
    enc = sft.encode(msgs, proc, 1024)
    ref = proc(text=[models.render_chat(msgs)[0]], images=[s.image], return_tensors="pt")
    assert enc["input_ids"] == ref["input_ids"][0].tolist()


def test_truncation_keeps_the_image_and_cuts_at_a_turn_boundary(kit):
    _, samples, tok, proc = kit
    s = samples[2]
    turns = [Turn(f"Attempt {k}: " + s.response, 3, "Try again, look at every shape.") for k in range(6)]
    msgs = prompts.student_messages(s.question, turns)
    n_img = models.num_image_tokens(proc, SIZE)
    full = sft.encode(msgs, proc, 4096)
    limit = len(full["input_ids"]) - 20
    cut = sft.encode(msgs, proc, limit)
    assert len(cut["input_ids"]) <= limit
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]
    assert cut["input_ids"][-1] == tok.eos_token_id  # a whole turn, not half of one
    assert sum(t == tok.image_token_id for t in cut["input_ids"]) == n_img
    with pytest.raises(ValueError, match="model.max_length=30 is too short: the image alone needs"):
        sft.encode(msgs, proc, 30)


def _dataset(kit, n=32, held_out=False):
    cfg, samples, tok, proc = kit
    chosen = samples[:n]
    if held_out:  # new val samples of the same families, never trained on
        chosen = [world.make_sample(f, "val", i, 0, SIZE) for f in dict.fromkeys(s.family for s in chosen)
                  for i in range(4)]
    ex = [sft.Example(prompts.base_messages([(s.question, s.response)]), s.image) for s in chosen]
    return sft.SFTDataset(ex, proc, cfg.model.max_length)


def test_training_lowers_the_loss(kit, tmp_path):
    cfg, _, _, proc = kit
    torch.manual_seed(0)
    model = models.build_model(cfg.model, proc)
    ds = _dataset(kit)
    held = _dataset(kit, held_out=True)
    cfg.train.epochs = 4
    res = sft.fit(model, proc, ds, cfg.train, tmp_path, seed=0, logging_steps=4, save_dir=tmp_path / "model",
                    heldout=held)
    # the same fixed held-out chats before and after, never one noisy step against another
    assert res.heldout_loss_after < res.heldout_loss_before - 1.0, (res.heldout_loss_before, res.heldout_loss_after)
    assert res.heldout_loss_after == pytest.approx(sft.heldout_loss(res.model, held, proc))
    assert res.steps == 4 * len(ds) // cfg.train.batch_size
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "processor_config.json").is_file()


def test_lora_adapts_only_the_language_model(kit, tmp_path):
    cfg, _, _, proc = kit
    torch.manual_seed(0)
    base = models.build_model(cfg.model, proc)
    base.save_pretrained(tmp_path / "base")  # a base loaded from a directory: the adapter names it
    proc.save_pretrained(tmp_path / "base")
    base, _ = models.load(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tcfg = config.load("01_train_base_vlm", ["scale=smoke", "train.method=lora", "train.lora_r=4",
                                             "train.lora_alpha=16", "train.learning_rate=5e-3",
                                             "train.batch_size=4"]).train
    res = sft.fit(base, proc, _dataset(kit, 16), tcfg, tmp_path, seed=0, max_steps=6,
                    save_dir=tmp_path / "adapter")
    peft_model = res.model
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all("language_model" in n and n.endswith(("q_proj", "k_proj")) for n in adapted)
    assert not any("vision_tower" in n for n in adapted)
    assert len(adapted) == 2 * cfg.model.num_layers
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "base and vision weights must not change"
    lora_b = [v for k, v in peft_model.state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b), "the adapter was trained"
    reloaded, _ = models.load(tmp_path / "adapter")  # the adapter reloads onto its base
    assert {n for n, m in reloaded.named_modules() if hasattr(m, "lora_A")} == adapted


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(kit, tmp_path):
    cfg, _, _, proc = kit
    ds = _dataset(kit, 24)
    cfg.train.epochs = 1

    from transformers import TrainerCallback

    class Kill(TrainerCallback):  # the run dies right after its checkpoint at step 3
        def on_save(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 3

    def run(d, callbacks=()):
        torch.manual_seed(0)
        model = models.build_model(cfg.model, proc)
        return sft.fit(model, proc, ds, cfg.train, d, seed=0, max_steps=6, save_steps=3, callbacks=callbacks)

    full = run(tmp_path / "full")
    killed = run(tmp_path / "cut", [Kill()])
    assert killed.steps == 3
    resumed = run(tmp_path / "cut")  # the rerun picks up at step 3
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-3")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert full.losses[-1][1] == pytest.approx(resumed.losses[-1][1], abs=1e-5)


DS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from fire_core import config, models, prompts, sft, world
    stage, method, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cfg = config.load("01_train_base_vlm", ["scale=smoke", f"train.deepspeed=conf/deepspeed/zero{stage}.json",
                      "train.bf16=true", f"train.method={method}", "train.batch_size=4", "train.lora_r=4",
                      "train.learning_rate=5e-3"])
    samples = [world.make_sample(f, "train", i, 0, 64) for f in world.SEEN for i in range(2)]
    tok = models.train_tokenizer([s.question + " " + s.response for s in samples], 400)
    proc = models.build_processor(tok, cfg.model, 64)
    torch.manual_seed(0)
    base = models.build_model(cfg.model, proc)
    base.save_pretrained(out / "base"); proc.save_pretrained(out / "base")
    base, _ = models.load(out / "base")
    ds = sft.SFTDataset([sft.Example(prompts.base_messages([(s.question, s.response)]), s.image)
                           for s in samples[:8]], proc, 256)
    res = sft.fit(base, proc, ds, cfg.train, out, seed=0, max_steps=8, logging_steps=1, save_dir=out / "model")
    enc = proc(text=[models.render_chat(prompts.base_messages([(samples[0].question, samples[0].response)]))[0]],
               images=[samples[0].image], return_tensors="pt")
    with torch.no_grad():
        logits = res.model(**enc).logits
    print("RESULT" + json.dumps({"losses": [l for _, l in res.losses], "finite": bool(torch.isfinite(logits).all()),
                                 "type": type(res.model).__name__}))
""")


@pytest.mark.parametrize("stage, method", [(2, "full"), (3, "full"), (3, "lora")])
def test_deepspeed_zero_through_the_trainer(tmp_path, stage, method):
    """A short real run under ZeRO-2/3 (single process, gloo on CPU); (3, lora) is the paper's recipe."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT, str(stage), method, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=config.REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["finite"]
    losses = res["losses"]
    assert min(losses[-3:]) < losses[0], losses
    assert not list(tmp_path.glob("**/*.so")), "nothing may be compiled"


def test_vision_pretraining_learns_patch_labels_and_freezing_holds(kit, tmp_path):
    import datasets

    cfg, samples, tok, proc = kit
    rows = [world.make_sample(f, "train", i, 1, SIZE) for f in world.SEEN for i in range(30)]
    ds = datasets.Dataset.from_dict({"image": [s.image for s in rows],
                                     "scene": [json.dumps(s.scene) for s in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "scene": datasets.Value("string")}))
    torch.manual_seed(0)
    model = models.build_model(cfg.model, proc)
    res = vision.pretrain_vision(model, ds, steps=200, batch_size=32, lr=5e-3, seed=0, heldout=40)
    assert sum(res.losses[-5:]) / 5 < res.losses[0] / 2, res.losses[::10]
    assert res.patch_accuracy["colour"] > 0.3  # chance among 10 colours is 0.1
    vision.freeze_vision(model)
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    proj_before = model.model.multi_modal_projector.linear_1.weight.clone()
    sft.fit(model, proc, _dataset(kit, 16), cfg.train, tmp_path, seed=0, max_steps=3)
    after = model.model.vision_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen tower must not move"
    assert not torch.equal(proj_before, model.model.multi_modal_projector.linear_1.weight), "the projector trains"


def test_checkpoints_of_another_run_are_not_resumed(kit, tmp_path):
    cfg, _, _, proc = kit
    ds = _dataset(kit, 16)
    torch.manual_seed(0)
    sft.fit(models.build_model(cfg.model, proc), proc, ds, cfg.train, tmp_path, seed=0, max_steps=2, save_steps=1)
    other = config.load("01_train_base_vlm", ["scale=smoke", "train.batch_size=4", "train.learning_rate=1e-4"]).train
    res = sft.fit(models.build_model(cfg.model, proc), proc, ds, other, tmp_path, seed=0, max_steps=2, save_steps=1)
    assert res.resumed_from is None  # a different learning rate is a different run


def test_the_training_loss_projects_only_trained_positions_and_equals_the_stock_loss(kit):
    cfg, _, _, proc = kit
    torch.manual_seed(0)
    model = models.build_model(cfg.model, proc)
    ds = _dataset(kit)
    batch = sft.Collator(proc)([ds[i] for i in range(4)])
    stock = model(**batch).loss
    positions = sft.TrainedPositions()
    hook = model.get_output_embeddings().register_forward_pre_hook(positions)
    try:
        total, count, out = sft.trained_positions_loss(model, batch, positions)
        n_trained = int((batch["labels"][:, 1:] != IGNORE).sum())
        assert int(count) == n_trained and out.logits.shape[:2] == (1, n_trained)  # nothing else projected
        assert float(total / count) == pytest.approx(float(stock), rel=1e-5)
        (total / count).backward()
        assert model.get_output_embeddings().weight.grad.abs().sum() > 0
        assert positions.keep is None and model(**batch).logits.shape[1] == batch["input_ids"].shape[1]  # hook idle
    finally:
        hook.remove()


def test_a_linear_projector_stays_one_linear_map_and_untied_embeddings_are_separate(kit, tmp_path):
    """model.projector=linear (LLaVA-1's projector in LLaVA-NeXT's class): the second layer is
    the identity and stays so through training and save/load; model.tie_embeddings=false gives
    the decoder an output layer of its own."""
    cfg, _, _, proc = kit
    mcfg = dataclasses.replace(cfg.model, projector="linear", tie_embeddings=False)
    torch.manual_seed(0)
    model = models.build_model(mcfg, proc)
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    x = torch.randn(5, cfg.model.vision_hidden_size)
    with torch.no_grad():
        assert torch.allclose(proj(x), proj.linear_1(x), atol=1e-6)
    lm_in, lm_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert lm_in.data_ptr() != lm_out.data_ptr()
    vision.freeze_vision(model)
    w1, out_before = proj.linear_1.weight.clone(), lm_out.detach().clone()
    sft.fit(model, proc, _dataset(kit, 16), cfg.train, tmp_path, seed=0, max_steps=3, save_dir=tmp_path / "m")
    assert torch.equal(proj.linear_2.weight, torch.eye(cfg.model.hidden_size)) and not proj.linear_2.bias.any()
    assert not torch.equal(w1, proj.linear_1.weight), "the linear map trains"
    assert not torch.equal(out_before, lm_out) and not torch.equal(lm_in, lm_out)
    loaded, _ = models.load(tmp_path / "m")
    assert loaded.config.projector_hidden_act == "linear" and not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.allclose(loaded.model.multi_modal_projector(x), proj(x), atol=1e-6)
    tied = models.build_model(cfg.model, proc)  # the defaults: LLaVA-NeXT's MLP, tied embeddings
    assert tied.config.projector_hidden_act == "gelu"
    assert tied.get_input_embeddings().weight.data_ptr() == tied.get_output_embeddings().weight.data_ptr()


def test_patch_regions_follow_the_worlds_region_names_and_the_tower_learns_them(kit):
    import datasets

    names = [world.REGIONS[k] for k in world.patch_regions(6, 96)]
    assert names[0] == "top left" and names[5] == "top right" and names[35] == "bottom right"
    assert names[14] == names[21] == "center" and names[12] == "left" and names[3] == "top"
    cfg, _, _, proc = kit
    rows = [world.make_sample(f, "train", i, 2, SIZE) for f in ("color", "count") for i in range(40)]
    ds = datasets.Dataset.from_dict({"image": [s.image for s in rows], "scene": [json.dumps(s.scene) for s in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "scene": datasets.Value("string")}))
    torch.manual_seed(0)
    res = vision.pretrain_vision(models.build_model(cfg.model, proc), ds, steps=150, batch_size=16, lr=5e-3, seed=0,
                                 heldout=20, regions=True)
    assert res.patch_accuracy["region"] > 0.5, res.patch_accuracy  # chance among 9 regions is 0.11


def test_a_tagging_tower_hands_the_projector_its_heads_one_hot_labels_and_reloads(kit, tmp_path):
    import dataclasses

    import datasets

    from fire_core import tagger

    cfg, samples, tok, proc = kit
    mcfg = dataclasses.replace(cfg.model, vision_output="tags", vision_hidden_size=96)
    with pytest.raises(ValueError, match="does not fit in the tower's hidden size 32"):
        models.build_model(dataclasses.replace(mcfg, vision_hidden_size=32), proc)
    rows = [world.make_sample(f, "train", i, 3, SIZE) for f in ("color", "ocr") for i in range(30)]
    ds = datasets.Dataset.from_dict({"image": [s.image for s in rows], "scene": [json.dumps(s.scene) for s in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "scene": datasets.Value("string")}))
    torch.manual_seed(0)
    model = models.build_model(mcfg, proc)
    tower = model.model.vision_tower
    assert tagger.is_tagger(tower) and type(tower).__name__ == "TaggerVisionModel"
    heads_before = [h.weight.clone() for h in tower.heads]
    res = vision.pretrain_vision(model, ds, steps=150, batch_size=16, lr=5e-3, seed=0, heldout=20)
    assert all(not torch.equal(b, h.weight) for b, h in zip(heads_before, tower.heads, strict=True)), \
        "pretraining trains the tagger's own heads"
    assert res.patch_accuracy["colour"] > 0.3, res.patch_accuracy  # the accuracy of what the tagger outputs
    vision.freeze_vision(model)
    assert not any(p.requires_grad for p in tower.parameters())

    pixels = proc.image_processor([samples[0].image, samples[40].image], return_tensors="pt")["pixel_values"][:, 0]
    with torch.no_grad():
        code = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        tags = tower.tags(tower.features(pixels))
    sizes = [len(world.PATCH_COLORS), len(world.PATCH_KINDS), len(world.PATCH_CHARS), len(world.REGIONS)]
    blocks = torch.split(code, [*sizes, code.shape[-1] - sum(sizes)], dim=-1)
    grid = SIZE // mcfg.patch_size
    for block, t in zip(blocks, tags, strict=False):  # one 1 per patch, where the head's argmax is
        assert torch.equal(block, torch.nn.functional.one_hot(t, block.shape[-1]).float())
    assert blocks[3].argmax(-1).tolist() == [world.patch_regions(grid, SIZE)] * 2 and torch.all(blocks[3].sum(-1) == 1)
    assert not blocks[4].any(), "dimensions past the code stay zero"

    model.eval()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, _ = models.load(tmp_path)
    assert type(again.model.vision_tower) is type(tower)
    enc = proc(images=[samples[0].image], text=["<image>\nWhat colour?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc).logits), "a saved tagger reloads to the same model"
