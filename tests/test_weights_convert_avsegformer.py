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


# ----------------------------------------------------------------------------------------- av2ts convert (the app)
runner = CliRunner()
OLD_LAYOUT_LINE = (
    "the checkpoint has no head.query_generator.* keys (head.query_generator.query.weight and its layers): it was "
    "made by AVSegFormer's code before commit b2f40e2 (2023-08-14), whose network had no audio query generator. "
    "av2ts builds the later network; use the checkpoints linked by the README at 7083cb6 (2023-08-14 17:33)")


def convert_cli(path, out, *options: str):
    cli._state["debug"] = False
    return runner.invoke(cli.app, ["convert", str(path), "--kind", "avsegformer", "--out", str(out), *options])


def assert_loaded(folder, state: dict[str, torch.Tensor], preset: str, subset: str) -> None:
    """``resolve_model(folder)`` holds every used tensor of the reference ``state`` under its av2ts name."""
    model, cfg, _ = resolve_model(folder)
    assert (cfg.family, cfg.preset, cfg.subset, cfg.siam) == ("avsegformer", preset, subset, False)
    loaded = model.state_dict()
    used = {rename(key)[0]: tensor for key, tensor in state.items() if not key.startswith(UNBUILT)}
    assert set(used) == set(loaded)
    for key, tensor in used.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_cli_converts_a_reference_checkpoint_and_resolve_model_loads_it(tmp_path, subset):
    """avsegformer-tiny's tensors in the reference's names: the JSON report lists every unused key under its reason,
    the checkpoint loads through the one resolver with the same tensors; AVSS's 71 channels say the subset."""
    state = tiny_reference_state(subset, seed=1)
    path = tmp_path / "AVSS_miou_best.pth"
    torch.save(state, path)
    options = ["--preset", "avsegformer-tiny"] + (["--subset", subset] if subset == "s4" else [])
    result = convert_cli(path, tmp_path / "out", *options, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    unused = {key for keys in report["unused_keys"].values() for key in keys}
    assert unused == {key for key in state if key.startswith(UNBUILT)} and len(unused) == 4
    assert sum(report["dropped"].values()) == 4 and report["source_tensors_used"] == len(state) - 4
    assert report["filled_tensors"] == len(state) - 4 and report["subset"] == subset
    assert_loaded(tmp_path / "out", state, "avsegformer-tiny", subset)


def test_cli_report_names_the_unused_keys(tmp_path):
    path = tmp_path / "S4_best.pth"
    torch.save(tiny_reference_state("s4"), path)
    result = convert_cli(path, tmp_path / "out", "--preset", "avsegformer-tiny", "--subset", "s4")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for key in ("head.fpn.up1.1.weight", "head.attn_fc.4.weight", "backbone.layer3_2.0.conv1.weight"):
        assert key in text
    assert "dropped 2 source tensors: the reference ResNet-50's second branch" in text


def test_cli_refuses_an_old_layout_in_one_line_with_or_without_subset(tmp_path):
    """A checkpoint of the code before the query generator: exit 1, one line, before any question of --subset."""
    state = {k: v for k, v in tiny_reference_state("s4").items() if not k.startswith("head.query_generator.")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    for options in ([], ["--subset", "ms3"]):
        result = convert_cli(path, tmp_path / "out", *options)
        assert result.exit_code == 1
        assert one_line(result.output) == f"error: {path}: {OLD_LAYOUT_LINE}"
    assert not (tmp_path / "out").exists()


def test_cli_s4_or_ms3_without_subset_is_one_usage_line(tmp_path):
    path = tmp_path / "best.pth"
    torch.save(tiny_reference_state("s4"), path)
    result = convert_cli(path, tmp_path / "out", "--preset", "avsegformer-tiny")
    assert result.exit_code == 2
    assert one_line(result.output) == (f"error: {path}: an S4 or MS3 checkpoint (one output channel; the two look "
                                       "alike): pass --subset s4 or --subset ms3")
    result = convert_cli(path, tmp_path / "out", "--preset", "combo-tiny", "--subset", "s4")
    assert result.exit_code == 2
    assert one_line(result.output) == ("error: --preset combo-tiny: not an AVSegFormer preset; choose from "
                                       "avsegformer-r50, avsegformer-pvt, avsegformer-tiny")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_cli_empty_or_truncated_file_is_one_line_naming_it(tmp_path, damage):
    """An interrupted download: one line naming the file and what is wrong, no EOFError or zip-reader text."""
    whole = tmp_path / "whole.pth"
    torch.save(tiny_reference_state("s4"), whole)
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(b"" if damage == "empty" else whole.read_bytes()[: whole.stat().st_size // 2])
    result = convert_cli(path, tmp_path / "out", "--subset", "s4")
    assert result.exit_code == 1
    line = one_line(result.output)
    expected = {"empty": f"error: {path}: empty file (0 bytes), not a checkpoint: an interrupted download or copy? "
                         "fetch or copy it again",
                "truncated": f"error: {path}: truncated: the zip archive torch.save writes ends early, its directory "
                             f"missing ({path.stat().st_size:,} bytes): an interrupted download or copy? fetch or "
                             "copy it again"}[damage]
    assert line == expected
    for raw in ("EOFError", "PytorchStreamReader", "central directory", "miniz"):
        assert raw not in result.output


@pytest.fixture(scope="module")
def r50_ms3_file(tmp_path_factory):
    """A full-size checkpoint in the R50 MS3 layout (random float16 tensors: 300 MB, not 600), written once."""
    state = pool_state("avsegformer-keys-r50-ms3.tsv", seed=5)
    path = tmp_path_factory.mktemp("avsegformer") / "MS3_best.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
def test_cli_converts_the_full_size_r50_ms3_layout(r50_ms3_file, tmp_path):
    """The R50 MS3 layout through ``av2ts convert``: every used tensor lands in the resolved model (float16 -> float32
    exactly), the second ResNet branch and the head's never-run modules are reported unused."""
    path, state = r50_ms3_file
    result = convert_cli(path, tmp_path / "out", "--subset", "ms3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {key for keys in report["unused_keys"].values() for key in keys} == \
        {key for key in state if key.startswith(UNBUILT)}
    assert report["preset"] == "avsegformer-r50" and report["filled_tensors"] == 668
    assert_loaded(tmp_path / "out", state, "avsegformer-r50", "ms3")


@pytest.mark.slow
def test_the_registry_name_resolves_from_a_stand_in_for_google_drive(r50_ms3_file, tmp_path, monkeypatch):
    """``resolve_model("avsegformer-r50-ms3")``: the authors' file id is fetched once (a local stand-in for
    ``upstream.fetch_from_gdrive`` copies the R50 MS3 file; the rest is real), converted with the entry's preset and
    subset, loaded; a second use, offline, neither fetches nor converts."""
    import shutil

    from huggingface_hub import constants

    from av2ts_cli.weights import upstream

    path, state = r50_ms3_file
    calls = []

    def google_drive(file_id, out):
        calls.append(file_id)
        shutil.copyfile(path, out)

    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(upstream, "fetch_from_gdrive", google_drive)
    model, cfg, doc = resolve_model("avsegformer-r50-ms3")
    assert calls == ["1MRk5gQnUtiWwYDpPfB20fO07SVLhfuIV"]
    assert (cfg.preset, cfg.subset, cfg.num_classes) == ("avsegformer-r50", "ms3", 2)
    assert doc["trained_on"]["published"] == {"J": 53.81, "F": 65.6, "protocol": "avsegformer"}
    assert doc["meta"]["registry"]["licence"] == "none stated"
    loaded = model.state_dict()
    for key in ("backbone.layer4_1.2.conv3.weight", "vggish.embeddings.0.weight", "head.fc.4.weight",
                "head.query_generator.layers.5.cross_attn.in_proj_weight", "backbone.bn1.running_var"):
        assert torch.equal(loaded[rename(key)[0]], state[key].float()), key
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = upstream.prepare_registry_checkpoint("avsegformer-r50-ms3")
    assert not again.converted and calls == ["1MRk5gQnUtiWwYDpPfB20fO07SVLhfuIV"]
