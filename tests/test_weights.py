"""Checkpoints (save/load, hf://, registry), restricted readers, the converters and ``av2ts info --model``.

Converter inputs are built here from the documented key names and shapes with random values: the reference
checkpoint from ``tests/data/reference-keys-*.tsv``, the detectron2 pickles and CED files from the names of
model.md section 12 (and, for ``mispeech/ced-mini``, the rename of its public conversion script).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from av2ts_cli import __version__, cli, weights
from av2ts_cli.config import get_preset
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.model import build_model

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
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
def reference_keys(name: str) -> list[tuple[str, list[int], str]]:
    rows = [line.rstrip("\n").split("\t") for line in (DATA / f"reference-keys-{name}.tsv").read_text().splitlines()]
    return [(key, json.loads(shape), dtype) for key, shape, dtype in rows[1:]]


def random_state(rows, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randint(0, 1000, shape, generator=g) if dtype == "int64" else torch.randn(shape, generator=g)
            for key, shape, dtype in rows}


def tiny_cfg(**changes):
    cfg = get_preset("av2ts-tiny", "s4", siam=True)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return type(cfg).from_dict(cfg.to_dict())  # validated


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def ced_hf_names(ced_state: dict) -> dict:
    """CED-Mini under the names of its transformers conversion (mispeech/ced-mini): the conversion script drops
    front_end.*, renames init_bn.1 to init_bn and puts "encoder." in front of everything but outputlayer.*."""
    return {key if key.startswith("outputlayer.") else "encoder." + key.replace("init_bn.1", "init_bn"): value
            for key, value in ced_state.items() if not key.startswith("front_end.")}


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def _reduce_to_system(marker: Path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return Evil()


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    model, cfg = tiny_model
    return weights.save_checkpoint(model, cfg, tmp_path_factory.mktemp("ckpt") / "tiny",
                                   meta={"trained_on": "nothing (random init)"})


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
    return weights.convert(str(path), "reference")


@pytest.fixture(scope="module")
def ced_base(tmp_path_factory):
    """A small checkpoint whose audio encoder has CED-Mini's exact shapes (the rest of the network is tiny)."""
    torch.manual_seed(2)
    cfg = tiny_cfg(siam=False, audio_dim=256, audio_depth=12, audio_heads=4)
    folder = tmp_path_factory.mktemp("ced-base") / "base"
    model = build_model(cfg)
    weights.save_checkpoint(model, cfg, folder)
    return folder, model.state_dict()


@pytest.fixture(scope="module")
def ced_state():
    """CED-Mini as RicherMans/CED saves it: the AV2TS audio_backbone entries plus the unused front end."""
    rows = [(k.removeprefix("audio_backbone."), s, d) for k, s, d in reference_keys("r50-s4")
            if k.startswith("audio_backbone.")]
    rows += [("front_end.0.spectrogram.window", [512], "float32"), ("front_end.0.mel_scale.fb", [257, 64], "float32")]
    return random_state(rows, seed=3)


# ------------------------------------------------------------------------------------------ save / load round trip
def test_save_load_round_trip_is_exact(tiny_model, tiny_checkpoint):
    model, cfg = tiny_model
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_cfg = weights.load_model(tiny_checkpoint)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert not loaded.training

    doc = json.loads((tiny_checkpoint / "config.json").read_text())
    assert doc["format"] == "av2ts-checkpoint" and doc["av2ts_version"] == __version__
    assert (doc["preset"], doc["subset"], doc["num_frames"], doc["input_size"]) == ("av2ts-tiny", "s4", 5, 128)
    assert doc["classes"] == ["background", "sounding object"] and doc["trained_on"] == "nothing (random init)"
    assert doc["model"] == cfg.to_dict()
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        header = f.metadata()
    assert header["av2ts_version"] == __version__ and header["av2ts_format"] == "av2ts-checkpoint/1"


def test_save_replaces_a_checkpoint_atomically_and_keeps_other_files(tiny_model, tmp_path):
    model, cfg = tiny_model
    folder = weights.save_checkpoint(model, cfg, tmp_path / "last")
    (folder / "trainer.pt").write_bytes(b"optimizer state")
    other = build_model(cfg)
    weights.save_checkpoint(other, cfg, folder)
    assert (folder / "trainer.pt").read_bytes() == b"optimizer state"
    assert_same_tensors(weights.load_model(folder)[0].state_dict(), other.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folders left


def test_failed_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    model, cfg = tiny_model
    folder = weights.save_checkpoint(model, cfg, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        weights.save_checkpoint(build_model(cfg), cfg, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_a_file_and_bad_class_names(tiny_model, tmp_path):
    model, cfg = tiny_model
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        weights.save_checkpoint(model, cfg, tmp_path / "file")
    with pytest.raises(UsageError, match="3 class names"):
        weights.save_checkpoint(model, cfg, tmp_path / "c", meta={"classes": ["a", "b", "c"]})


# ------------------------------------------------------------------------------------------- load_model sources
def test_load_model_from_a_weights_file_and_a_registry_name(tiny_model, tiny_checkpoint, monkeypatch):
    model, _ = tiny_model
    loaded, _ = weights.load_model(str(tiny_checkpoint / "model.safetensors"))
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    monkeypatch.setitem(weights.REGISTRY, "my-model", weights.RegistryEntry(str(tiny_checkpoint), "test model"))
    loaded, _ = weights.load_model("my-model")
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_demo_name_resolves_to_the_bundled_folder():
    assert weights.REGISTRY["demo"].source == str(weights.DEMO_MODEL_DIR)
    assert weights.DEMO_MODEL_DIR.parts[-2:] == ("assets", "demo-model")
    if (weights.DEMO_MODEL_DIR / "config.json").is_file():
        assert weights.resolve_checkpoint("demo").weights == weights.DEMO_MODEL_DIR / "model.safetensors"
    else:
        with pytest.raises(CheckpointError, match="demo-model"):
            weights.resolve_checkpoint("demo")


@pytest.mark.parametrize(("name", "text"), [
    ("combo-r50-s4", "not loadable into AV2TS"),
    ("ced-mini", "av2ts convert hf://mispeech/ced-mini --kind ced-hf"),
    ("av2ts-r50", "is a preset"),
    ("no-such-model", "not a known model name"),
])
def test_names_without_weights_give_one_clear_error(name, text):
    with pytest.raises(CheckpointError, match=text):
        weights.resolve_checkpoint(name)


def test_preset_gives_random_init_only_when_asked():
    model, cfg = weights.load_model("av2ts-tiny", allow_random_init=True)
    assert cfg.preset == "av2ts-tiny" and not model.training


def test_incomplete_folders_and_foreign_configs_are_refused(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        weights.resolve_checkpoint(empty)
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json beside"):
        weights.resolve_checkpoint(alone)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"")
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(CheckpointError, match="not an av2ts checkpoint config"):
        weights.load_model(foreign)
    doc = json.loads((tiny_checkpoint / "config.json").read_text())
    doc["model"]["hidden_width"] = 3
    (foreign / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="config.json: invalid model configuration: .*hidden_width"):
        weights.load_model(foreign)


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_mismatched_weights_name_the_file_and_keys(tiny_checkpoint, tmp_path, fault):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    if fault == "missing":
        del state["decoder.query_feat.weight"]
    elif fault == "unexpected":
        state["decoder.extra.weight"] = torch.zeros(2)
    else:
        state["decoder.query_feat.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"))
    result = runner.invoke(cli.app, ["info", "--model", str(folder)])
    assert result.exit_code == 1
    line = one_line(result.output)
    assert str(folder / "model.safetensors") in line
    expected = {"missing": "1 missing keys (decoder.query_feat.weight)",
                "unexpected": "1 unexpected keys (decoder.extra.weight)",
                "shape": "decoder.query_feat.weight [3, 3] vs model [96, 64]"}[fault]
    assert expected in line


# ----------------------------------------------------------------------------------------------------- hf:// hub
def _write_cached_repo(cache: Path, repo_id: str, commits: dict[str, dict[str, Path]], refs: dict[str, str]) -> None:
    """The huggingface_hub cache layout, written by hand: blobs named by content hash, snapshots of symlinks."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, files in commits.items():
        for name, source in files.items():
            data = source.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from typer.testing import CliRunner
    from av2ts_cli import cli, weights
    from av2ts_cli.errors import CheckpointError
    out = {}
    for ref in json.loads(sys.argv[1]):
        try:
            model, _ = weights.load_model(ref)
            out[ref] = {"query_feat_sum": float(model.state_dict()["decoder.query_feat.weight"].double().sum())}
        except CheckpointError as err:
            out[ref] = {"error": err.message}
    result = CliRunner().invoke(cli.app, ["info", "--model", "hf://own/absent"])
    out["cli"] = {"exit_code": result.exit_code, "output": result.output}
    model, _, mapping, _ = weights.convert("ced-mini", "ced-hf", base=sys.argv[2])  # hf://mispeech/ced-mini
    out["ced"] = float(model.state_dict()["audio_encoder.blocks.3.attn.qkv.weight"].double().sum())
    print(json.dumps(out))
""")


def test_hf_references_load_through_the_offline_cache(tmp_path, ced_base, ced_state):
    """hf://owner/repo[@tag|@commit][/subfolder] from a hand-made cache with HF_HUB_OFFLINE=1 (and the ced-mini
    registry name as a converter source); missing repositories, files and revisions are one-line errors."""
    from safetensors.torch import save_file

    checkpoints, sums = {}, {}
    for name, seed in (("main", 10), ("v1", 11), ("v1-sub", 12)):
        torch.manual_seed(seed)
        cfg = tiny_cfg(siam=False)
        model = build_model(cfg)
        checkpoints[name] = weights.save_checkpoint(model, cfg, tmp_path / "src" / name)
        sums[name] = float(model.state_dict()["decoder.query_feat.weight"].double().sum())
    old, new = "a" * 40, "b" * 40
    files = lambda name, sub="": {f"{sub}{f}": checkpoints[name] / f for f in ("config.json", "model.safetensors")}  # noqa: E731
    cache = tmp_path / "hub"
    _write_cached_repo(cache, "own/rep", {old: {**files("v1"), **files("v1-sub", "sub/")}, new: files("main")},
                       {"main": new, "v1": old})
    save_file(ced_hf_names(ced_state), str(tmp_path / "ced.safetensors"))
    _write_cached_repo(cache, "mispeech/ced-mini", {"c" * 40: {"model.safetensors": tmp_path / "ced.safetensors"}},
                       {"main": "c" * 40})
    refs = ["hf://own/rep", "hf://own/rep@v1", f"hf://own/rep@{old}", "hf://own/rep@v1/sub", "hf://own/rep/sub",
            "hf://own/absent", "hf://own/rep@v2"]
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, json.dumps(refs), str(ced_base[0])], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["hf://own/rep"]["query_feat_sum"] == sums["main"]
    assert out["hf://own/rep@v1"]["query_feat_sum"] == sums["v1"]
    assert out[f"hf://own/rep@{old}"]["query_feat_sum"] == sums["v1"]
    assert out["hf://own/rep@v1/sub"]["query_feat_sum"] == sums["v1-sub"]
    assert "main" in out["hf://own/rep/sub"]["error"] and "sub/config.json" in out["hf://own/rep/sub"]["error"]
    absent = out["hf://own/absent"]["error"]
    assert absent.startswith("hf://own/absent: config.json (revision main) is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in absent and "hf download own/absent config.json" in absent
    assert "revision v2" in out["hf://own/rep@v2"]["error"]
    assert out["cli"]["exit_code"] == 1 and "hf://own/absent" in one_line(out["cli"]["output"])
    assert out["ced"] == float(ced_state["blocks.3.attn.qkv.weight"].double().sum())


def test_hf_network_failure_is_one_line(tmp_path):
    script = ("import time\ntime.sleep = lambda seconds: None  # huggingface_hub retries 5 times with back-off\n"
              "from av2ts_cli import weights\n"
              "try:\n    weights.resolve_checkpoint('hf://own/rep@v3')\n"
              "except weights.CheckpointError as err:\n    print(err.message)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    line = one_line(proc.stdout)
    assert line.startswith("hf://own/rep@v3: config.json (revision v3) is not in the Hugging Face cache")
    assert "the Hub could not be reached" in line
    assert "Retrying" not in proc.stderr  # huggingface_hub's retry warnings are kept off the terminal


def test_hub_reference_syntax():
    ref = weights.parse_hub_ref("hf://own/rep@v1.2/a/b")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("own/rep", "v1.2", "a/b")
    assert weights.parse_hub_ref("hf://own/rep").label == "hf://own/rep"
    with pytest.raises(UsageError, match="hf://owner/repo"):
        weights.parse_hub_ref("hf://only-owner")


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

    saved = load_file(str(tmp_path / "out" / "model.safetensors"))  # (load_model itself is tested on tiny models)
    assert len(saved) == len(state) - 20
    assert torch.equal(saved["decoder.class_embed.weight"], state["sem_seg_head.predictor.class_embed.weight"])
    assert torch.equal(saved["backbone.layer3.5.conv2.weight"], state["backbone.res4.5.conv2.weight"])
    doc = weights.read_checkpoint_config(tmp_path / "out" / "config.json")
    cfg = weights.model_config_from(doc, "config.json")
    assert (cfg.preset, cfg.subset, cfg.num_classes, cfg.siam) == ("av2ts-r50", "avss", 71, True)
    assert doc["classes"][:3] == ["background", "accordion", "airplane"] and len(doc["classes"]) == 71
    assert "reference-implementation checkpoint avss.pth" in doc["trained_on"]


@pytest.mark.slow
def test_reference_pvt_and_the_d2_pvt_pickle(tmp_path):
    """PVT-v2-b5: the reference checkpoint (2788 entries), then the d2 pickle applied to both backbones."""
    state = random_state(reference_keys("pvt-s4"), seed=5)
    path = tmp_path / "pvt.pth"
    torch.save({"model": state}, path)
    model, cfg, mapping, _ = weights.convert(str(path), "reference")
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
    pkl_state = weights.read_state_dict_file(pkl)
    groups = [("", "backbone.", weights.PVT_RULES), ("", "siam_backbone.", weights.PVT_RULES)]
    mapping = weights.map_state_dict(pkl_state, groups, model.state_dict(), pkl)
    weights.fill_model(model, mapping, ["backbone.", "siam_backbone."], pkl)
    assert set(mapping.dropped) == {"head.weight", "head.bias"}
    assert set(mapping.origin.values()) == arrays.keys() - {"head.weight", "head.bias"}
    target = model.state_dict()
    backbone_keys = {k for k in target if k.startswith(("backbone.", "siam_backbone."))}
    assert set(mapping.tensors) == backbone_keys
    for dst, src in mapping.origin.items():
        assert np.array_equal(target[dst].numpy(), arrays[src]), (src, dst)


def test_reference_conversion_errors(r50_reference, tmp_path):
    path, state = r50_reference
    small = tmp_path / "small.pth"  # the keys the preset, class count and Siam encoder are read from
    torch.save({"model": {k: state[k] for k in ("backbone.stem.conv1.weight", "pre_sam_backbone.stem.conv1.weight",
                                                "sem_seg_head.predictor.class_embed.weight")}}, small)
    with pytest.raises(UsageError, match="no-siam contradicts"):
        weights.convert(str(small), "reference", siam=False)
    with pytest.raises(UsageError, match="subset avss has 71"):
        weights.convert(str(small), "reference", subset="avss")
    with pytest.raises(UsageError, match="not av2ts-pvt"):
        weights.convert(str(small), "reference", preset="av2ts-pvt")
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
    base = weights.save_checkpoint(base_model, cfg, tmp_path / "base")
    result = runner.invoke(cli.app, ["convert", str(pkl), "--kind", "detectron2", "--base", str(base),
                                     "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["filled_per_part"] == {"visual backbone": 265, "siam encoder (+ gates)": 265}
    assert report["dropped"] == {weights._FC_DROPPED: 2}
    model, _ = weights.load_model(tmp_path / "out")
    loaded, before = model.state_dict(), base_model.state_dict()
    for prefix in ("backbone.", "siam_backbone."):
        for key in (k for k in loaded if k.startswith(prefix)):  # every backbone tensor came from the pickle
            name = key.removeprefix(prefix)
            d2 = weights._apply_rules(name, INVERSE_RESNET)[0]
            assert np.array_equal(loaded[key].numpy(), arrays[d2]), key
    for key in (k for k in loaded if not k.startswith(("backbone.", "siam_backbone."))):
        assert torch.equal(loaded[key], before[key]), key  # the rest is the base's
    # FrozenBN statistics are buffers, saved and loaded like the parameters
    assert "backbone.layer1.0.downsample.1.running_var" in dict(model.named_buffers())
    assert torch.equal(loaded["backbone.layer1.0.downsample.1.running_var"],
                       torch.from_numpy(arrays["res2.0.shortcut.norm.running_var"]))


# timm -> detectron2, written independently of the converter's rules (used to check every filled tensor)
INVERSE_RESNET = [
    weights.Rule(r"bn1\.", "stem.conv1.norm."),
    weights.Rule(r"layer([1-4])\.(\d+)\.bn([1-3])\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    weights.Rule(r"layer([1-4])\.(\d+)\.conv([1-3])\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    weights.Rule(r"layer([1-4])\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    weights.Rule(r"layer([1-4])\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
    weights.Rule(r"conv1\.", "stem.conv1."),
]


@pytest.mark.parametrize("wrapped", [False, True])
def test_ced_checkpoint_fills_the_audio_encoder(ced_base, ced_state, tmp_path, wrapped):
    ced_base, base = ced_base
    path = tmp_path / "audiotransformer_mini_mAP_4896.pt"
    torch.save({"model": ced_state} if wrapped else ced_state, path)
    model, _, mapping, meta = weights.convert(str(path), "ced", base=str(ced_base))
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
    loaded = weights.load_model(tmp_path / "out")[0].state_dict()
    assert torch.equal(loaded["audio_encoder.blocks.7.mlp.fc1.weight"], hf_state["encoder.blocks.7.mlp.fc1.weight"])
    assert torch.equal(loaded["audio_encoder.init_bn.running_mean"], hf_state["encoder.init_bn.running_mean"])
    assert torch.equal(loaded["audio_encoder.freq_pos_embed"], hf_state["encoder.freq_pos_embed"])
    model, _, mapping, _ = weights.convert(str(path), "ced-hf", base=str(ced_base))
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
        weights.convert_to_checkpoint(str(path), "ced", ced_base, base=str(ced_base))
    with pytest.raises(UsageError, match="unknown --kind"):
        weights.convert(str(path), "caffe2")
    with pytest.raises(CheckpointError, match="keys of no known layout"):  # a Zenodo CED file given as ced-hf
        weights.convert(str(path), "ced-hf", base=str(ced_base))
    result = runner.invoke(cli.app, ["convert", str(tmp_path / "absent.pkl"), "--kind", "detectron2", "--out",
                                     str(tmp_path / "o")])
    assert result.exit_code == 1 and "absent.pkl: no such file" in one_line(result.output)


# ------------------------------------------------------------------------------------------ restricted readers
def test_numpy_pickles_are_read_with_scalars_and_old_protocols(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5), "c": np.arange(3)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": arrays}, protocol=protocol))
        state = weights.read_state_dict_file(path)
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
        weights.read_state_dict_file(path)
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
        weights.read_state_dict_file(path)
    path = tmp_path / "strings.pth"
    torch.save({"model": {"w": "text"}}, path)
    with pytest.raises(CheckpointError, match="'w' is a str, not a tensor"):
        weights.read_state_dict_file(path)


# ------------------------------------------------------------------------------------------- av2ts info --model
def test_info_model_counts_parts_of_a_preset_and_a_checkpoint(tiny_model, tiny_checkpoint):
    model, _ = tiny_model
    result = runner.invoke(cli.app, ["info", "--model", str(tiny_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["preset"], report["subset"], report["num_classes"]) == ("av2ts-tiny", "s4", 2)
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == list(dict.fromkeys(weights.PARTS.values()))  # no "other": every module has a part
    total = sum(p.numel() for p in model.parameters())
    assert report["total"]["parameters"] == total == sum(p["parameters"] for p in parts.values())
    for part in parts.values():
        assert part["parameters"] == part["trainable"] + part["frozen"] > 0
    audio = sum(p.numel() for p in model.audio_encoder.parameters())
    assert parts["audio encoder (CED)"] == {"part": "audio encoder (CED)", "parameters": audio, "trainable": 0,
                                            "frozen": audio}
    assert report["total"]["frozen"] == audio
    gates = sum(p.numel() for p in model.siam_backbone.parameters()) + sum(
        p.numel() for p in model.siam_gates.parameters())
    assert parts["siam encoder (+ gates)"]["parameters"] == gates

    result = runner.invoke(cli.app, ["info", "--model", "av2ts-tiny"])  # a preset: random init, table output
    assert result.exit_code == 0, result.output
    assert "transformer decoder" in result.output and "total" in result.output
