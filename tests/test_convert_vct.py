"""VCT reference state dicts -> av2ts's VCT (weights/convert_vct.py): every layout of tests/data/vct-keys-*.tsv
(measured by building spyflying/VCT_AVS) converts with nothing missing and exactly the expected keys unused, and
loads strictly; the key rules one by one; the subset read from the keys; configs that do not fit."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.model import build_model
from av2ts_cli.weights import convert_vct
from av2ts_cli.weights.convert_vct import convert_vct_state, map_vct_key, vct_config_for

DATA = Path(__file__).parent / "data"
SUBSETS = ("s4", "ms3", "avss")


def layout(subset: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    rows = []
    for line in (DATA / f"vct-keys-{subset}.tsv").read_text().splitlines()[1:]:
        key, dtype, shape, _ = line.split("\t")
        rows.append((key, getattr(torch, dtype), tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())))
    return rows


def meta_state(subset: str) -> dict[str, torch.Tensor]:
    """The layout as meta tensors: keys, shapes and dtypes without memory (the full models are 290 M parameters)."""
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, dtype, shape in layout(subset)}


def expected_unused(subset: str) -> dict[str, str]:
    """What the reference saves and av2ts does not build: 2 x 24 Swin index tables, VGGish's 3 linear layers,
    the criterion's no-object weight."""
    unused = {}
    for key, _, _ in layout(subset):
        if key.endswith(".attn.relative_position_index"):
            unused[key] = "relative-position index"
        elif key.startswith("audio_backbone.embeddings."):
            unused[key] = "VGGish's linear layers"
        elif key == "criterion.empty_weight":
            unused[key] = "no-object weight"
    assert len(unused) == 48 + 6 + 1
    return unused


@pytest.mark.parametrize("subset", SUBSETS)
def test_every_reference_layout_converts_and_loads_strictly(subset):
    state = meta_state(subset)
    cfg = vct_config_for(state)
    assert (cfg.preset, cfg.subset, cfg.siam) == ("vct-swinb", subset, True)
    result = convert_vct_state(state, cfg)
    assert result.missing == []
    unused = expected_unused(subset)
    assert set(result.unused) == set(unused)
    for key, why in unused.items():
        assert why in result.unused[key], (key, result.unused[key])
    assert len(result.state) == len(state) - len(unused)
    # the tensors themselves are carried over (names change, values cannot)
    sources = {id(t) for t in state.values()}
    assert all(id(t) in sources for t in result.state.values())
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(result.state, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == sum(
        math.prod(t.shape) for k, t in state.items() if k not in unused and t.is_floating_point())


def test_real_tensors_load_strictly_and_keep_their_values():
    """vct-tiny's structure is the reference's at smaller widths and depths, so its own state dict under the
    reference's names (those of the full S4 layout that map onto its keys) stands in for a reference file with
    real values: it converts, loads strictly and keeps every value."""
    inverse = {}
    for key, _, _ in layout("s4"):
        ours, _ = map_vct_key(key)
        if ours is not None:
            inverse[ours] = key
    torch.manual_seed(0)
    cfg = get_preset("vct-tiny", "s4", siam=True)
    model = build_model(cfg)
    values = {k: v + 1 for k, v in model.state_dict().items()}  # distinct from the model's own values
    state = {inverse[k]: v for k, v in values.items()}
    state["audio_backbone.embeddings.0.weight"] = torch.zeros(2, 2)
    state["criterion.empty_weight"] = torch.ones(3)
    result = convert_vct_state(state, cfg)
    assert result.missing == []
    assert set(result.unused) == {"audio_backbone.embeddings.0.weight", "criterion.empty_weight"}
    model.load_state_dict(result.state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, values[key]), key


@pytest.mark.parametrize("theirs, ours", [
    ("backbone.layers.0.downsample.reduction.weight", "backbone.layers.1.downsample.reduction.weight"),
    ("pre_sam_backbone.layers.2.downsample.norm.bias", "siam_backbone.layers.3.downsample.norm.bias"),
    ("backbone.layers.2.blocks.17.attn.relative_position_bias_table",
     "backbone.layers.2.blocks.17.attn.relative_position_bias_table"),
    ("backbone.norm1.weight", "backbone.stage_norms.1.weight"),
    ("pre_sam_backbone.norm3.bias", "siam_backbone.norm.bias"),
    ("backbone.patch_embed.norm.weight", "backbone.patch_embed.norm.weight"),
    ("scale_factor_module.3.fc2.bias", "siam_gates.gates.3.fc2.bias"),
    ("audio_backbone.features.13.weight", "audio_encoder.features.13.weight"),
    ("sem_seg_head.audio_transformation.embeddings.4.weight", "audio_mlp.layers.4.weight"),
    ("sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.value_proj.bias",
     "pixel_decoder.layers.5.attn.value_proj.bias"),
    ("sem_seg_head.pixel_decoder.adapter_1.norm.weight", "pixel_decoder.lateral.norm.weight"),
    ("sem_seg_head.predictor.visual_query_block.query_mixer.layers.0.weight", "queries.query_mixer.layers.0.weight"),
    ("sem_seg_head.predictor.visual_query_block.pre_attn.multihead_attn.in_proj_weight",
     "queries.prototype_attn.in_proj_weight"),
    ("sem_seg_head.predictor.visual_query_block.assign_attn.proj.bias", "queries.assign.proj.bias"),
    ("sem_seg_head.predictor.transformer_cross_attention_layers.8.norm.weight", "decoder.layers.8.cross_norm.weight"),
    ("sem_seg_head.predictor.level_embed.weight", "decoder.level_embed.weight"),
    ("sem_seg_head.predictor.proto_proj.weight", "alignment.proto_proj.weight"),
    ("criterion.logit_scale", "alignment.logit_scale"),
])
def test_key_rules(theirs, ours):
    assert map_vct_key(theirs) == (ours, "")


def test_unknown_keys_are_reported_not_dropped_silently():
    assert map_vct_key("sem_seg_head.fusion_module.b_attn.gamma_a") == (None, "no known VCT layout")
    state = {**meta_state("ms3"), "sem_seg_head.fusion_module.level_embed.weight": torch.zeros(1, 256)}
    result = convert_vct_state(state, vct_config_for(state))
    assert result.unused["sem_seg_head.fusion_module.level_embed.weight"] == "no known VCT layout"
    assert result.missing == []


def test_config_from_the_keys():
    state = meta_state("s4")
    no_siam = {k: v for k, v in state.items() if not k.startswith(("pre_sam_backbone.", "scale_factor_module."))}
    cfg = vct_config_for(no_siam, "vct-swinb")
    assert (cfg.subset, cfg.siam) == ("s4", False)
    result = convert_vct_state(no_siam, cfg)
    assert result.missing == [] and not any(k.startswith("siam") for k in result.state)
    with pytest.raises(UsageError, match="fits no VCT subset"):
        vct_config_for({**state, "sem_seg_head.predictor.class_embed.bias": torch.zeros(5)})
    with pytest.raises(UsageError, match="not a VCT"):
        vct_config_for({"backbone.norm0.weight": torch.zeros(1)})


def test_configs_that_do_not_fit():
    with pytest.raises(UsageError, match=r"class_embed\.weight \[72, 256\] -> decoder\.class_embed\.weight \[3, 256\]"):
        convert_vct_state(meta_state("avss"), get_preset("vct-swinb", "s4"))
    with pytest.raises(UsageError, match="not a VCT"):
        convert_vct_state(meta_state("s4"), get_preset("combo-r50"))
    # an S4 file for an MS3 model: the prototype parts have no place there; the rest fills the model
    result = convert_vct_state(meta_state("s4"), get_preset("vct-swinb", "ms3"))
    assert result.missing == []
    no_place = sorted(k for k, why in result.unused.items() if why.startswith("no place"))
    assert len(no_place) == 1 + 6 + 2 + 1  # prototype, pre_attn (4 + norm 2), audio_proj/proto_proj, logit_scale


def test_a_whole_checkpointer_dict_is_accepted():
    state = meta_state("ms3")
    whole = {"model": state, "trainer": {"iteration": 7}, "iteration": 7}
    assert convert_vct_state(whole, get_preset("vct-swinb", "ms3")).missing == []


def test_converter_imports_only_what_it_may():
    """Standard library, torch, av2ts_cli.config, av2ts_cli.errors and av2ts_cli.model.* (the brief of the file)."""
    tree = ast.parse(Path(convert_vct.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    allowed_av2ts = ("av2ts_cli.config", "av2ts_cli.errors", "av2ts_cli.model")
    for name in names:
        top = name.split(".")[0]
        assert (top in ("__future__", "re", "collections", "dataclasses", "torch")
                or name == "av2ts_cli.model" or name.startswith(allowed_av2ts)), name
