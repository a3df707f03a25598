"""Importing upstream files: the restricted readers, the rename rules and the converters (``av2ts convert``).

Converter inputs are built here from the documented key names and shapes with random values: the reference
checkpoint from ``tests/data/reference-keys-*.tsv``, the detectron2 pickles and CED files from the names of
docs/model.md, 'Checkpoints and the reference key mapping' (and, for ``mispeech/ced-mini``, the rename of its public
conversion script).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ced_hf_names, one_line, random_state, reference_keys, tiny_cfg
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.model import build_model
from av2ts_cli.weights import checkpoint, convert, convert_av2ts, resolve
from av2ts_cli.weights import mapping as key_mapping
from av2ts_cli.weights.rules import Rule, apply_rules

runner = CliRunner()

# Source keys the converters drop on purpose, by rule (everything else must be used).
REFERENCE_DROPPED = {
    "criterion.empty_weight",
    "audio_backbone.init_bn.1.num_batches_tracked",
    *(f"audio_backbone.outputlayer.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
    *(f"sem_seg_head.pixel_decoder.input_proj.{i}.{j}.{p}" for i in range(3) for j in (0, 1)
      for p in ("weight", "bias")),
    "sem_seg_head.pixel_decoder.linear1.weight", "sem_seg_head.pixel_decoder.linear1.bias",
}

# One explicit example per rename rule, written out by hand from model/av2ts.py's table and timm's module names.
REFERENCE_EXAMPLES = {
    "backbone.stem.conv1.weight": "backbone.conv1.weight",
    "backbone.stem.conv1.norm.running_var": "backbone.bn1.running_var",
    "backbone.res2.0.conv1.weight": "backbone.layer1.0.conv1.weight",
    "backbone.res3.3.conv3.norm.bias": "backbone.layer2.3.bn3.bias",
    "backbone.res4.0.shortcut.weight": "backbone.layer3.0.downsample.0.weight",
    "pre_sam_backbone.res5.0.shortcut.norm.running_mean": "siam_backbone.layer4.0.downsample.1.running_mean",
    "scale_factor_module.3.fc2.weight": "siam_gates.gates.3.fc2.weight",
    "audio_backbone.init_bn.1.running_mean": "audio_encoder.init_bn.running_mean",
    "audio_backbone.patch_embed.proj.weight": "audio_encoder.patch_embed.weight",
    "audio_backbone.time_pos_embed": "audio_encoder.time_pos_embed",
    "audio_backbone.blocks.11.attn.qkv.bias": "audio_encoder.blocks.11.attn.qkv.bias",
    "audio_backbone.norm.weight": "audio_encoder.norm.weight",
    "time_attn_blocks_1.attn.qkv.weight": "acoustic_attention.blocks.0.attn.qkv.weight",
    "time_attn_blocks_3.mlp.fc2.bias": "acoustic_attention.blocks.2.mlp.fc2.bias",
    "time_norm.weight": "acoustic_attention.norm.weight",
    "audio_linear4.bias": "acoustic_attention.projections.3.bias",
    "visual_project.3.0.weight": "visual_attention.projections.3.0.weight",
    "visual_project.0.1.bias": "visual_attention.projections.0.1.bias",
    "time_visual_attn_blocks.2.attn.v.weight": "visual_attention.blocks.2.attn.v.weight",
    "time_visual_norm.1.bias": "visual_attention.norms.1.bias",
    "sem_seg_head.pixel_decoder.transformer.level_embed": "pixel_decoder.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.weight":
        "pixel_decoder.layers.5.attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear2.bias": "pixel_decoder.layers.0.fc2.bias",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.3.norm1.weight": "pixel_decoder.layers.3.norm1.weight",
    "sem_seg_head.pixel_decoder.mask_features.weight": "pixel_decoder.mask_projection.weight",
    "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.lateral.conv.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.bias": "pixel_decoder.lateral.norm.bias",
    "sem_seg_head.pixel_decoder.layer_1.weight": "pixel_decoder.output.conv.weight",
    "sem_seg_head.pixel_decoder.layer_1.norm.weight": "pixel_decoder.output.norm.weight",
    "sem_seg_head.fusion_module.audio_pos.weight": "fusion.audio_pos.weight",
    "sem_seg_head.fusion_module.level_embed.weight": "fusion.level_embed.weight",
    "sem_seg_head.fusion_module.conv_proj_1.weight": "fusion.reduce.weight",
    "sem_seg_head.fusion_module.b_attn.layer_norm_v_list.0.weight": "fusion.norm_visual.weight",
    "sem_seg_head.fusion_module.b_attn.layer_norm_a_list.0.bias": "fusion.norm_audio.bias",
    "sem_seg_head.fusion_module.b_attn.attn_list.0.attn_block.2.attn.qkv.weight": "fusion.blocks.2.attn.qkv.weight",
    "sem_seg_head.fusion_module.b_attn.attn_list.0.norm.weight": "fusion.norm.weight",
    "sem_seg_head.fusion_module.b_attn.gamma_v_list.0": "fusion.gamma_visual",
    "sem_seg_head.fusion_module.b_attn.gamma_a": "fusion.gamma_audio",
    "sem_seg_head.predictor.transformer_self_attention_layers.4.self_attn.in_proj_weight":
        "decoder.layers.4.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.bias": "decoder.layers.0.self_norm.bias",
    "sem_seg_head.predictor.transformer_cross_attention_layers.11.multihead_attn.out_proj.weight":
        "decoder.layers.11.cross_attn.out_proj.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.7.norm.weight": "decoder.layers.7.cross_norm.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.11.linear1.weight": "decoder.layers.11.fc1.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.2.norm.bias": "decoder.layers.2.ffn_norm.bias",
    "sem_seg_head.predictor.decoder_norm.weight": "decoder.norm.weight",
    "sem_seg_head.predictor.query_feat.weight": "decoder.query_feat.weight",
    "sem_seg_head.predictor.query_embed.weight": "decoder.query_embed.weight",
    "sem_seg_head.predictor.level_embed.weight": "decoder.level_embed.weight",
    "sem_seg_head.predictor.class_embed.bias": "decoder.class_embed.bias",
    "sem_seg_head.predictor.mask_embed.layers.2.weight": "decoder.mask_embed.layers.2.weight",
}

PVT_EXAMPLES = {  # original PVT-v2 names -> timm features_only names
    "patch_embed1.proj.weight": "patch_embed.proj.weight",
    "patch_embed3.norm.bias": "stages_2.downsample.norm.bias",
    "block1.2.attn.sr.weight": "stages_0.blocks.2.attn.sr.weight",
    "block3.39.mlp.dwconv.dwconv.weight": "stages_2.blocks.39.mlp.dwconv.weight",
    "block4.2.attn.kv.bias": "stages_3.blocks.2.attn.kv.bias",
    "norm4.weight": "stages_3.norm.weight",
}


# --------------------------------------------------------------------------------------------------- helpers
def _reduce_to_system(marker: Path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return Evil()


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def r50_reference(tmp_path_factory):
    """A reference-implementation R50 S4 checkpoint ({"model": state_dict}, all 1214 tsv entries) and its state."""
    state = random_state(reference_keys("r50-s4"), seed=1)
    path = tmp_path_factory.mktemp("reference") / "model_final.pth"
    torch.save({"model": state, "iteration": 80000}, path)
    return path, state


@pytest.fixture(scope="module")
def r50_converted(r50_reference):
    path, _ = r50_reference
    return convert.convert(str(path), "reference")


# ------------------------------------------------------------------------------------------- reference converter
def test_reference_conversion_uses_every_key_and_fills_every_tensor(r50_converted, r50_reference):
    model, cfg, mapping, meta = r50_converted
    _, source = r50_reference
    assert (cfg.preset, cfg.subset, cfg.num_classes, cfg.siam) == ("av2ts-r50", "s4", 2, True)
    assert set(mapping.dropped) == REFERENCE_DROPPED
    assert set(mapping.origin.values()) == source.keys() - REFERENCE_DROPPED  # every other key used, once
    target = model.state_dict()
    assert set(mapping.tensors) == target.keys()  # every av2ts tensor (parameters and buffers) filled
    for dst, src in mapping.origin.items():
        assert torch.equal(target[dst], source[src]), (src, dst)
    for src, dst in REFERENCE_EXAMPLES.items():
        assert mapping.origin[dst] == src
    assert meta["initialised_from"][-1]["kind"] == "reference"


def test_reference_avss_through_the_cli(tmp_path):
    state = random_state(reference_keys("r50-avss"), seed=4)
    path = tmp_path / "avss.pth"
    torch.save({"model": state}, path)
    result = runner.invoke(cli.app, ["convert", str(path), "--kind", "reference", "--out", str(tmp_path / "out"),
                                     "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["subset"], report["num_classes"], report["filled_tensors"]) == ("avss", 71, len(state) - 20)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))  # (resolve_model itself is tested on tiny models)
    assert len(saved) == len(state) - 20
    assert torch.equal(saved["decoder.class_embed.weight"], state["sem_seg_head.predictor.class_embed.weight"])
    assert torch.equal(saved["backbone.layer3.5.conv2.weight"], state["backbone.res4.5.conv2.weight"])
    doc = checkpoint.read_checkpoint_config(tmp_path / "out" / "config.json")
    cfg = checkpoint.model_config_from(doc, "config.json")
    assert (cfg.preset, cfg.subset, cfg.num_classes, cfg.siam) == ("av2ts-r50", "avss", 71, True)
    assert doc["classes"][:3] == ["background", "accordion", "airplane"] and len(doc["classes"]) == 71
    assert "reference-implementation checkpoint avss.pth" in doc["trained_on"]


@pytest.mark.slow
def test_reference_pvt_and_the_d2_pvt_pickle(tmp_path):
    """PVT-v2-b5: the reference checkpoint (2788 entries), then the d2 pickle applied to both backbones."""
    state = random_state(reference_keys("pvt-s4"), seed=5)
    path = tmp_path / "pvt.pth"
    torch.save({"model": state}, path)
    model, cfg, mapping, _ = convert.convert(str(path), "reference")
    assert (cfg.preset, cfg.siam) == ("av2ts-pvt", True)
    assert set(mapping.dropped) == REFERENCE_DROPPED
    assert set(mapping.origin.values()) == state.keys() - REFERENCE_DROPPED
    target = model.state_dict()
    assert set(mapping.tensors) == target.keys()
    for dst, src in mapping.origin.items():
        assert torch.equal(target[dst], state[src]), (src, dst)
    for src, dst in PVT_EXAMPLES.items():
        assert mapping.origin["backbone." + dst] == "backbone." + src
        assert mapping.origin["siam_backbone." + dst] == "pre_sam_backbone." + src
    del state, mapping, target

    # d2_pvt_v2_b5.pkl: {"model": {original PVT name: numpy array}, ...} with the ImageNet head
    rng = np.random.default_rng(6)
    arrays = {k.removeprefix("backbone."): rng.standard_normal(s, dtype=np.float32)
              for k, s, _ in reference_keys("pvt-s4") if k.startswith("backbone.")}
    arrays.update({"head.weight": rng.standard_normal((1000, 512), dtype=np.float32),
                   "head.bias": np.zeros(1000, np.float32)})
    pkl = tmp_path / "d2_pvt_v2_b5.pkl"
    pkl.write_bytes(pickle.dumps({"model": arrays, "__author__": "PVT_V2_B5", "matching_heuristics": True}))
    pkl_state = key_mapping.read_state_dict_file(pkl)
    groups = [("", "backbone.", convert_av2ts.PVT_RULES), ("", "siam_backbone.", convert_av2ts.PVT_RULES)]
    keys = key_mapping.map_state_dict(pkl_state, groups, model.state_dict(), pkl)
    key_mapping.fill_model(model, keys, ["backbone.", "siam_backbone."], pkl)
    assert set(keys.dropped) == {"head.weight", "head.bias"}
    assert set(keys.origin.values()) == arrays.keys() - {"head.weight", "head.bias"}
    target = model.state_dict()
    backbone_keys = {k for k in target if k.startswith(("backbone.", "siam_backbone."))}
    assert set(keys.tensors) == backbone_keys
    for dst, src in keys.origin.items():
        assert np.array_equal(target[dst].numpy(), arrays[src]), (src, dst)


def test_reference_conversion_errors(r50_reference, tmp_path):
    path, state = r50_reference
    small = tmp_path / "small.pth"  # the keys the preset, class count and Siam encoder are read from
    torch.save({"model": {k: state[k] for k in ("backbone.stem.conv1.weight", "pre_sam_backbone.stem.conv1.weight",
                                                "sem_seg_head.predictor.class_embed.weight")}}, small)
    with pytest.raises(UsageError, match="no-siam contradicts"):
        convert.convert(str(small), "reference", siam=False)
    with pytest.raises(UsageError, match="subset avss has 71"):
        convert.convert(str(small), "reference", subset="avss")
    with pytest.raises(UsageError, match="not av2ts-pvt"):
        convert.convert(str(small), "reference", preset="av2ts-pvt")
    partial = {k: v for k, v in state.items() if not k.startswith("time_norm.")}
    partial["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"model": partial}, bad)
    result = runner.invoke(cli.app, ["convert", str(bad), "--kind", "reference", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    line = one_line(result.output)
    assert str(bad) in line and "sem_seg_head.predictor.extra_head.weight" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ detectron2 / CED
def test_d2_resnet_pickle_fills_backbone_and_siam_encoder(tmp_path):
    """R-50.pkl as convert-torchvision-to-d2.py writes it (numpy float32, the fc layer renamed stem.fc)."""
    rng = np.random.default_rng(7)
    arrays = {k.removeprefix("backbone."): rng.standard_normal(s, dtype=np.float32)
              for k, s, _ in reference_keys("r50-s4") if k.startswith("backbone.")}
    arrays["stem.fc.weight"] = rng.standard_normal((1000, 2048), dtype=np.float32)
    arrays["stem.fc.bias"] = rng.standard_normal(1000, dtype=np.float32)
    pkl = tmp_path / "R-50.pkl"
    pkl.write_bytes(pickle.dumps({"model": arrays, "__author__": "torchvision", "matching_heuristics": True},
                                 protocol=2))  # protocol 2: array bytes travel through _codecs.encode
    torch.manual_seed(8)
    cfg = tiny_cfg(backbone="resnet50", backbone_kwargs={}, frozen_bn=True, siam_gate_reduction=16)
    base_model = build_model(cfg)
    base = checkpoint.save_checkpoint(base_model, cfg, tmp_path / "base")
    result = runner.invoke(cli.app, ["convert", str(pkl), "--kind", "detectron2", "--base", str(base),
                                     "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["filled_per_part"] == {"visual backbone": 265, "siam encoder (+ gates)": 265}
    assert report["dropped"] == {convert_av2ts._FC_DROPPED: 2}
    model, _ = resolve.resolve_model(tmp_path / "out")[:2]
    loaded, before = model.state_dict(), base_model.state_dict()
    for prefix in ("backbone.", "siam_backbone."):
        for key in (k for k in loaded if k.startswith(prefix)):  # every backbone tensor came from the pickle
            name = key.removeprefix(prefix)
            d2 = apply_rules(name, INVERSE_RESNET)[0]
            assert np.array_equal(loaded[key].numpy(), arrays[d2]), key
    for key in (k for k in loaded if not k.startswith(("backbone.", "siam_backbone."))):
        assert torch.equal(loaded[key], before[key]), key  # the rest is the base's
    # FrozenBN statistics are buffers, saved and loaded like the parameters
    assert "backbone.layer1.0.downsample.1.running_var" in dict(model.named_buffers())
    assert torch.equal(loaded["backbone.layer1.0.downsample.1.running_var"],
                       torch.from_numpy(arrays["res2.0.shortcut.norm.running_var"]))


# timm -> detectron2, written independently of the converter's rules (used to check every filled tensor)
INVERSE_RESNET = [
    Rule(r"bn1\.", "stem.conv1.norm."),
    Rule(r"layer([1-4])\.(\d+)\.bn([1-3])\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    Rule(r"layer([1-4])\.(\d+)\.conv([1-3])\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    Rule(r"layer([1-4])\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    Rule(r"layer([1-4])\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    Rule(r"conv1\.", "stem.conv1."),
]


@pytest.mark.parametrize("wrapped", [False, True])
def test_ced_checkpoint_fills_the_audio_encoder(ced_base, ced_state, tmp_path, wrapped):
    ced_base, base = ced_base
    path = tmp_path / "audiotransformer_mini_mAP_4896.pt"
    torch.save({"model": ced_state} if wrapped else ced_state, path)
    model, _, mapping, meta = convert.convert(str(path), "ced", base=str(ced_base))
    dropped = {"front_end.0.spectrogram.window", "front_end.0.mel_scale.fb", "init_bn.1.num_batches_tracked",
               "outputlayer.0.weight", "outputlayer.0.bias", "outputlayer.1.weight", "outputlayer.1.bias"}
    assert set(mapping.dropped) == dropped
    assert set(mapping.origin.values()) == ced_state.keys() - dropped
    target = model.state_dict()
    assert set(mapping.tensors) == {k for k in target if k.startswith("audio_encoder.")}
    for dst, src in mapping.origin.items():
        assert torch.equal(target[dst], ced_state[src])
    assert mapping.origin["audio_encoder.patch_embed.weight"] == "patch_embed.proj.weight"
    assert mapping.origin["audio_encoder.init_bn.running_var"] == "init_bn.1.running_var"
    assert all(torch.equal(target[k], base[k]) for k in target if not k.startswith("audio_encoder."))
    assert meta["initialised_from"] == [{"kind": "ced", "source": str(path), "parts": ["audio encoder (CED)"]}]


def test_ced_hf_safetensors_fills_the_audio_encoder(ced_base, ced_state, tmp_path):
    """mispeech/ced-mini: CedForAudioClassification's names (its conversion script: "init_bn.1" -> "init_bn",
    "encoder." in front of everything but the head "outputlayer.")."""
    from safetensors.torch import save_file

    ced_base, _ = ced_base
    hf_state = ced_hf_names(ced_state)
    path = tmp_path / "model.safetensors"
    save_file(hf_state, str(path))
    result = runner.invoke(cli.app, ["convert", str(path), "--kind", "ced-hf", "--base", str(ced_base),
                                     "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    loaded = resolve.resolve_model(tmp_path / "out")[0].state_dict()
    assert torch.equal(loaded["audio_encoder.blocks.7.mlp.fc1.weight"], hf_state["encoder.blocks.7.mlp.fc1.weight"])
    assert torch.equal(loaded["audio_encoder.init_bn.running_mean"], hf_state["encoder.init_bn.running_mean"])
    assert torch.equal(loaded["audio_encoder.freq_pos_embed"], hf_state["encoder.freq_pos_embed"])
    model, _, mapping, _ = convert.convert(str(path), "ced-hf", base=str(ced_base))
    assert set(mapping.dropped) == {"encoder.init_bn.num_batches_tracked", "outputlayer.0.weight",
                                    "outputlayer.0.bias", "outputlayer.1.weight", "outputlayer.1.bias"}
    assert set(mapping.tensors) == {k for k in model.state_dict() if k.startswith("audio_encoder.")}
    for dst, src in mapping.origin.items():
        assert torch.equal(loaded[dst], hf_state[src])


def test_converter_usage_errors(ced_base, ced_state, tmp_path):
    ced_base, _ = ced_base
    path = tmp_path / "ced.pt"
    torch.save(ced_state, path)
    with pytest.raises(UsageError, match="inputs are never overwritten"):
        convert.convert_to_checkpoint(str(path), "ced", ced_base, base=str(ced_base))
    with pytest.raises(UsageError, match="unknown --kind"):
        convert.convert(str(path), "caffe2")
    with pytest.raises(CheckpointError, match="keys of no known layout"):  # a Zenodo CED file given as ced-hf
        convert.convert(str(path), "ced-hf", base=str(ced_base))
    result = runner.invoke(cli.app, ["convert", str(tmp_path / "absent.pkl"), "--kind", "detectron2", "--out",
                                     str(tmp_path / "o")])
    assert result.exit_code == 1 and "absent.pkl: no such file" in one_line(result.output)


# ------------------------------------------------------------------------------------------ restricted readers
def test_numpy_pickles_are_read_with_scalars_and_old_protocols(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5), "c": np.arange(3)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": arrays}, protocol=protocol))
        state = key_mapping.read_state_dict_file(path)
        assert np.array_equal(state["a"].numpy(), arrays["a"]) and state["b"].item() == 2.5
        assert state["c"].dtype == torch.int64


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"w": _reduce_to_system(marker)}}))
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "extra": _reduce_to_system(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        key_mapping.read_state_dict_file(path)
    message = info.value.message
    assert message.startswith(str(path))
    if suffix == ".pkl":
        assert f"refusing to unpickle the global {os.system.__module__}.system" in message
    else:
        assert "refused by torch.load(weights_only=True)" in message
    result = runner.invoke(cli.app, ["convert", str(path), "--kind", "detectron2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and str(path) in one_line(result.output)
    assert not marker.exists()


def test_object_arrays_and_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.array([{"x": 1}], dtype=object)}}))
    with pytest.raises(CheckpointError, match="refusing to unpickle the global builtins|not a tensor"):
        key_mapping.read_state_dict_file(path)
    path = tmp_path / "strings.pth"
    torch.save({"model": {"w": "text"}}, path)
    with pytest.raises(CheckpointError, match="'w' is a str, not a tensor"):
        key_mapping.read_state_dict_file(path)
