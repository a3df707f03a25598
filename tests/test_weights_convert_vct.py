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
import textwrap
from pathlib import Path

import pytest
import torch

from av2ts_cli.config import get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.model import build_model
from av2ts_cli.weights import convert_vct
from av2ts_cli.weights.convert_vct import convert_vct_state, map_vct_key, vct_config_for

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
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
    """The key mapping is pure: at module level the standard library, torch, av2ts_cli.config, av2ts_cli.errors and
    the shared rename rules (weights/rules.py, itself the standard library only);
    the network (``convert_vct_state``, on the meta device) and the file readers (``convert_vct_kind``) are imported
    inside the functions that need them."""
    tree = ast.parse(Path(convert_vct.__file__).read_text())
    local = {}
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        local[function.name] = {n.module for n in ast.walk(function) if isinstance(n, ast.ImportFrom)}
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
        a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert top <= {"__future__", "re", "collections.abc", "dataclasses", "torch", "av2ts_cli.config",
                   "av2ts_cli.errors", "av2ts_cli.weights.rules"}, top
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
    return {key: torch.empty(shape, dtype=torch.float16).uniform_(-1, 1, generator=generator)
            if dtype.is_floating_point else torch.zeros(shape, dtype=dtype) for key, dtype, shape in layout(subset)}


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


def check_report(report: dict, state: dict, cfg, filled: int) -> None:
    """The conversion report: every av2ts tensor filled from one file tensor, each unused entry under its reason."""
    blocks = sum(1 for k in state if k.endswith("relative_position_index"))
    assert blocks == sum(cfg.backbone_kwargs.get("depths", (2, 2, 18, 2))) * (2 if cfg.siam else 1)
    assert report["filled_tensors"] == report["source_tensors_used"] == filled
    assert report["dropped"] == {
        "VGGish's linear layers: loaded by the reference but never run (VCT reads the conv map)": 6,
        "Swin relative-position index: a constant table that timm rebuilds (not saved by av2ts)": blocks,
        "a constant of the loss (no-object weight), rebuilt from the config": 1,
        "detectron2 trainer state (optimizer, scheduler, hooks), not model weights": 1,
        "detectron2 training iteration counter, not model weights": 1}
    assert "other" not in report["filled_per_part"] and sum(report["filled_per_part"].values()) == filled
    unused = report["unused_keys"]  # the keys themselves, by reason
    assert unused["VGGish's linear layers: loaded by the reference but never run (VCT reads the conv map)"] == \
        sorted(f"audio_backbone.embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("bias", "weight"))
    assert unused["detectron2 trainer state (optimizer, scheduler, hooks), not model weights"] == ["trainer"]
    assert sum(len(keys) for keys in unused.values()) == sum(report["dropped"].values())


def check_converted(folder: Path, report: dict, state: dict, cfg_expected) -> None:
    """The converted checkpoint through the one resolver: its config, every tensor equal to the file's, the report;
    ``segment`` once (one frame)."""
    from av2ts_cli.weights.resolve import resolve_model

    model, cfg, doc = resolve_model(folder)
    assert (cfg.preset, cfg.subset, cfg.siam, cfg.family) == (cfg_expected.preset, cfg_expected.subset,
                                                              cfg_expected.siam, "vct")
    assert doc["meta"]["initialised_from"][0]["kind"] == "vct"
    inverse = reference_names()
    ours = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, state[inverse[key]]), key
    check_report(report, state, cfg, len(ours))
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
    """A vct-swinb S4 file in float16 (the reference's 1077 keys at their shapes, random values) through the CLI:
    the checkpoint holds every tensor of the file (as float32) under its av2ts name, and loads into the model built
    from its config (the tiny files above go on through the resolver and ``segment``; the full network at 384 takes
    a minute on 2 cores: the GPU check does that)."""
    from conftest import invoke_cli
    from safetensors import safe_open

    state = full_reference_state("s4")
    assert sum(t.numel() for k, t in state.items() if k != "criterion.empty_weight" and t.is_floating_point()) \
        == 289_850_000  # the reference's parameters (the no-object weight is a buffer)
    write_reference_file(tmp_path / "model_best.pth", state)
    result = invoke_cli(["convert", str(tmp_path / "model_best.pth"), "--kind", "vct", "--out", str(tmp_path / "v"),
                         "--json"])
    (tmp_path / "model_best.pth").unlink()
    report = json.loads(result.stdout)
    cfg = get_preset("vct-swinb", "s4")
    assert (report["preset"], report["subset"], report["siam"]) == ("vct-swinb", "s4", True)
    with torch.device("meta"):
        expected = build_model(cfg).state_dict()
    inverse = reference_names()
    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == set(expected)
        for key in saved.keys():
            value = saved.get_tensor(key)
            assert value.dtype == torch.float32 and torch.equal(value, state[inverse[key]].float()), key
    check_report(report, state, cfg, len(expected))


# ------------------------------------------------------------------------------------------ info: both counts
def test_info_states_the_built_and_the_reference_parameter_counts():
    """vct-swinb builds all of the reference but VGGish's linear layers (loaded by the reference, never run):
    `info` gives both totals, per subset the reference's measured counts (spec: vct.md)."""
    from conftest import invoke_cli

    from av2ts_cli.weights.resolve import describe_parameters

    report = json.loads(invoke_cli(["info", "--model", "vct-swinb", "--json"]).stdout)
    assert report["total"] == {"parameters": 222_208_528, "trainable": 217_708_816, "frozen": 4_499_712}
    assert report["reference"] == {"parameters": 289_850_000, "left_out": {
        "VGGish's linear layers, loaded by the reference but never run": 67_641_472}}
    assert {p["part"] for p in report["parts"]} >= {"query generator (ProtoVCQ / VCQ)", "prototype alignment (PAC)"}
    for subset, built, reference in (("ms3", 221_807_887, 289_449_359), ("avss", 222_238_549, 289_880_021)):
        counts = describe_parameters("vct-swinb", subset)
        assert (counts["total"]["parameters"], counts["reference"]["parameters"]) == (built, reference)
    text = " ".join(invoke_cli(["info", "--model", "vct-swinb"]).output.split())
    assert ("reference code: 289,850,000 parameters = 222,208,528 built here + 67,641,472 not built (VGGish's "
            "linear layers, loaded by the reference but never run)") in text
    assert "reference" not in describe_parameters("vct-tiny")  # no reference network has vct-tiny's widths


# --------------------------------------------------------------------------------------------------- registry
VCT_REPO = "nowherespyfly/VCT_AVS"
VCT_FILES = ["s4_swinb_384/model_best.pth", "ms3_swinb_384/model_best.pth", "ss_swinb_384/model_best.pth"]


def test_registry_entries_pick_their_file():
    """The README's three files, each picked by its entry from a listing with other files beside them."""
    from av2ts_cli.errors import CheckpointError
    from av2ts_cli.weights import registry, upstream

    listing = ["README.md", "swin_base_patch4_window12_384_22k.pth", "s4_swinb_384/model_0004999.pth",
               "s4_swinb_384/config.yaml", *VCT_FILES]
    for name, path in zip(("vct-s4", "vct-ms3", "vct-avss"), VCT_FILES, strict=True):
        entry = registry.REGISTRY[name]
        assert entry.source == f"hf://{VCT_REPO}@main" and entry.convert_kind == "vct" and entry.converted_on_use
        assert (entry.licence, entry.convert_preset, entry.convert_subset) == \
            ("apache-2.0", "vct-swinb", entry.published["subset"])
        assert upstream.pick_hub_file(listing, entry, name) == path
    assert registry.REGISTRY["vct-avss"].published == {"subset": "avss", "J": 52.5, "F": 56.9}
    with pytest.raises(CheckpointError, match=r"no a model_best.pth in a ms3 model folder under the repository's "
                                              r"root \(its files named model_best.pth there: s4_swinb_384"):
        upstream.pick_hub_file(["s4_swinb_384/model_best.pth"], registry.REGISTRY["vct-ms3"], "vct-ms3")


VCT_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys, time
    time.sleep = lambda seconds: None  # huggingface_hub retries with back-off against the unreachable endpoint
    from typer.testing import CliRunner
    from av2ts_cli import cli
    from av2ts_cli.weights import registry, resolve, upstream
    # the file holds vct-tiny's tensors: the entry converts into that preset; everything else is the entry's own
    registry.REGISTRY["vct-s4"] = dataclasses.replace(registry.REGISTRY["vct-s4"], convert_preset="vct-tiny")
    model, cfg, doc = resolve.resolve_model("vct-s4", subset="s4")
    again = upstream.prepare_registry_checkpoint("vct-s4")
    runner = CliRunner()
    info = runner.invoke(cli.app, ["info", "--model", "vct-s4", "--json"])
    info_text = runner.invoke(cli.app, ["info", "--model", "vct-s4"])
    download = runner.invoke(cli.app, ["download", "vct-s4"])
    state = model.state_dict()
    print(json.dumps({"preset": cfg.preset, "family": cfg.family, "siam": cfg.siam, "subset": cfg.subset,
                      "again_converted": again.converted, "folder": str(again.folder), "sha256": again.sha256,
                      "source_path": again.source_path, "registry": doc["meta"].get("registry"),
                      "trained_on": doc["trained_on"], "info": json.loads(info.stdout), "info_text": info_text.output,
                      "download": download.output,
                      "prototypes": float(state["queries.prototypes.weight"].double().sum()),
                      "vggish": float(state["audio_encoder.features.0.weight"].double().sum())}))
""")


@pytest.mark.slow
def test_vct_registry_model_is_listed_picked_converted_once_and_used_offline(tmp_path):
    """vct-s4 against a Hugging Face cache built here (the Hub out of reach, then HF_HUB_OFFLINE=1): the listing
    falls back to the cached snapshot, s4_swinb_384/model_best.pth is picked among the three subsets' files,
    read from the cache and converted once (a detectron2 Checkpointer file of vct-tiny's tensors under the
    reference's names: the entry's preset is switched to vct-tiny, the conversion path is the real one) into av2ts's
    cache under the file's sha256; the second process loads it offline without converting, and `info` and
    `download` name it with its published scores and licence."""
    import hashlib

    from _hub import cached_hub_env, run_json_script, write_cached_repo

    torch.manual_seed(0)
    state = tiny_reference_state(build_model(get_preset("vct-tiny", "s4", siam=True)))
    source = write_reference_file(tmp_path / "model_best.pth", state)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    decoy = tmp_path / "decoy.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, decoy)  # the other subsets' files: never downloaded
    readme = tmp_path / "README.md"
    readme.write_text("VCT checkpoints")
    cache = tmp_path / "hub"
    commit = "e" * 40
    files = {VCT_FILES[0]: source, VCT_FILES[1]: decoy, VCT_FILES[2]: decoy, "README.md": readme}
    write_cached_repo(cache, VCT_REPO, {commit: files}, {"main": commit})
    source.unlink()  # only the cache holds it now
    av2ts_cache = tmp_path / "av2ts-cache"
    env = cached_hub_env(tmp_path, cache)

    def run(**extra):
        return run_json_script(VCT_SCRIPT, {**env, **extra}, REPO)

    first = run()
    folder = Path(first["folder"])
    assert folder.parent == av2ts_cache / "converted" and folder.name == f"vct-{sha256[:32]}"
    assert (first["preset"], first["family"], first["siam"], first["subset"]) == ("vct-tiny", "vct", True, "s4")
    assert first["sha256"] == sha256 and first["source_path"] == VCT_FILES[0] and not first["again_converted"]
    assert first["registry"]["source"] == f"hf://{VCT_REPO}@main/{VCT_FILES[0]}"
    assert first["registry"]["licence"] == "apache-2.0"
    unused = first["registry"]["unused_source_entries"]
    assert {"trainer", "iteration", "criterion.empty_weight", "audio_backbone.embeddings.0.weight"} <= set(unused)
    assert first["trained_on"] == {"subset": "s4", "by": "the VCT authors (upstream training)",
                                   "published": {"J": 86.2, "F": 93.4}}
    inverse = reference_names()
    assert first["prototypes"] == float(state[inverse["queries.prototypes.weight"]].double().sum())
    assert first["vggish"] == float(state[inverse["audio_encoder.features.0.weight"]].double().sum())
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert set(stamps) == {"config.json", "model.safetensors"}  # no temp or lock left inside

    second = run(HF_HUB_OFFLINE="1")
    assert {k: second[k] for k in ("prototypes", "vggish", "folder", "sha256")} == \
        {k: first[k] for k in ("prototypes", "vggish", "folder", "sha256")}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # loaded, not converted again
    info = second["info"]
    assert info["registry"]["published"] == {"subset": "s4", "J": 86.2, "F": 93.4}
    assert info["registry"]["licence"] == "apache-2.0" and info["family"] == "vct"
    text = " ".join(second["info_text"].split())
    assert "published (s4): J 86.2, F 93.4; licence: apache-2.0" in text and "VCT (CVPR'25)" in text
    assert "vct-s4: converted earlier" in " ".join(second["download"].split())
