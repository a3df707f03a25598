"""Model configs: presets, validation, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from av2ts_cli.config import PRESET_NAMES, SUBSET_CLASSES, LossConfig, ModelConfig, get_preset
from av2ts_cli.errors import UsageError


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n.startswith("av2ts-")])  # combo-*: test_model_combo
@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_presets_per_subset(name, subset):
    cfg = get_preset(name, subset)
    assert cfg.preset == name and cfg.subset == subset
    assert cfg.num_classes == SUBSET_CLASSES[subset] == (71 if subset == "avss" else 2)
    assert cfg.num_frames == 5 and cfg.input_size % 32 == 0
    assert cfg.num_queries == 96 and cfg.audio_tokens == 24  # 4 audio stages x 24 CED tokens
    assert cfg.siam == (name != "av2ts-tiny")  # the reference configs use the Siam encoder; tiny does not
    assert get_preset(name, subset, siam=not cfg.siam).siam == (not cfg.siam)


def test_reference_hyper_parameters():
    r50, pvt = get_preset("av2ts-r50"), get_preset("av2ts-pvt")
    for cfg in (r50, pvt):
        assert (cfg.input_size, cfg.hidden_dim, cfg.num_frames) == (224, 256, 5)
        assert (cfg.audio_dim, cfg.audio_depth, cfg.audio_heads, cfg.audio_patch) == (256, 12, 4, 16)
        assert (cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_points, cfg.encoder_ffn_dim) == (6, 8, 4, 1024)
        assert (cfg.fusion_blocks, cfg.layer_scale_init, cfg.decoder_layers, cfg.decoder_ffn_dim) == (3, 1e-4, 12, 2048)
        assert cfg.loss == LossConfig()
    assert r50.backbone == "resnet50" and r50.frozen_bn
    assert pvt.backbone == "pvt_v2_b5" and pvt.drop_path_rate == 0.1


def test_tiny_is_a_trainable_small_variant():
    tiny = get_preset("av2ts-tiny")
    assert not tiny.frozen_bn  # trained from scratch: BatchNorm must learn
    assert tiny.input_size < 224 and tiny.input_size % 32 == 0
    assert tiny.hidden_dim < 256 and tiny.decoder_layers < 12 and tiny.audio_depth < 12


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_json_round_trip(name):
    cfg = get_preset(name, "avss", siam=True)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_from_dict_fills_missing_fields_from_the_preset():
    d = get_preset("av2ts-tiny", "ms3").to_dict()
    del d["hidden_dim"], d["loss"]["num_points"], d["backbone_kwargs"]
    cfg = ModelConfig.from_dict(d)
    assert cfg == get_preset("av2ts-tiny", "ms3")


def test_overrides_survive_round_trip():
    d = get_preset("av2ts-tiny").to_dict()
    d.update(num_frames=10, input_size=160)
    d["loss"]["cosine_weight"] = 0.0
    cfg = ModelConfig.from_dict(d)
    assert (cfg.num_frames, cfg.input_size, cfg.loss.cosine_weight) == (10, 160, 0.0)


def test_bad_configs_fail_in_one_line():
    with pytest.raises(UsageError, match="unknown model preset 'av2ts-huge'"):
        get_preset("av2ts-huge")
    with pytest.raises(UsageError, match="unknown subset"):
        get_preset("av2ts-r50", "s5")
    with pytest.raises(UsageError, match="unknown field.*colour"):
        ModelConfig.from_dict({**get_preset("av2ts-r50").to_dict(), "colour": "red"})
    with pytest.raises(UsageError, match="loss: unknown field.*gamma"):
        ModelConfig.from_dict({**get_preset("av2ts-r50").to_dict(), "loss": {"gamma": 2}})
    with pytest.raises(UsageError, match="multiple of 32"):
        ModelConfig(input_size=200)
    with pytest.raises(UsageError, match="does not divide"):
        ModelConfig(hidden_dim=96, decoder_heads=7)
    with pytest.raises(UsageError, match="subset"):
        ModelConfig(subset="avs")


def test_the_tests_cache_and_temp_are_the_sessions_own(tmp_path_factory):
    """conftest.session_folders: what tests (and the processes they start) cache or make as temporary files lands
    in the session's base folder, which pytest deletes after a passing run, never in the user's ~/.cache/av2ts or
    in /tmp; the kernel builds are shared."""
    import os
    import subprocess
    import sys
    import tempfile

    from av2ts_cli.config import cache_root
    from av2ts_cli.model.ops.build import build_root

    base = tmp_path_factory.getbasetemp().resolve()
    assert os.environ["AV2TS_CACHE"] == str(cache_root())
    assert cache_root().resolve().is_relative_to(base)
    assert build_root().is_symlink() and not build_root().resolve().is_relative_to(base)
    assert Path(tempfile.gettempdir()).resolve().is_relative_to(base)
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(child).resolve().is_relative_to(base)
