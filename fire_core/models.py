"""Tokenizer, processor and VLMs: the tiny LLaVA-NeXT stand-in and the paper's LLaVA-NeXT-8B.

Both go through the same transformers classes (``LlavaNextForConditionalGeneration`` and
``LlavaNextProcessor``), so the training and generation code never asks which one it has::

    tok = models.train_tokenizer(texts, vocab_size=2048)
    proc = models.build_processor(tok, cfg.model, image_size=96)
    model = models.build_model(cfg.model, proc)              # tiny: from a config, random init
    proc.save_pretrained(d); model.save_pretrained(d)        # AutoProcessor / AutoModel... reload
    texts = models.generate(model, proc, [messages, ...], [image, ...], max_new_tokens=48)

The tiny model: a SigLIP-style vision tower (patch 16 on 96x96 images), LLaVA-NeXT's projector
and anyres layout (one 96x96 tile plus the base image: 78 image tokens), and a Llama decoder.
LlavaNext always adds at least one anyres tile, so the image is seen twice; we keep the
paper's class rather than switch to plain LLaVA for the saving.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fire_core import provenance, tagger, world
from fire_core.config import IMAGE_POSITIONS, ModelConfig

log = logging.getLogger(__name__)


def model_device(model) -> torch.device:
    return next(model.parameters()).device

BOS, EOS, PAD, UNK, IMAGE = "<s>", "<|end|>", "<pad>", "<unk>", "<image>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE, *ROLE_TOKENS]

# One message: <|role|>\n content <|end|>\n . Where a message holds an image and text, the image
# comes before the text (`image_position="before_text"`, LLaVA's usual layout) or after it
# ("after_text": the question first, then the image, so the causal decoder's image tokens can
# attend to the question). HF renders Jinja with trim_blocks, so newlines are written as {{ '\n' }}.
_PARTS = {
    "before_text": ("{% for c in m['content'] %}"
                    "{% if c['type'] == 'image' %}{{ '<image>' }}{{ '\n' }}"
                    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
                    "{% endfor %}"),
    "after_text": ("{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
                   "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '\n' }}{{ '<image>' }}{% endif %}"
                   "{% endfor %}"),
}


def chat_template(image_position: str = "before_text") -> str:
    """The tiny models' chat template (Jinja) for the given image position."""
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
    return ("{{ bos_token }}"
            "{% for m in messages %}"
            "{{ '<|' + m['role'] + '|>' }}{{ '\n' }}"
            "{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}" + _PARTS[image_position] + "{% endif %}"
            "{{ '<|end|>' }}{{ '\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{{ '\n' }}{% endif %}")


CHAT_TEMPLATE = chat_template("before_text")


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                image_position: str = "before_text") -> tuple[str, list[tuple[int, int]]]:
    """The chat template in Python: the text, and the character spans of trainable assistant
    content (plus its closing <|end|>, so the model learns to stop). Tests check it equals the
    Jinja template."""
    out = [BOS]
    spans: list[tuple[int, int]] = []
    pos = len(BOS)
    for m in messages:
        head = f"<|{m['role']}|>\n"
        content = m["content"]
        if not isinstance(content, str):
            if image_position == "after_text":
                content = ("".join(c.get("text", "") for c in content if c["type"] == "text")
                           + "".join(f"\n{IMAGE}" for c in content if c["type"] == "image"))
            else:
                content = "".join(f"{IMAGE}\n" if c["type"] == "image" else c.get("text", "") for c in content)
        body = content + EOS
        start = pos + len(head)
        out += [head, body, "\n"]
        if m.get("train") and m["role"] == "assistant":
            spans.append((start, start + len(body)))
        pos += len(head) + len(body) + 1
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out), spans


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on the world's text: never an unknown character, few tokens per
    word. Wrapped as a PreTrainedTokenizerFast with the chat template and an image token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # the template writes <s> itself
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE, padding_side="right", model_max_length=4096,
    )


def build_processor(tokenizer, mcfg: ModelConfig, image_size: int):
    """LlavaNextProcessor from arguments (no download): the PIL image processor (no torchvision
    here), one anyres tile equal to the image, SigLIP-style features (no CLS token)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    if image_size % mcfg.patch_size:
        raise ValueError(f"model.patch_size={mcfg.patch_size} must divide world.image_size={image_size}")
    improc = LlavaNextImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=False, image_grid_pinpoints=[[image_size, image_size]],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    template = chat_template(mcfg.image_position)
    tokenizer.chat_template = template  # saved with the model: one format for training and prompting
    return LlavaNextProcessor(image_processor=improc, tokenizer=tokenizer, patch_size=mcfg.patch_size,
                              vision_feature_select_strategy="full", num_additional_image_tokens=0,
                              chat_template=template, image_token=IMAGE)


def build_model(mcfg: ModelConfig, processor, image_size: int | None = None):
    """A tiny LlavaNextForConditionalGeneration from sizes in ``mcfg`` (random init), or the
    pretrained model named by ``mcfg.pretrained_id``."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        SiglipVisionConfig,
    )

    tok = processor.tokenizer
    if mcfg.kind == "pretrained":
        return LlavaNextForConditionalGeneration.from_pretrained(mcfg.pretrained_id, dtype=getattr(torch, mcfg.dtype))
    image_size = image_size or processor.image_processor.size["height"]
    tower = dict(
        hidden_size=mcfg.vision_hidden_size, intermediate_size=4 * mcfg.vision_hidden_size,
        num_hidden_layers=mcfg.vision_layers, num_attention_heads=max(1, mcfg.vision_hidden_size // 32),
        image_size=image_size, patch_size=mcfg.patch_size, num_channels=3,
        vision_use_head=False,  # LLaVA never uses SigLIP's pooling head
    )
    if mcfg.vision_output == "tags":  # per patch, the one-hot code of what the tower's heads read
        vision = tagger.config(
            tag_sizes=[len(world.PATCH_COLORS), len(world.PATCH_KINDS), len(world.PATCH_CHARS)],
            patch_regions=world.patch_regions(image_size // mcfg.patch_size, image_size),
            n_regions=len(world.REGIONS), **tower)
    else:
        vision = SiglipVisionConfig(**tower)
    text = LlamaConfig(
        vocab_size=max(mcfg.vocab_size, len(tok)), hidden_size=mcfg.hidden_size,
        intermediate_size=4 * mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_heads,
        max_position_embeddings=max(mcfg.max_length, 512), pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=mcfg.tie_embeddings,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
        image_grid_pinpoints=[[image_size, image_size]], vision_feature_select_strategy="full",
        vision_feature_layer=-1,  # the default -2 would skip (and never train) the last layer
        tie_word_embeddings=mcfg.tie_embeddings,
        projector_hidden_act="linear" if mcfg.projector == "linear" else "gelu",
    )
    model = LlavaNextForConditionalGeneration(config)
    if mcfg.projector_init == "torch":  # nn.Linear's own draw instead of transformers' normal(0, 0.02)
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            layer.reset_parameters()
    if mcfg.projector == "linear":  # LLaVA-1's projector inside LLaVA-NeXT's class
        out = model.model.multi_modal_projector.linear_2
        with torch.no_grad():
            out.weight.copy_(torch.eye(out.weight.shape[0]))
            out.bias.zero_()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model


# The llama3-llava-next chat format (written here, as the released model renders it): a header
# per message, every image placeholder before the message's text, <|eot_id|> closing each turn.
LLAMA3_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first %}{{ '<|begin_of_text|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<pad>", IMAGE]
PAPER_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's anyres grid


def build_paper_like(texts: Sequence[str], image_size: int = 28, hidden: int = 32, layers: int = 2,
                     vocab_size: int = 512, seed: int = 0):
    """(model, processor): a randomly initialised LLaVA-NeXT with the architecture of
    ``llama3-llava-next-8b-hf`` at toy sizes (saved with ``save_pretrained``, a folder that
    ``model.pretrained_id`` can name, as the tests do): a CLIP vision tower (patch 14,
    CLS token dropped by the "default" feature strategy, second-to-last layer), anyres tiles on
    LLaVA-NeXT's pinpoint grid scaled to ``image_size``, a Llama-3 decoder (grouped-query
    attention, rope theta 500000, untied head) and a byte-level BPE tokenizer with llama3's
    special tokens and chat format. Nothing is downloaded. The GPU smoke scale and the tests of
    the paper path use it."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    bpe = Tokenizer(tok_models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(list(texts), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": IMAGE},
                                  chat_template=LLAMA3_TEMPLATE, padding_side="right", model_max_length=8192)
    scale = image_size / 336
    pinpoints = [[int(h * scale), int(w * scale)] for h, w in PAPER_PINPOINTS]
    improc = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAMA3_TEMPLATE, image_token=IMAGE)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 16), image_size=image_size, patch_size=14,
                              projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=8192,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    return model, proc


def load_pretrained(mcfg: ModelConfig):
    """The paper's model and processor (``model.kind=pretrained``) from ``mcfg.pretrained_id``:
    a local directory, or a hub id already in the local cache (nothing is downloaded when
    ``HF_HUB_OFFLINE=1``). Placed on :func:`fire_core.provenance.device`."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(mcfg.pretrained_id)
    model = LlavaNextForConditionalGeneration.from_pretrained(mcfg.pretrained_id, dtype=getattr(torch, mcfg.dtype))
    return model.to(provenance.device()), processor


def load(path: Path | str, trainable: bool = False, dtype: torch.dtype | None = None):
    """A saved model (full, or a LoRA adapter on the base it names) and its processor, placed
    on :func:`fire_core.provenance.device` (its saved dtype unless ``dtype`` is given)."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    tagger.register()  # a saved tiny model may have the tagging tower
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved model at {path}")
    processor = AutoProcessor.from_pretrained(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not base:
            raise ValueError(f"the adapter in {path} does not name its base model; train LoRA on a "
                             "model loaded from a directory so that the base path is recorded")
        model = PeftModel.from_pretrained(LlavaNextForConditionalGeneration.from_pretrained(base, dtype=dtype),
                                          path, is_trainable=trainable)
    else:
        model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return model.to(provenance.device()), processor


def warmup_cosine_adamw(params, lr: float, steps: int):
    """AdamW (no weight decay) with a linear warm-up over the first twentieth of ``steps``, then
    cosine to zero: the schedule of the text and the vision pretraining."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, k / max(1, steps)))))
    return opt, sched


def optimizer_step(loss, params, opt, sched, max_norm: float = 1.0) -> float:
    """Backward, clip the gradient norm, step optimizer and schedule; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    sched.step()
    return float(loss.detach())


def image_token_id(processor) -> int:
    """The id of the image placeholder token, for our tokenizer and for a hub processor alike."""
    pid = getattr(processor, "image_token_id", None)
    if pid is not None:
        return int(pid)
    return int(processor.tokenizer.convert_tokens_to_ids(processor.image_token))


_IMAGE_TOKENS: dict[tuple[int, int, int], int] = {}


def image_token_count(processor, size: tuple[int, int]) -> int:
    """Image tokens that one placeholder expands to for an image of ``size`` (width, height),
    computed by the processor itself: with LLaVA-NeXT's anyres the count depends on the size
    and aspect ratio, so it is asked per size (and remembered)."""
    key = (id(processor), int(size[0]), int(size[1]))
    if key not in _IMAGE_TOKENS:
        img = Image.new("RGB", (int(size[0]), int(size[1])))
        enc = processor(text=[processor.image_token], images=[img], return_tensors="pt", add_special_tokens=False)
        _IMAGE_TOKENS[key] = int((enc["input_ids"] == image_token_id(processor)).sum())
    return _IMAGE_TOKENS[key]


def num_image_tokens(processor, image_size: int) -> int:
    """Image tokens that one <image> expands to for a square ``image_size`` image."""
    return image_token_count(processor, (image_size, image_size))


def default_image_size(processor) -> tuple[int, int]:
    """(width, height) the processor resizes to: the world's images at every scale we render."""
    size = processor.image_processor.size
    if "height" in size:
        return int(size["width"]), int(size["height"])
    edge = int(size.get("shortest_edge", 336))
    return edge, edge


def param_count(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    return {"total": total, "vision": vision, "language_and_projector": total - vision}


@torch.no_grad()
def generate(model, processor, conversations: Sequence[Sequence[dict[str, Any]]], images: Sequence[Image.Image],
             max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = None, batch_size: int = 32, stop_at_eos: bool = True) -> list[str]:
    """Batched generation: left padding, KV cache, greedy or sampling, stop at <|end|>.

    Greedy results do not depend on the batch size (tested); sampling is reproducible under
    ``seed``. Returns the decoded new text of each conversation. ``stop_at_eos=False`` always
    generates ``max_new_tokens`` (for benchmarks).
    """
    if len(conversations) != len(images):
        raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    out: list[str] = []
    gen = None
    try:
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        for start in range(0, len(conversations), batch_size):
            convs = conversations[start:start + batch_size]
            # the processor's own template: ours for the tiny models, LLaVA-NeXT's at paper scale
            texts = [processor.apply_chat_template([{k: v for k, v in m.items() if k != "train"} for m in c],
                                                   add_generation_prompt=True, tokenize=False) for c in convs]
            enc = processor(text=texts, images=[im.convert("RGB") for im in images[start:start + batch_size]],
                            return_tensors="pt", padding=True, add_special_tokens=False).to(model_device(model))
            kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          pad_token_id=tok.pad_token_id, use_cache=True,
                                          eos_token_id=tok.eos_token_id if stop_at_eos else None)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
                # one seed per batch, derived from the run seed: reproducible whatever ran before
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if gen else 0)
            ids = model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return out


class PrefixCachedGenerator:
    """Batched greedy generation for conversations that grow turn by turn, keeping each one's
    KV cache between calls, so a turn prefills only the tokens that are new since the last call
    (the student's next prompt is its last prompt + its answer + the feedback).

        gen = PrefixCachedGenerator(model, processor, max_new_tokens=48)
        texts = gen(["d1", "d2"], [conv1, conv2], [img1, img2])   # first turns: image and prompt
        texts = gen(["d1", "d2"], [conv1b, conv2b], [img1, img2])  # later: only the new tokens
        gen.drop("d1")                                             # a dialogue has ended

    The cache holds exactly the tokens fed so far; a new prompt reuses the longest common
    prefix with them (the template is append-only, so that is all but the last reply's
    re-tokenised edge). Each row is computed as if alone (left padding, masks, explicit
    positions), so results do not depend on the batch (tested). Chunked prefill differs from a
    one-shot prefill only in float rounding; greedy outputs match ``generate`` almost always.
    """

    def __init__(self, model, processor, max_new_tokens: int = 64):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.cache: dict[Any, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.reused_tokens = 0  # prompt tokens whose KV came from the cache

    def drop(self, key: Any) -> None:
        self.cache.pop(key, None)

    def _texts(self, convs) -> list[str]:
        return [self.processor.apply_chat_template([{k: v for k, v in m.items() if k != "train"} for m in c],
                                                   add_generation_prompt=True, tokenize=False) for c in convs]

    @torch.no_grad()
    def _prefill_new(self, texts: list[str], images: list[Image.Image]) -> list[tuple[list[int], list]]:
        """Run prompts (all but their last token) through the full VLM, image included; return
        each row's token ids and unpadded per-layer (key, value) tensors."""
        tok = self.processor.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = self.processor(text=texts, images=[im.convert("RGB") for im in images], return_tensors="pt",
                                 padding=True, add_special_tokens=False).to(model_device(self.model))
        finally:
            tok.padding_side = old
        ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=enc["pixel_values"],
                         image_sizes=enc["image_sizes"], use_cache=True, logits_to_keep=1)
        rows = []
        full_ids, full_mask = enc["input_ids"], enc["attention_mask"]
        for b in range(len(texts)):
            keep = mask[b].bool()
            kv = [(layer.keys[b][:, keep], layer.values[b][:, keep]) for layer in out.past_key_values.layers]
            rows.append((full_ids[b][full_mask[b].bool()].tolist(), kv))
        return rows

    @torch.no_grad()
    def __call__(self, keys: Sequence[Any], conversations: Sequence[Sequence[dict[str, Any]]],
                 images: Sequence[Image.Image]) -> list[str]:
        from transformers import DynamicCache

        if not (len(keys) == len(conversations) == len(images)):
            raise ValueError("keys, conversations and images must have the same length")
        if not keys:
            return []
        tok = self.processor.tokenizer
        image_id = tok.image_token_id
        model = self.model
        was_training = model.training
        model.eval()
        texts = self._texts(conversations)
        # every row becomes: cached ids (with their KV) + pending ids still to feed
        cached: list[list[int]] = [None] * len(keys)  # type: ignore[list-item]
        kvs: list[list] = [None] * len(keys)  # type: ignore[list-item]
        pending: list[list[int]] = [None] * len(keys)  # type: ignore[list-item]
        fresh = [i for i, k in enumerate(keys) if k not in self.cache]
        if fresh:
            for i, (full, kv) in zip(fresh, self._prefill_new([texts[i] for i in fresh], [images[i] for i in fresh]),
                                     strict=True):
                cached[i], kvs[i], pending[i] = full[:-1], kv, full[-1:]
        for i, k in enumerate(keys):
            if k in self.cache:
                old_ids, kv = self.cache[k]
                n_img = sum(1 for t in old_ids if t == image_id)
                new: list[int] = []
                for t in tok(texts[i], add_special_tokens=False)["input_ids"]:  # as the processor does
                    new += [t] * n_img if t == image_id else [t]
                p = 0
                limit = min(len(old_ids), len(new) - 1)  # always feed at least one token
                while p < limit and old_ids[p] == new[p]:
                    p += 1
                if p <= max((j for j, t in enumerate(old_ids) if t == image_id), default=-1):
                    raise ValueError(f"conversation {k!r} changed before its image; drop() it first")
                cached[i], kvs[i], pending[i] = new[:p], [(a[:, :p], v[:, :p]) for a, v in kv], new[p:]
                self.reused_tokens += p
        # one padded batch: [left pad | cache | pad | pending], then decoding appends
        B = len(keys)
        L = max(len(c) for c in cached)
        P = max(len(p) for p in pending)
        n_layers = len(kvs[0])
        H, D = kvs[0][0][0].shape[0], kvs[0][0][0].shape[-1]
        dtype, dev = kvs[0][0][0].dtype, kvs[0][0][0].device
        layers = []
        for li in range(n_layers):
            K = torch.zeros(B, H, L, D, dtype=dtype, device=dev)
            V = torch.zeros(B, H, L, D, dtype=dtype, device=dev)
            for b in range(B):
                n = len(cached[b])
                if n:
                    K[b, :, L - n:] = kvs[b][li][0]
                    V[b, :, L - n:] = kvs[b][li][1]
            layers.append((K, V))
        cache = DynamicCache(ddp_cache_data=layers)
        ids = torch.full((B, P), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(B, L + P, dtype=torch.long)
        pos = torch.zeros(B, P, dtype=torch.long)
        for b in range(B):
            c, p = len(cached[b]), len(pending[b])
            mask[b, L - c:L] = 1
            mask[b, L + P - p:] = 1
            ids[b, P - p:] = torch.tensor(pending[b])
            pos[b, P - p:] = torch.arange(c, c + p)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        lm = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model
        head = model.get_output_embeddings()
        eos = tok.eos_token_id
        generated: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        nxt_pos = pos[:, -1:] + 1
        try:
            h = lm(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True).last_hidden_state[:, -1]
            for step in range(self.max_new_tokens):
                nxt = head(h).argmax(-1)
                for b in range(B):
                    if not done[b]:
                        generated[b].append(int(nxt[b]))
                done |= nxt == eos
                if bool(done.all()) or step == self.max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], 1)
                h = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=nxt_pos, past_key_values=cache,
                       use_cache=True).last_hidden_state[:, -1]
                nxt_pos = nxt_pos + 1
        finally:
            model.train(was_training)
        # keep, per row, the KV of every token fed: cache + pending + generated but the last
        outs = []
        for b, k in enumerate(keys):
            fed = cached[b] + pending[b] + generated[b][:-1]
            valid = mask[b].bool().nonzero().squeeze(-1)[:len(fed)]
            self.cache[k] = (fed, [(layer.keys[b][:, valid].clone(), layer.values[b][:, valid].clone())
                                   for layer in cache.layers])
            outs.append(tok.decode([t for t in generated[b] if t != eos], skip_special_tokens=True).strip())
        return outs
