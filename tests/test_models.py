"""fire_core.models and fire_core.prompts: tokenizer, processor, chat template, the teacher
parser, save/load, and batched generation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fire_core import config, models, prompts, world
from fire_core.prompts import Turn, parse_teacher

SIZE = 64


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny tokenizer, processor and random model on 64x64 world images."""
    torch.manual_seed(0)
    cfg = config.load("01_train_base_vlm", ["scale=smoke"])
    samples = [world.make_sample(f, "train", i, 0, SIZE) for f in world.FAMILIES for i in range(10)]
    tok = models.train_tokenizer([s.question + "\n" + s.response for s in samples] + prompts.FEEDBACK_HINTS, 600)
    proc = models.build_processor(tok, cfg.model, SIZE)
    model = models.build_model(cfg.model, proc).eval()
    return cfg, samples, tok, proc, model


def _strip(msgs):
    return [{k: v for k, v in m.items() if k != "train"} for m in msgs]


def test_tokenizer_has_the_special_tokens(kit):
    _, _, tok, _, _ = kit
    assert tok.pad_token == "<pad>" and tok.bos_token == "<s>" and tok.eos_token == "<|end|>"
    assert tok.image_token == "<image>" and tok.convert_tokens_to_ids("<image>") == tok.image_token_id
    assert tok("<|user|>\n<image>\nhi")["input_ids"][:3] == tok.convert_tokens_to_ids(["<|user|>", "Ċ", "<image>"])
    # byte-level: any text encodes and decodes losslessly, even characters never seen
    text = "Zebra ÿ 42 ✓"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("position", models.IMAGE_POSITIONS)
@pytest.mark.parametrize("which", ["base", "student", "teacher", "student_prompt", "teacher_prompt"])
def test_python_renderer_equals_the_jinja_template(kit, which, position):
    _, samples, tok, _, _ = kit
    s = samples[0]
    turns = [Turn(s.response, 3, "Look again at the left."), Turn("The answer is 2.", 9, "Correct.")]
    msgs, gen = {
        "base": (prompts.base_messages([(s.question, s.response), ("And then?", "Yes.")]), False),
        "student": (prompts.student_messages(s.question, turns), False),
        "teacher": (prompts.teacher_messages(s.question, s.answer, turns), False),
        "student_prompt": (prompts.student_prompt(s.question, turns), True),
        "teacher_prompt": (prompts.teacher_prompt(s.question, s.answer, turns[:1], "It is 4."), True),
    }[which]
    py, _ = models.render_chat(msgs, add_generation_prompt=gen, image_position=position)
    assert py == tok.apply_chat_template(_strip(msgs), tokenize=False, add_generation_prompt=gen,
                                         chat_template=models.chat_template(position))
    # the image before or after the first user message's text, never elsewhere
    user = py.split("<|user|>\n", 1)[1].split("<|end|>", 1)[0]
    assert user.startswith("<image>\n") if position == "before_text" else user.endswith("\n<image>")
    assert py.count("<image>") == 1


def test_the_processor_and_its_tokenizer_carry_the_configured_template(kit):
    cfg, _, tok, _, _ = kit
    mcfg = dataclasses.replace(cfg.model, image_position="after_text")
    proc = models.build_processor(copy.deepcopy(tok), mcfg, cfg.world.image_size)  # the kit's own stays as it is
    assert proc.chat_template == proc.tokenizer.chat_template == models.chat_template("after_text")
    msgs = _strip(prompts.base_messages([("What color is the star?", "Blue.")]))
    assert "What color is the star?\n<image><|end|>" in proc.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(ValueError, match="image_position"):
        models.chat_template("middle")


def test_tokenizer_and_processor_round_trip(kit, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    _, samples, tok, proc, _ = kit
    proc.save_pretrained(tmp_path)
    tok2, proc2 = AutoTokenizer.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    texts = [models.render_chat(prompts.base_messages([(s.question, s.response)]))[0] for s in samples[:3]]
    images = [s.image for s in samples[:3]]
    a = proc(text=texts, images=images, return_tensors="pt", padding=True)
    b = proc2(text=texts, images=images, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert tok2(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
    assert tok2.chat_template == tok.chat_template


@pytest.mark.parametrize("size, patch, expected", [(64, 16, 16 + 4 * 5), (96, 16, 36 + 6 * 7)])
def test_image_token_expansion(kit, size, patch, expected):
    cfg, _, tok, _, _ = kit
    cfg.model.patch_size = patch
    proc = models.build_processor(tok, cfg.model, size)
    # LLaVA-NeXT: the base image plus one anyres tile with a newline token per row
    assert models.num_image_tokens(proc, size) == expected


def test_patch_must_divide_the_image(kit):
    cfg, _, tok, _, _ = kit
    cfg.model.patch_size = 24
    with pytest.raises(ValueError, match="must divide world.image_size=64"):
        models.build_processor(tok, cfg.model, 64)
    cfg.model.patch_size = 16


def test_model_is_llava_next_with_a_small_vision_tower(kit):
    from transformers import LlavaNextForConditionalGeneration

    cfg, _, _, _, model = kit
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.text_config.model_type == "llama"
    assert model.config.text_config.hidden_size == cfg.model.hidden_size
    counts = models.param_count(model)
    assert 0 < counts["vision"] < counts["total"]


def test_projector_init_torch_draws_nn_linears_own_uniform_weights(kit):
    import dataclasses

    cfg, _, _, proc, model = kit
    hf = model.model.multi_modal_projector.linear_1.weight
    assert abs(float(hf.std()) - 0.02) < 0.004  # transformers' normal(0, 0.02)
    torch.manual_seed(0)
    drawn = models.build_model(dataclasses.replace(cfg.model, projector_init="torch"), proc)
    for layer in (drawn.model.multi_modal_projector.linear_1, drawn.model.multi_modal_projector.linear_2):
        bound = 1 / layer.in_features ** 0.5
        w = layer.weight
        assert float(w.abs().max()) <= bound and float(w.std()) > 0.8 * bound / 3 ** 0.5  # uniform(-b, b)
        assert float(layer.bias.abs().max()) <= bound and float(layer.bias.abs().max()) > 0
    # only the projector differs from the default draw: the decoder is the same
    torch.manual_seed(0)
    default = models.build_model(cfg.model, proc)
    lm = dict(default.model.language_model.named_parameters())
    assert all(torch.equal(p, lm[n]) for n, p in drawn.model.language_model.named_parameters())


def test_save_and_load_give_identical_logits(kit, tmp_path):
    _, samples, _, proc, model = kit
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model2, proc2 = models.load(tmp_path)
    text = models.render_chat(prompts.base_messages([(samples[1].question, samples[1].response)]))[0]
    enc = proc(text=[text], images=[samples[1].image], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, model2.eval()(**enc).logits)
    with pytest.raises(FileNotFoundError, match="no saved model"):
        models.load(tmp_path / "missing")


def test_batched_greedy_equals_one_at_a_time(kit):
    _, samples, _, proc, model = kit
    picked = samples[::9][:6]  # different families, different prompt lengths
    convs = [prompts.student_prompt(s.question, [Turn("It is 3.", 2, "Count again carefully.")] if k % 2 else [])
             for k, s in enumerate(picked)]
    images = [s.image for s in picked]
    batched = models.generate(model, proc, convs, images, max_new_tokens=12, batch_size=6)
    single = [models.generate(model, proc, [c], [im], max_new_tokens=12, batch_size=1)[0]
              for c, im in zip(convs, images, strict=True)]
    assert batched == single
    assert len(set(len(c) for c in convs)) > 1  # really mixed lengths: left padding was exercised


def test_sampling_is_reproducible_under_a_seed(kit):
    _, samples, _, proc, model = kit
    convs = [prompts.student_prompt(s.question, []) for s in samples[:4]]
    images = [s.image for s in samples[:4]]
    a = models.generate(model, proc, convs, images, max_new_tokens=10, do_sample=True, seed=1)
    b = models.generate(model, proc, convs, images, max_new_tokens=10, do_sample=True, seed=1)
    c = models.generate(model, proc, convs, images, max_new_tokens=10, do_sample=True, seed=2)
    assert a == b and a != c


def test_generate_checks_its_inputs(kit):
    _, samples, _, proc, model = kit
    with pytest.raises(ValueError, match="2 conversations but 1 images"):
        models.generate(model, proc, [[], []], [samples[0].image])


# ----------------------------------------------------------------------------- the teacher parser
@pytest.mark.parametrize(
    "text, score, feedback, ok",
    [
        ("Score: 7\nFeedback: Look at the left edge.", 7, "Look at the left edge.", True),
        ("score:3 feedback: count again", 3, "count again", True),
        ("SCORE : 10\nFEEDBACK:Correct.", 10, "Correct.", True),
        ("Score: 8/10\nFeedback: Nearly.", 8, "Nearly.", True),
        ("Score: 6.0\nFeedback: ok", 6, "ok", True),
        ("  Score:   2  \n\n Feedback:  Wrong colour. \n", 2, "Wrong colour.", True),
        ("Score: 4\nThe bar is higher than that.", 4, "The bar is higher than that.", True),
        ("Score: 11\nFeedback: too high", None, "too high", False),
        ("Score: 0\nFeedback: too low", None, "too low", False),
        ("Score: 6.5\nFeedback: half", None, "half", False),
        ("Feedback: no score here", None, "no score here", False),
        ("", None, "", False),
        ("Score: seven\nFeedback: words", None, "words", False),
    ],
)
def test_parse_teacher(text, score, feedback, ok):
    out = parse_teacher(text)
    assert (out.score, out.feedback, out.parsable) == (score, feedback, ok)


def test_parse_teacher_never_raises_on_junk():
    for junk in [None, 5, "Score:", "Score: -3", "\x00\x01", "Score: 99999999999999999999"]:
        assert parse_teacher(junk).parsable is False  # type: ignore[arg-type]


def test_teacher_reply_round_trips_through_the_parser():
    t = Turn("It is 3.", 4, "Count the stars on the right again.")
    out = parse_teacher(prompts.teacher_reply(t))
    assert (out.score, out.feedback, out.verdict) == (4, t.feedback, None)  # FIRE's format: no verdict line


@pytest.mark.parametrize("verdict", [True, False])
def test_world_teacher_reply_states_its_verdict_before_the_score(verdict):
    t = Turn("It is 3.", 9 if verdict else 4, "Count the stars on the right again.", verdict=verdict)
    text = prompts.teacher_reply(t)
    assert text.splitlines()[0] == f"Same answer: {'yes' if verdict else 'no'}"
    assert text.splitlines()[1] == f"Score: {t.score}"
    out = parse_teacher(text)
    assert (out.score, out.feedback, out.verdict, out.parsable) == (t.score, t.feedback, verdict, True)
    # a reply with a verdict but no score is still "failed to follow"
    assert parse_teacher("Same answer: yes\nFeedback: fine").parsable is False
