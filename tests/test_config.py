"""fire_core.config: every scale composes and validates; bad input fails early, naming the key."""

from __future__ import annotations

import pytest

from fire_core import config
from fire_core.config import ConfigError, FireConfig


@pytest.mark.parametrize("scale", ["smoke", "default", "paper"])
def test_every_scale_loads(scale):
    cfg = config.load("00_build_world", [f"scale={scale}"])
    assert isinstance(cfg, FireConfig)
    assert cfg.scale == scale
    assert cfg.stage == "00_build_world"
    assert cfg.stage_dir().parts[-2:] == (scale, "00_build_world")


def test_scales_differ_in_size():
    smoke = config.load("00_build_world", ["scale=smoke"])
    default = config.load("00_build_world", ["scale=default"])
    assert smoke.world.train_per_family < default.world.train_per_family
    assert smoke.model.hidden_size < default.model.hidden_size


def test_a_stage_has_its_own_settings_at_a_scale_only_where_a_stage_scale_file_says_so():
    """conf/stage_scale/<stage>-<scale>.yaml applies to that stage at that scale, nowhere else;
    every such file names a real stage and scale (a misnamed one would be skipped silently)."""
    smoke = config.load("03_train_teacher", ["scale=smoke"]).train
    assert smoke.epochs == 2 and smoke.learning_rate == pytest.approx(1e-2)
    assert config.load("03_train_teacher", ["scale=default"]).train.epochs == 1
    assert config.load("04_train_student", ["scale=smoke"]).train.learning_rate != pytest.approx(1e-2)
    conf = config.CONF_DIR
    scales = {p.stem for p in (conf / "scale").glob("*.yaml")}
    files = sorted((conf / "stage_scale").glob("*.yaml"))
    assert files
    for f in files:
        stage, _, scale = f.stem.rpartition("-")
        assert stage in config.STAGES and scale in scales, f.name
        assert f"optional stage_scale: {stage}-${{scale}}" in (conf / f"{stage}.yaml").read_text(), f.name


def test_paper_scale_is_the_papers_recipe():
    cfg = config.load("00_build_world", ["scale=paper"])
    assert cfg.model.kind == "pretrained"
    assert cfg.model.pretrained_id == "llava-hf/llama3-llava-next-8b-hf"
    assert (cfg.train.method, cfg.train.lora_r, cfg.train.lora_alpha) == ("lora", 64, 256)
    assert cfg.train.lora_targets == ["q_proj", "k_proj"]
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.train.warmup_ratio == pytest.approx(0.03)
    assert cfg.train.deepspeed.endswith("zero3.json") and cfg.train.bf16
    assert cfg.annotator.backend == "openai" and cfg.annotator.model == "gpt-4o"


def test_overrides_apply_and_are_recorded():
    ov = ["scale=smoke", "seed=7", "world.image_size=64", "dialogue.threshold=9"]
    cfg = config.load("00_build_world", ov)
    assert (cfg.seed, cfg.world.image_size, cfg.dialogue.threshold) == (7, 64, 9)
    assert cfg.overrides == ov
    assert config.to_dict(cfg)["world"]["image_size"] == 64


def test_loading_twice_in_one_process():
    # re-running a notebook cell must not hit "GlobalHydra is already initialized"
    a = config.load("00_build_world", ["scale=smoke"])
    b = config.load("00_build_world", ["scale=smoke"])
    assert a == b


@pytest.mark.parametrize(
    "override, needle",
    [
        # unknown keys (typos), with a suggestion
        ("world.trian_per_family=3", "unknown config key 'world.trian_per_family' (did you mean 'world.train_per_family'?)"),
        ("+world.extra=1", "unknown config key 'world.extra'"),
        ("+sede=1", "unknown config key 'sede'"),
        ("trian.learning_rate=0.1", "unknown config key 'trian'"),
        # wrong types
        ("world.image_size=abc", "wrong type for config key 'world.image_size'"),
        ("world.image_size=1.5", "wrong type for config key 'world.image_size'"),
        ("world.seen_families=red", "config key 'world.seen_families'"),
        # out of range
        ("world.train_per_family=-5", "'world.train_per_family' must be >= 1, got -5"),
        ("world.image_size=4", "'world.image_size' must be in [16, 1024]"),
        ("dialogue.threshold=11", "'dialogue.threshold' must lie on the score scale [1, 10], got 11"),
        ("dialogue.threshold=0", "'dialogue.threshold' must lie on the score scale"),
        ("dialogue.max_turns=0", "'dialogue.max_turns' must be >= 1"),
        ("train.learning_rate=5", "'train.learning_rate' must be in (0, 1)"),
        ("model.hidden_size=65", "'model.hidden_size' must be divisible by model.num_heads"),
        ("bench.ci=1.5", "'bench.ci' must be in (0, 1)"),
        ("model.image_position=middle", "'model.image_position' must be 'before_text' or 'after_text', got 'middle'"),
        ("model.vision_output=pixels", "'model.vision_output' must be 'features' or 'tags', got 'pixels'"),
        ("model.projector_init=xavier", "'model.projector_init' must be 'hf' or 'torch', got 'xavier'"),
        ("seed=-1", "'seed' must be >= 0"),
        ("world.seen_families=[color,colr]", "unknown family 'colr' (did you mean 'color'?)"),
        ("annotator.base_url=ftp://x", "'annotator.base_url' must start with http"),
        # missing input files
        ("world.font_path=/no/such/font.ttf", "'world.font_path' names a missing file: /no/such/font.ttf"),
        ("train.deepspeed=conf/deepspeed/zero9.json", "'train.deepspeed' names a missing file"),
        # unknown group options
        ("scale=huge", "no config 'scale/huge'; available for 'scale': ['default', 'gpu_smoke', 'paper', 'smoke']"),
        ("model=nothere", "no config 'model/nothere'"),
    ],
)
def test_bad_config_fails_with_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        config.load("00_build_world", ["scale=smoke", override])
    assert needle in str(info.value)


def test_unknown_primary_config():
    with pytest.raises(ConfigError, match="no primary config '99_nothing'"):
        config.load("99_nothing", [])


def test_overrides_must_be_a_list_of_strings():
    with pytest.raises(ConfigError, match="list of strings"):
        config.load("00_build_world", ["scale=smoke", 3])  # type: ignore[list-item]


def test_deepspeed_configs_are_valid_json():
    import json

    for stage in (2, 3):
        ds = json.loads((config.CONF_DIR / "deepspeed" / f"zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
