"""Stage 01's family warm-up (a curriculum: some families alone, then the mix)."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from fire_core import config, models, records
from fire_core.sft import base_examples
from fire_core.stages import base_vlm
from fire_core.vision import freeze_vision


@pytest.mark.slow
def test_a_family_warmup_trains_only_those_families_qa_then_scores_them_on_val_and_resumes(smoke_root, tmp_path):
    cfg = config.load("01_train_base_vlm", ["scale=smoke", "train.family_warmup=[color]",
                                            "train.family_warmup_steps=3", "train.batch_size=4",
                                            "train.max_new_tokens=8"])  # short answers: quick to score
    ds = datasets.load_from_disk(str(smoke_root / "00_build_world" / "dataset"))
    train_rows = ds["train"].select(records.select_per_family(ds["train"], cfg.world.seen_families,
                                                              cfg.train.max_per_family, cfg.seed))
    n_color = sum(f == "color" for f in train_rows["family"])
    # the warm-up's chats: one question and its answer, never a caption or a follow-up
    chats = base_examples(train_rows, cfg, random.Random(0), extras=False)
    assert all([m["role"] for m in c.messages][-2:] == ["user", "assistant"] and
               sum(m["role"] == "user" for m in c.messages) == 1 for c in chats)
    with_extras = base_examples(train_rows, cfg, random.Random(0))
    assert any(sum(m["role"] == "user" for m in c.messages) > 1 for c in with_extras)

    model, proc = models.load(smoke_root / "01_train_base_vlm" / "model")
    freeze_vision(model)  # as the stage does before it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, info = base_vlm.family_warmup(model, proc, cfg, ds, train_rows, tmp_path / "fw")
    assert info["families"] == ["color"] and info["steps"] == 3 and info["chats"] == n_color
    assert set(info["val_accuracy"]) == {"color"} and 0 <= info["val_accuracy"]["color"] <= 1
    assert info["resumed_from"] is None
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and not any("vision_tower" in n for n in changed), changed

    # a killed stage reruns the warm-up from its last checkpoint and ends with the same weights
    again, _ = models.load(smoke_root / "01_train_base_vlm" / "model")
    freeze_vision(again)
    again, info2 = base_vlm.family_warmup(again, proc, cfg, ds, train_rows, tmp_path / "fw")
    assert info2["resumed_from"] is not None and info2["resumed_from"].endswith("checkpoint-3")
    assert info2["val_accuracy"] == info["val_accuracy"]
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_family_warmup_needs_seen_families_and_a_step_count():
    with pytest.raises(config.ConfigError, match="train.family_warmup"):
        config.load("01_train_base_vlm", ["scale=smoke", "train.family_warmup=[size]", "train.family_warmup_steps=3"])
    with pytest.raises(config.ConfigError, match="go together"):
        config.load("01_train_base_vlm", ["scale=smoke", "train.family_warmup=[color]"])
