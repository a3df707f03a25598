"""VCT reference checkpoints -> av2ts (weights/convert_vct.py).

The key mapping: every layout of tests/data/vct-keys-*.tsv (measured by building spyflying/VCT_AVS) converts with
nothing missing and exactly the expected keys unused, and loads strictly; the key rules one by one; the subset read
from the keys; configs that do not fit.

The import: ``av2ts convert FILE --kind vct`` on detectron2 Checkpointer files (vct-tiny's tensors under the
reference's names, and one full-size vct-swinb file, slow) writes a checkpoint that the one resolver loads and that
segments; the report names what was not used; the error lines. The registry: vct-s4 listed, picked, converted once
and used offline from a Hugging Face cache built here; ``info`` states both parameter counts.
"""

from __future__ import annotations

import ast
import json
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


def test_the_mapping_imports_only_what_it_may():
    """The key mapping is pure: at module level the standard library, torch, av2ts_cli.config and av2ts_cli.errors;
    the network (``convert_vct_state``, on the meta device) and the file readers (``convert_vct_kind``) are imported
    inside the functions that need them."""
    tree = ast.parse(Path(convert_vct.__file__).read_text())
    local = {}
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        local[function.name] = {n.module for n in ast.walk(function) if isinstance(n, ast.ImportFrom)}
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
        a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert top <= {"__future__", "re", "collections.abc", "dataclasses", "torch", "av2ts_cli.config",
                   "av2ts_cli.errors"}, top
    assert local["convert_vct_state"] == {"av2ts_cli.model"}
    assert all(m == "av2ts_cli.model" or m.startswith(("av2ts_cli.errors", "av2ts_cli.weights."))
               for m in local["convert_vct_kind"])
    assert not any(modules for name, modules in local.items() if name not in ("convert_vct_state", "convert_vct_kind"))


# --------------------------------------------------------------------------------------- av2ts convert --kind vct
def reference_names() -> dict[str, str]:
    """av2ts key -> reference key, the inverse of ``map_vct_key`` over the three measured layouts."""
    inverse = {}
    for subset in SUBSETS:
        for key, _, _ in layout(subset):
            ours, _ = map_vct_key(key)
            if ours is not None:
                assert inverse.setdefault(ours, key) == key
    return inverse


TRAINER = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
           "scheduler": {"last_epoch": 5, "base_lrs": [1e-4]}, "iteration": 5}


def tiny_reference_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the VCT code would save for ``model`` (a vct-tiny VCT): its tensors (replaced by seeded random values)
    under the reference's names, plus what the reference saves and av2ts does not build: the Swin index tables,
    VGGish's three linear layers (narrow stand-ins: they are dropped by name), the no-object weight."""
    inverse = reference_names()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        state[inverse[key]] = torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
    for key, value in model.named_buffers():
        if key.endswith("relative_position_index"):
            state[key.replace("siam_backbone.", "pre_sam_backbone.")] = value.clone()
    for i, (n_in, n_out) in enumerate([(model.cfg.vggish_widths[-1] * 24, 16), (16, 16), (16, 128)]):
        state[f"audio_backbone.embeddings.{2 * i}.weight"] = torch.zeros(n_out, n_in)
        state[f"audio_backbone.embeddings.{2 * i}.bias"] = torch.zeros(n_out)
    state["criterion.empty_weight"] = torch.ones(model.cfg.num_classes + 1)
    return state


def full_reference_state(subset: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference's layout for ``subset``, key for key at its shapes, in float16 (half the file) with random
    values (zeros for the integer index tables, which are dropped by name)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator).half() if dtype.is_floating_point
            else torch.zeros(shape, dtype=dtype) for key, dtype, shape in layout(subset)}


def write_reference_file(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A detectron2 Checkpointer file: the model, the trainer's state (plain values) and the iteration."""
    torch.save({"model": state, "trainer": TRAINER, "iteration": 5}, path)
    return path


def inputs_for(cfg, frames: int = 1, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    size = cfg.input_size
    video = torch.randint(0, 256, (1, frames, 3, size, size), generator=generator).float()
    audio = torch.randn(1, frames, 96, 64, generator=generator)
    maskiges = torch.randint(0, 256, (1, frames, 3, size, size), generator=generator).float() if cfg.siam else None
    return video, audio, maskiges


def check_converted(folder: Path, report: dict, state: dict, cfg_expected) -> None:
    """The converted checkpoint through the one resolver: its config, every tensor equal to the file's (float32),
    the report's counts and reasons; ``segment`` once (one frame)."""
    from av2ts_cli.weights.resolve import resolve_model

    model, cfg, doc = resolve_model(folder)
    assert (cfg.preset, cfg.subset, cfg.siam, cfg.family) == (cfg_expected.preset, cfg_expected.subset,
                                                              cfg_expected.siam, "vct")
    assert doc["meta"]["initialised_from"][0]["kind"] == "vct"
    inverse = reference_names()
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, state[inverse[key]].to(value.dtype)), key
    blocks = sum(1 for k in state if k.endswith("relative_position_index"))
    assert blocks == sum(cfg.backbone_kwargs.get("depths", (2, 2, 18, 2))) * (2 if cfg.siam else 1)
    assert report["filled_tensors"] == report["source_tensors_used"] == len(ours)
    assert report["dropped"] == {
        "VGGish's linear layers: loaded by the reference but never run (VCT reads the conv map)": 6,
        "Swin relative-position index: a constant table that timm rebuilds (not saved by av2ts)": blocks,
        "a constant of the loss (no-object weight), rebuilt from the config": 1,
        "detectron2 trainer state (optimizer, scheduler, hooks), not model weights": 1,
        "detectron2 training iteration counter, not model weights": 1}
    assert "other" not in report["filled_per_part"]
    assert sum(report["filled_per_part"].values()) == len(ours)
    with torch.inference_mode():
        semseg = model.segment(*inputs_for(cfg))
    size = cfg.output_size or cfg.input_size
    assert semseg.shape == (1, 1, cfg.num_classes, size, size) and bool(torch.isfinite(semseg).all())


@pytest.mark.parametrize("subset, siam", [("s4", True), ("ms3", False), ("avss", True)])
def test_cli_converts_a_tiny_reference_file(subset, siam, tmp_path):
    """`av2ts convert FILE --kind vct --preset vct-tiny --out DIR --json`: subset and Siam encoder from the keys, every
    tensor carried over, the unused entries reported by reason; the resolver loads DIR with the file's values, and
    it segments."""
    from conftest import invoke_cli

    cfg = get_preset("vct-tiny", subset, siam=siam)
    torch.manual_seed(0)
    state = tiny_reference_state(build_model(cfg))
    write_reference_file(tmp_path / "model_best.pth", state)
    result = invoke_cli(["convert", str(tmp_path / "model_best.pth"), "--kind", "vct", "--preset", "vct-tiny",
                         "--out", str(tmp_path / "vct"), "--json"])
    report = json.loads(result.stdout)
    assert (report["preset"], report["subset"], report["siam"], report["num_classes"]) == \
        ("vct-tiny", subset, siam, cfg.num_classes)
    check_converted(tmp_path / "vct", report, state, cfg)


def test_cli_report_in_words(tmp_path):
    from conftest import invoke_cli

    torch.manual_seed(0)
    write_reference_file(tmp_path / "m.pth", tiny_reference_state(build_model(get_preset("vct-tiny", "s4", siam=True))))
    result = invoke_cli(["convert", str(tmp_path / "m.pth"), "--kind", "vct", "--preset", "vct-tiny",
                         "--out", str(tmp_path / "o")])
    text = " ".join(result.output.split())
    for line in ("vct-tiny, s4, 2 classes, Siam encoder on", "query generator (ProtoVCQ / VCQ)",
                 "dropped 6 source tensors: VGGish's linear layers: loaded by the reference but never run",
                 "dropped 16 source tensors: Swin relative-position index",
                 "detectron2 trainer state", f"Checkpoint saved to {tmp_path / 'o'}"):
        assert line in text, line


def test_cli_error_lines(tmp_path):
    """Each failure is one `error:` line with its exit code (2: usage, 1: the file), and nothing is written."""
    from conftest import invoke_cli

    torch.manual_seed(0)
    s4 = tmp_path / "s4.pth"
    state = tiny_reference_state(build_model(get_preset("vct-tiny", "s4", siam=True)))
    write_reference_file(s4, state)
    no_siam = write_reference_file(tmp_path / "ms3.pth",
                                   tiny_reference_state(build_model(get_preset("vct-tiny", "ms3", siam=False))))
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "sem_seg_head.predictor.query_feat.weight"}},
               partial)
    not_vct = tmp_path / "other.pth"
    torch.save({"model": {"backbone.norm0.weight": torch.zeros(2)}}, not_vct)
    out = tmp_path / "out"
    cases = [
        (s4, ["--subset", "ms3"], 2, f"{s4}: holds a VCT s4 model (its class head and prototypes); --subset is ms3"),
        (no_siam, ["--subset", "s4"], 2,
         f"{no_siam}: holds a VCT ms3 model (its class head and prototypes); --subset is s4"),
        (s4, ["--subset", "s5"], 2, "unknown --subset 's5'; choose from s4, ms3, avss"),
        (s4, ["--no-siam"], 2, f"{s4}: the checkpoint has Siam encoder (pre_sam_backbone); --no-siam contradicts it"),
        (no_siam, ["--siam"], 2,
         f"{no_siam}: the checkpoint has no Siam encoder (pre_sam_backbone); --siam contradicts it"),
        (s4, ["--preset", "combo-r50"], 2,
         "--preset combo-r50 is not a VCT architecture; --kind vct converts into vct-swinb or vct-tiny"),
        (s4, ["--base", str(tmp_path)], 2, "--base does not apply to --kind vct: the checkpoint gives every tensor"),
        (partial, ["--preset", "vct-tiny"], 1,
         f"{partial}: leaves 1 av2ts tensors of vct-tiny unfilled (decoder.query_feat.weight)"),
        (not_vct, [], 1, f"{not_vct}: no sem_seg_head.predictor.class_embed.bias: not a VCT reference state dict"),
    ]
    for source, options, code, message in cases:
        result = invoke_cli(["convert", str(source), "--kind", "vct", "--out", str(out), *options], expect=code)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == [f"error: {message}"], (options, result.output)
        assert not out.exists()
    # the full-size preset (the default) on a vct-tiny file: the tensors do not fit, named with the file
    result = invoke_cli(["convert", str(s4), "--kind", "vct", "--out", str(out)], expect=2)
    assert result.output.startswith(f"error: {s4}: ") and "tensors do not fit vct-swinb (s4)" in result.output


@pytest.mark.slow
def test_cli_converts_a_full_size_reference_file(tmp_path):
    """A vct-swinb S4 file in float16 (the reference's 1077 keys at their shapes, random values), through the CLI
    and the resolver, segments at 384 -> 224; the key count and the parameter counts are the reference's."""
    from conftest import invoke_cli

    cfg = get_preset("vct-swinb", "s4")
    state = full_reference_state("s4")
    assert sum(t.numel() for k, t in state.items() if k != "criterion.empty_weight" and t.is_floating_point()) \
        == 289_850_000  # the reference's parameters (the no-object weight is a buffer)
    write_reference_file(tmp_path / "model_best.pth", state)
    result = invoke_cli(["convert", str(tmp_path / "model_best.pth"), "--kind", "vct", "--out", str(tmp_path / "v"),
                         "--json"])
    (tmp_path / "model_best.pth").unlink()
    report = json.loads(result.stdout)
    assert (report["preset"], report["subset"], report["siam"]) == ("vct-swinb", "s4", True)
    check_converted(tmp_path / "v", report, state, cfg)
