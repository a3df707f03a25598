"""The AVSegFormer checkpoint converter (weights/convert_avsegformer.py): the reference's three state-dict layouts
(avsegformer-keys-*.tsv, measured on vvvb-github/AVSegFormer at 7083cb6) convert with no av2ts key missing, exactly
the never-run modules unused, and load strictly; old-layout, wrong-backbone and wrong-class checkpoints are refused.

Through the app, ``av2ts convert FILE --kind avsegformer`` imports checkpoint files in those layouts (avsegformer-tiny's
in the reference's names in a second, the full-size R50 MS3 one in float16), ``resolve_model`` loads the result, and
every refusal is one error line.

The layout files are read from tests/data, else from the spec folder; without them the layout tests skip (the rename
unit tests and the refusals still run)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _avsegformer_keys import UNBUILT, meta_state, pool_state, random_state, tiny_reference_state
from conftest import one_line
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.config import get_preset
from av2ts_cli.model import build_model
from av2ts_cli.weights.convert_avsegformer import convert_avsegformer, rename, target_layout
from av2ts_cli.weights.resolve import resolve_model

LAYOUTS = [("avsegformer-keys-pvt-s4.tsv", "avsegformer-pvt", "s4"),
           ("avsegformer-keys-r50-ms3.tsv", "avsegformer-r50", "ms3"),
           ("avsegformer-keys-pvt-avss.tsv", "avsegformer-pvt", "avss")]


# ------------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("tsv, preset, subset", LAYOUTS)
def test_layout_converts_completely_and_loads_strictly(tsv, preset, subset):
    """Meta tensors: conversion and a strict ``load_state_dict(assign=True)`` into the full-size meta model (key
    sets and every shape are checked, no memory used)."""
    state = meta_state(tsv)
    cfg = get_preset(preset, subset)
    converted, unused, missing = convert_avsegformer(state, cfg)
    assert missing == []
    assert set(unused) == {k for k in state if k.startswith(UNBUILT)}
    assert len(converted) + len(unused) == len(state)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg, drop_path_rate=0.0))  # drop path: no tensors
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_random_r50_checkpoint_loads_with_its_values():
    """Real tensors for the smallest layout (R50 MS3): every value lands where the rename table says."""
    state = random_state("avsegformer-keys-r50-ms3.tsv")
    cfg = get_preset("avsegformer-r50", "ms3")
    converted, unused, missing = convert_avsegformer(state, cfg)
    model = build_model(cfg)
    model.load_state_dict(converted, strict=True)
    assert missing == [] and set(unused) == {k for k in state if k.startswith(UNBUILT)}
    loaded = model.state_dict()
    for old, new in [("backbone.layer3_1.5.conv2.weight", "backbone.layer3.5.conv2.weight"),
                     ("backbone.bn1.running_var", "backbone.bn1.running_var"),
                     ("vggish.embeddings.0.weight", "audio_encoder.embeddings.0.weight"),
                     ("head.transformer.encoder.layers.5.self_attn.sampling_offsets.bias",
                      "head.encoder.5.attn.sampling_offsets.bias"),
                     ("head.transformer.decoder.layers.2.linear2.weight", "head.decoder.2.fc2.weight"),
                     ("head.query_generator.layers.3.cross_attn.in_proj_weight",
                      "head.query_generator.layers.3.cross_attn.in_proj_weight"),
                     ("head.fusion_block.kv_proj.weight", "head.mixer.kv_proj.weight"),
                     ("head.mlp.layers.1.weight", "head.mlp.1.weight"), ("head.fc.4.weight", "head.fc.4.weight")]:
        assert torch.equal(loaded[new], state[old]), old


# -------------------------------------------------------------------------------------------------- rename table
def test_rename_table():
    assert rename("backbone.patch_embed1.norm.weight") == ("backbone.patch_embed.norm.weight", "")
    assert rename("backbone.patch_embed3.proj.bias") == ("backbone.stages_2.downsample.proj.bias", "")
    assert rename("backbone.block3.39.mlp.dwconv.dwconv.weight") == ("backbone.stages_2.blocks.39.mlp.dwconv.weight",
                                                                     "")
    assert rename("backbone.block1.0.attn.sr.weight") == ("backbone.stages_0.blocks.0.attn.sr.weight", "")
    assert rename("backbone.norm4.bias") == ("backbone.stages_3.norm.bias", "")
    assert rename("backbone.layer4_1.2.bn3.num_batches_tracked")[0] == "backbone.layer4.2.bn3.num_batches_tracked"
    assert rename("backbone.layer1.0.downsample.1.weight")[0] == "backbone.layer1.0.downsample.1.weight"
    assert rename("vggish.features.13.bias")[0] == "audio_encoder.features.13.bias"
    assert rename("head.level_embed")[0] == "head.level_embed"
    assert rename("head.transformer.encoder.layers.0.norm2.bias")[0] == "head.encoder.0.norm2.bias"
    assert rename("head.transformer.decoder.layers.4.cross_attn.out_proj.bias")[0] == (
        "head.decoder.4.cross_attn.out_proj.bias")
    assert rename("head.in_proj.2.1.weight")[0] == "head.in_proj.2.1.weight"
    for unused in ("head.fpn.up1.1.weight", "head.attn_fc.4.weight", "backbone.layer3_2.0.conv1.weight",
                   "backbone.layer4_2.2.bn3.running_mean", "vggish.pproc.pca_means", "criterion.weight"):
        new, reason = rename(unused)
        assert new is None and reason, unused


def test_every_head_key_has_a_reference_name():
    """Every key of the network has a reference key that renames to it (the rename table covers the layout)."""
    keys = target_layout(get_preset("avsegformer-pvt", "s4"))
    head_keys = [k for k in keys if k.startswith("head.")]
    inverse = {"head.encoder.": "head.transformer.encoder.layers.", "head.decoder.": "head.transformer.decoder.layers.",
               "head.mixer.": "head.fusion_block.", "head.mlp.": "head.mlp.layers."}
    for key in head_keys:
        source = key
        for ours, theirs in inverse.items():
            if key.startswith(ours):
                source = theirs + key[len(ours):]
        source = source.replace(".attn.", ".self_attn.").replace(".fc1.", ".linear1.").replace(".fc2.", ".linear2.")
        assert rename(source)[0] == key, (source, key)


# ------------------------------------------------------------------------------------------------------ refusals
def test_old_layout_is_refused():
    """Checkpoints of the code before commit b2f40e2 have no query generator: a ValueError names the missing keys."""
    state = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "head.level_embed": torch.zeros(3, 256),
             "head.learnable_query.weight": torch.zeros(300, 256), "head.attn_fc.4.weight": torch.zeros(1, 32, 1, 1)}
    with pytest.raises(ValueError, match=r"head\.query_generator.*b2f40e2"):
        convert_avsegformer(state, get_preset("avsegformer-r50", "s4"))


def test_old_layout_from_a_full_layout_is_refused():
    state = {k: v for k, v in meta_state("avsegformer-keys-pvt-s4.tsv").items()
             if not k.startswith("head.query_generator.")}
    with pytest.raises(ValueError, match="query_generator"):
        convert_avsegformer(state, get_preset("avsegformer-pvt", "s4"))


def test_wrong_backbone_classes_and_family_are_refused():
    pvt = meta_state("avsegformer-keys-pvt-s4.tsv")
    with pytest.raises(ValueError, match="PVT-v2-b5.*ResNet-50"):
        convert_avsegformer(pvt, get_preset("avsegformer-r50", "s4"))
    with pytest.raises(ValueError, match=r"71 output channel.*head\.fc\.4\.weight \[1, 32, 1, 1\]"):
        convert_avsegformer(pvt, get_preset("avsegformer-pvt", "avss"))
    with pytest.raises(ValueError, match="family"):
        convert_avsegformer(pvt, get_preset("combo-tiny"))
    with pytest.raises(ValueError, match="not a tensor"):
        convert_avsegformer({"head.level_embed": [0.0]}, get_preset("avsegformer-pvt", "s4"))


def test_data_parallel_prefix_is_tolerated():
    state = {"module." + k: v for k, v in meta_state("avsegformer-keys-r50-ms3.tsv").items()}
    _, unused, missing = convert_avsegformer(state, get_preset("avsegformer-r50", "ms3"))
    assert missing == [] and all(k.startswith(UNBUILT) for k in unused)
