"""Vision-tower pretraining. LLaVA starts from a pretrained CLIP/SigLIP tower. With nothing to
download, we pretrain ours on the world: each patch's colour, kind and character come from the
scene record (dense supervision, seconds on a CPU), then the heads are thrown away."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from fire_core import tagger, world
from fire_core.models import optimizer_step, warmup_cosine_adamw


def native_convolution():
    """PyTorch's own convolution instead of oneDNN's, for steps that train the vision tower.
    Measured here: about one run in twenty of stage 01 had a patch-embedding weight gradient that
    differed in the last bits from the first step on (all other weights equal), so runs with the
    same seed gave different towers. PyTorch's convolution (im2col and an MKL matrix product) has
    no such variation; it makes the tower's training step about 1.4x slower. A frozen tower never
    runs the convolution's backward, so the other stages keep oneDNN."""
    return torch.backends.mkldnn.flags(enabled=False)


@dataclass
class VisionPretrainResult:
    losses: list[float]
    patch_accuracy: dict[str, float]  # on patches that show something, held-out images
    seconds: float
    images: int


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 (N, 3, H, W); the processor's normalisation (mean 0.5, std 0.5) is x / 127.5 - 1."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def pretrain_vision(model, rows, steps: int, batch_size: int, lr: float, seed: int,
                    heldout: int = 256, regions: bool = False) -> VisionPretrainResult:
    """Train the vision tower to tell, for every patch, the colour, kind and character under it;
    with ``regions`` also the region of the image it lies in (the words the answers use: "at
    the top left"). The heads are thrown away, except a tagger's (``fire_core.tagger``): its
    colour, kind and character heads are what it outputs, and the held-out accuracy reported is
    theirs."""
    import json
    import random


    tower = model.model.vision_tower
    vc = model.config.vision_config
    grid = vc.image_size // vc.patch_size
    n = min(len(rows), steps * batch_size // 2 + heldout)  # about two passes over each image
    order = random.Random(seed).sample(range(len(rows)), n)
    sub = rows.select(order)
    pix = _pixels(sub["image"])
    labels = torch.tensor([world.patch_labels(json.loads(sc), grid) for sc in sub["scene"]])  # (n, grid^2, 3)
    names, classes = ["colour", "kind", "char"], [world.PATCH_COLORS, world.PATCH_KINDS, world.PATCH_CHARS]
    if regions:  # the same for every image: where each patch lies
        where = torch.tensor(world.patch_regions(grid, vc.image_size)).expand(n, -1)
        labels = torch.cat([labels, where.unsqueeze(-1)], dim=-1)
        names.append("region")
        classes.append(world.REGIONS)
    torch.manual_seed(seed)  # the heads' initial weights
    if tagger.is_tagger(tower):  # a tagger keeps its colour, kind and character heads
        heads = torch.nn.ModuleList([*tower.heads, *(torch.nn.Linear(vc.hidden_size, len(v)) for v in classes[3:])])
        features = tower.features
    else:
        heads = torch.nn.ModuleList([torch.nn.Linear(vc.hidden_size, len(v)) for v in classes])

        def features(pixel_values):
            return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
    params = list(dict.fromkeys([*tower.parameters(), *heads.parameters()]))  # a tagger's heads are the tower's
    opt, sched = warmup_cosine_adamw(params, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.arange(heldout, n)
    tower.train()
    losses = []
    t0 = time.time()
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="vision pretraining", unit="step"):
        b = train_idx[torch.randint(len(train_idx), (batch_size,), generator=gen)]
        with native_convolution():
            h = features(pix[b].float() / 127.5 - 1)
            loss = sum(torch.nn.functional.cross_entropy(head(h).flatten(0, 1), labels[b][..., k].flatten())
                       for k, head in enumerate(heads))
            losses.append(optimizer_step(loss, params, opt, sched))
    with torch.no_grad():
        h = features(pix[:heldout].float() / 127.5 - 1)
        acc = {}
        for k, (name, head) in enumerate(zip(names, heads, strict=True)):
            y = labels[:heldout][..., k]
            mask = y >= 0 if name == "region" else y > 0  # class 0 is "nothing" except for regions
            acc[name] = float((head(h).argmax(-1)[mask] == y[mask]).float().mean()) if mask.any() else float("nan")
    return VisionPretrainResult(losses=losses, patch_accuracy=acc, seconds=time.time() - t0, images=n)


def freeze_vision(model) -> None:
    """LLaVA keeps the pretrained vision tower frozen; only projector and LM train. A linear
    projector (``projector_hidden_act="linear"``, LLaVA-1's) also keeps its identity second
    layer fixed, so that it stays one linear map."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "projector_hidden_act", None) == "linear":
        model.model.multi_modal_projector.linear_2.requires_grad_(False)
