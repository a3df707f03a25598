"""Checkpoints: save/load, hf:// references, the registry and ``av2ts info --model``.

The converters and the restricted readers of upstream files are tested in test_convert.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _hub import cached_hub_env, run_json_script, write_cached_repo
from conftest import ced_hf_names, one_line, tiny_cfg
from safetensors import safe_open
from typer.testing import CliRunner

from av2ts_cli import __version__, cli
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.model import build_model
from av2ts_cli.weights import checkpoint, hub, registry, resolve, upstream

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


# --------------------------------------------------------------------------------------------------- helpers
def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    model, cfg = tiny_model
    return checkpoint.save_checkpoint(model, cfg, tmp_path_factory.mktemp("ckpt") / "tiny",
                                   meta={"trained_on": "nothing (random init)"})


# ------------------------------------------------------------------------------------------ save / load round trip
def test_save_load_round_trip_is_exact(tiny_model, tiny_checkpoint):
    model, cfg = tiny_model
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    loaded, loaded_cfg = resolve.resolve_model(tiny_checkpoint)[:2]
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
    folder = checkpoint.save_checkpoint(model, cfg, tmp_path / "last")
    (folder / "trainer.pt").write_bytes(b"optimizer state")
    other = build_model(cfg)
    checkpoint.save_checkpoint(other, cfg, folder)
    assert (folder / "trainer.pt").read_bytes() == b"optimizer state"
    assert_same_tensors(resolve.resolve_model(folder)[0].state_dict(), other.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folders left


def test_failed_save_leaves_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    model, cfg = tiny_model
    folder = checkpoint.save_checkpoint(model, cfg, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(build_model(cfg), cfg, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_a_file_and_bad_class_names(tiny_model, tmp_path):
    model, cfg = tiny_model
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        checkpoint.save_checkpoint(model, cfg, tmp_path / "file")
    with pytest.raises(UsageError, match="3 class names"):
        checkpoint.save_checkpoint(model, cfg, tmp_path / "c", meta={"classes": ["a", "b", "c"]})


# ----------------------------------------------------------------------------------------- resolve_model sources
def test_load_model_from_a_weights_file_and_a_registry_name(tiny_model, tiny_checkpoint, monkeypatch):
    model, _ = tiny_model
    loaded, _ = resolve.resolve_model(str(tiny_checkpoint / "model.safetensors"))[:2]
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    monkeypatch.setitem(registry.REGISTRY, "my-model", registry.RegistryEntry(str(tiny_checkpoint), "test model"))
    loaded, _ = resolve.resolve_model("my-model")[:2]
    assert_same_tensors(model.state_dict(), loaded.state_dict())


def test_demo_name_resolves_to_the_bundled_folder():
    assert registry.REGISTRY["demo"].source == str(registry.DEMO_MODEL_DIR)
    assert registry.DEMO_MODEL_DIR.parts[-2:] == ("assets", "demo-model")
    if (registry.DEMO_MODEL_DIR / "config.json").is_file():
        assert resolve.resolve_checkpoint("demo").weights == registry.DEMO_MODEL_DIR / "model.safetensors"
    else:
        with pytest.raises(CheckpointError, match="demo-model"):
            resolve.resolve_checkpoint("demo")


@pytest.mark.parametrize(("name", "text"), [
    ("ced-mini", "av2ts convert hf://mispeech/ced-mini --kind ced-hf"),
    ("av2ts-r50", "is a preset"),
    ("no-such-model", "not a known model name"),
])
def test_names_without_weights_give_one_clear_error(name, text):
    with pytest.raises(CheckpointError, match=text):
        resolve.resolve_checkpoint(name)


def test_preset_gives_random_init_only_when_asked():
    model, cfg = resolve.resolve_model("av2ts-tiny", presets=True)[:2]
    assert cfg.preset == "av2ts-tiny" and not model.training


def test_incomplete_folders_and_foreign_configs_are_refused(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        resolve.resolve_checkpoint(empty)
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no config.json beside"):
        resolve.resolve_checkpoint(alone)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"")
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(CheckpointError, match="not an av2ts checkpoint config"):
        resolve.resolve_model(foreign)
    doc = json.loads((tiny_checkpoint / "config.json").read_text())
    doc["model"]["hidden_width"] = 3
    (foreign / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="config.json: invalid model configuration: .*hidden_width"):
        resolve.resolve_model(foreign)


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
HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from typer.testing import CliRunner
    from av2ts_cli import cli
    from av2ts_cli.weights import convert, resolve
    from av2ts_cli.errors import CheckpointError
    out = {}
    for ref in json.loads(sys.argv[1]):
        try:
            model, _ = resolve.resolve_model(ref)[:2]
            out[ref] = {"query_feat_sum": float(model.state_dict()["decoder.query_feat.weight"].double().sum())}
        except CheckpointError as err:
            out[ref] = {"error": err.message}
    result = CliRunner().invoke(cli.app, ["info", "--model", "hf://own/absent"])
    out["cli"] = {"exit_code": result.exit_code, "output": result.output}
    model, _, mapping, _ = convert.convert("ced-mini", "ced-hf", base=sys.argv[2])  # hf://mispeech/ced-mini
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
        checkpoints[name] = checkpoint.save_checkpoint(model, cfg, tmp_path / "src" / name)
        sums[name] = float(model.state_dict()["decoder.query_feat.weight"].double().sum())
    old, new = "a" * 40, "b" * 40
    files = lambda name, sub="": {f"{sub}{f}": checkpoints[name] / f for f in ("config.json", "model.safetensors")}  # noqa: E731
    cache = tmp_path / "hub"
    write_cached_repo(cache, "own/rep", {old: {**files("v1"), **files("v1-sub", "sub/")}, new: files("main")},
                       {"main": new, "v1": old})
    save_file(ced_hf_names(ced_state), str(tmp_path / "ced.safetensors"))
    write_cached_repo(cache, "mispeech/ced-mini", {"c" * 40: {"model.safetensors": tmp_path / "ced.safetensors"}},
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
              "from av2ts_cli.errors import CheckpointError\nfrom av2ts_cli.weights import resolve\n"
              "try:\n    resolve.resolve_checkpoint('hf://own/rep@v3')\n"
              "except CheckpointError as err:\n    print(err.message)\n")
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
    ref = hub.parse_hub_ref("hf://own/rep@v1.2/a/b")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("own/rep", "v1.2", "a/b")
    assert hub.parse_hub_ref("hf://own/rep").label == "hf://own/rep"
    with pytest.raises(UsageError, match="hf://owner/repo"):
        hub.parse_hub_ref("hf://only-owner")


# ------------------------------------------------------------------------------------------- av2ts info --model
def test_info_model_counts_parts_of_a_preset_and_a_checkpoint(tiny_model, tiny_checkpoint):
    model, _ = tiny_model
    result = runner.invoke(cli.app, ["info", "--model", str(tiny_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["preset"], report["subset"], report["num_classes"]) == ("av2ts-tiny", "s4", 2)
    parts = {p["part"]: p for p in report["parts"]}
    assert list(parts) == list(dict.fromkeys(checkpoint.PARTS.values()))  # no "other": every module has a part
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


# ------------------------------------------------------------------------------------------- resolve_model (--model)
def test_resolve_model_builds_a_preset_only_when_presets_are_allowed():
    model, cfg, doc = resolve.resolve_model("av2ts-tiny", subset="avss", presets=True)
    assert (cfg.preset, cfg.subset, cfg.num_classes) == ("av2ts-tiny", "avss", 71) and not model.training
    assert doc["format"] == "av2ts-checkpoint" and doc["model"] == cfg.to_dict() and len(doc["classes"]) == 71
    with pytest.raises(UsageError, match="av2ts-tiny: is a preset .*not a checkpoint"):
        resolve.resolve_model("av2ts-tiny")


def test_resolve_model_loads_a_checkpoint_folder_and_sets_a_compatible_subset(tiny_model, tiny_checkpoint):
    model, cfg = tiny_model
    loaded, loaded_cfg, doc = resolve.resolve_model(tiny_checkpoint, presets=True)
    assert loaded_cfg.to_dict() == cfg.to_dict() and doc["trained_on"] == "nothing (random init)"
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    _, ms3_cfg, _ = resolve.resolve_model(str(tiny_checkpoint), subset="ms3")  # s4 and ms3 share the binary output
    assert ms3_cfg.subset == "ms3" and ms3_cfg.num_classes == 2


def test_resolve_model_refuses_a_subset_the_checkpoint_does_not_fit(tiny_checkpoint):
    with pytest.raises(UsageError, match=f"^{tiny_checkpoint} is a s4 model; --subset is avss$"):
        resolve.resolve_model(tiny_checkpoint, subset="avss")


@pytest.mark.parametrize("presets", [True, False])
def test_resolve_model_names_the_accepted_forms_for_an_unknown_name(presets):
    with pytest.raises(UsageError) as caught:
        resolve.resolve_model("no-such-model", presets=presets)
    message = caught.value.message
    assert message.startswith("--model no-such-model: no such file or folder")
    assert "hf://owner/repo" in message and "demo" in message and ".safetensors" in message
    assert ("av2ts-tiny" in message) == presets  # presets are named only where they are accepted


# ------------------------------------------------------------------------ registry models converted on use (COMBO)
COMBO_REPO = "YannQi/COMBO-AVS-checkpoints"
R50_FILE = "checkpoints/avs_s4/COMBO_R50_bs8_90k/model_best.pth"


def test_the_combo_registry_entries_carry_the_published_table():
    """combo-r50-s4 / combo-pvt-s4: the authors' hub repository, their S4 scores and licence (convert_combo's table)."""
    from av2ts_cli.weights.registry import COMBO_HUB_REPO, COMBO_LICENCE, COMBO_PUBLISHED

    for name in ("combo-r50-s4", "combo-pvt-s4"):
        entry = registry.REGISTRY[name]
        preset, subset, j, f, trained = COMBO_PUBLISHED[name]
        assert trained and entry.converted_on_use and entry.convert_kind == "combo"
        assert hub.parse_hub_ref(entry.source).repo_id == COMBO_HUB_REPO
        assert entry.published == {"subset": subset, "J": j, "F": f} and entry.licence == COMBO_LICENCE


def test_pick_hub_file_takes_the_one_pth_of_the_model_folder():
    entry = registry.REGISTRY["combo-r50-s4"]
    files = ["README.md", R50_FILE, "checkpoints/avs_s4/COMBO_PVT_bs8_90k/model_best.pth",
             "checkpoints/avs_s4/COMBO_R50_bs8_90k/log.txt", "pretrained/detectron2/R-50.pkl",
             "checkpoints/avs_ms3/COMBO_R50_bs8_20k/model_best.pth"]
    assert upstream.pick_hub_file(files, entry, "x") == R50_FILE
    single = "checkpoints/avs_s4/combo_r50.pth"
    assert upstream.pick_hub_file([single], entry, "x") == single
    with pytest.raises(CheckpointError, match=r"2 candidates .*COMBO_R50_bs8_90k/model_0004999.pth.*expected one"):
        upstream.pick_hub_file([R50_FILE, "checkpoints/avs_s4/COMBO_R50_bs8_90k/model_0004999.pth"], entry, "x")
    with pytest.raises(CheckpointError, match=r"no a .pth file in a R50 model folder.*COMBO_PVT_bs8_90k"):
        upstream.pick_hub_file(files[2:3], entry, "x")
    with pytest.raises(CheckpointError, match="no .pth file under checkpoints/avs_s4/"):
        upstream.pick_hub_file(["README.md"], entry, "x")
    assert upstream.pick_hub_file(["checkpoints/avs_s4/COMBO_R500/a.pth", R50_FILE], entry, "x") == R50_FILE  # words
    pvt = "checkpoints/avs_s4/COMBO_PVTV2B5_bs8_80k/model_best.pth"  # the name the COMBO code's OUTPUT_DIR gives
    assert upstream.pick_hub_file([R50_FILE, pvt], registry.REGISTRY["combo-pvt-s4"], "x") == pvt


COMBO_SCRIPT = textwrap.dedent("""
    import json, sys, time
    time.sleep = lambda seconds: None  # huggingface_hub retries with back-off against the unreachable endpoint
    from av2ts_cli.weights import resolve, upstream
    started = time.perf_counter()
    model, cfg, doc = resolve.resolve_model("combo-r50-s4", subset="s4")
    seconds = time.perf_counter() - started
    again = upstream.prepare_registry_checkpoint("combo-r50-s4")
    state = model.state_dict()
    print(json.dumps({"preset": cfg.preset, "family": cfg.family, "siam": cfg.siam, "seconds": seconds,
                      "again_converted": again.converted, "folder": str(again.folder), "sha256": again.sha256,
                      "source_path": again.source_path, "registry": doc["meta"].get("registry"),
                      "trained_on": doc["trained_on"],
                      "gamma": float(state["fusion.gamma_visual"].double().sum()),
                      "vggish": float(state["audio_encoder.features.0.weight"].double().sum())}))
""")


@pytest.mark.slow
def test_combo_registry_model_is_listed_picked_converted_once_and_used_offline(tmp_path):
    """combo-r50-s4 against a Hugging Face cache built here (the Hub out of reach, then HF_HUB_OFFLINE=1): the
    listing falls back to the cached snapshot, the R50 model folder's .pth is picked, downloaded from the cache and
    converted once (a detectron2 Checkpointer file in the combo-keys-r50-s4 layout, random tensors) into av2ts's
    cache under the file's sha256; the second process loads that checkpoint offline without converting."""
    import hashlib

    from _combo_keys import random_combo_state

    state = random_combo_state("combo-keys-r50-s4.tsv", seed=3)
    source = tmp_path / "model_best.pth"
    torch.save({"model": state, "trainer": {"iteration": 9}, "iteration": 9}, source)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    readme = tmp_path / "README.md"
    readme.write_text("COMBO checkpoints")
    cache = tmp_path / "hub"
    commit = "d" * 40
    write_cached_repo(cache, COMBO_REPO, {commit: {R50_FILE: source, "README.md": readme}}, {"main": commit})
    source.unlink()  # only the cache holds it now
    av2ts_cache = tmp_path / "av2ts-cache"
    env = cached_hub_env(tmp_path, cache)

    def run(**extra):
        return run_json_script(COMBO_SCRIPT, {**env, **extra}, REPO)

    first = run()
    folder = Path(first["folder"])
    assert folder.parent == av2ts_cache / "converted" and folder.name == f"combo-{sha256[:32]}"
    assert (first["preset"], first["family"], first["siam"]) == ("combo-r50", "combo", True)
    assert first["sha256"] == sha256 and first["source_path"] == R50_FILE and not first["again_converted"]
    assert first["registry"]["source"] == f"hf://{COMBO_REPO}@main/{R50_FILE}"
    assert first["registry"]["licence"] == "apache-2.0" and "trainer" in first["registry"]["unused_source_entries"]
    assert first["trained_on"]["published"] == {"J": 81.7, "F": 90.1}
    assert first["gamma"] == float(state["sem_seg_head.fusion_module.b_attn.gamma_v_list.0"].double().sum())
    assert first["vggish"] == float(state["audio_backbone.features.0.weight"].double().sum())
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert set(stamps) == {"config.json", "model.safetensors"}  # no temp or lock left inside

    second = run(HF_HUB_OFFLINE="1")
    assert {k: second[k] for k in ("gamma", "vggish", "folder", "sha256")} == \
        {k: first[k] for k in ("gamma", "vggish", "folder", "sha256")}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # loaded, not converted again


# ------------------------------------------------------------------------------------------- non-finite output
def test_check_finite_output_names_the_model_and_the_cause(tiny_model):
    model, _ = tiny_model
    resolve.check_finite_output(torch.rand(1, 5, 2, 8, 8), model, "m")  # finite: nothing to say
    nan_map = torch.rand(1, 5, 2, 8, 8)
    nan_map[0, 3, 1, 2, 2] = float("nan")
    with pytest.raises(CheckpointError) as caught:
        resolve.check_finite_output(nan_map, model, "my-model", " at t = 3.0 s")
    assert caught.value.message == ("my-model: the network's output is NaN or infinite at t = 3.0 s; its weights "
                                    "are finite, so the computation overflowed (in fp16 or bf16, fp32 avoids that)")
    broken = build_model(tiny_model[1]).eval()
    with torch.no_grad():
        broken.decoder.query_feat.weight.fill_(float("inf"))
        broken.decoder.class_embed.bias[0] = float("nan")
    inf_map = torch.rand(1, 5, 2, 8, 8)
    inf_map[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(CheckpointError) as caught:
        resolve.check_finite_output(inf_map, broken, "ckpt")
    assert caught.value.message == ("ckpt: the network's output is NaN or infinite; 2 of its weight tensors hold NaN "
                                    "or infinite values (decoder.class_embed.bias, decoder.query_feat.weight): a "
                                    "broken checkpoint")


def test_predict_with_nan_weights_is_an_error_naming_the_model(make_clip, tmp_path):
    """The bundled demo model with one NaN tensor: predict says so (exit 1), instead of writing empty masks."""
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan-model"
    shutil.copytree(registry.DEMO_MODEL_DIR, nan)
    state = load_file(str(nan / "model.safetensors"))
    state["decoder.class_embed.weight"] = torch.full_like(state["decoder.class_embed.weight"], float("nan"))
    save_file(state, str(nan / "model.safetensors"))
    clip = make_clip("nan-clip", duration=1.0)
    cli._state["debug"] = False
    result = runner.invoke(cli.app, ["predict", str(clip), "--model", str(nan), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {nan}: the network's output is NaN or infinite; 1 of its weight tensors hold NaN or "
                      "infinite values (decoder.class_embed.weight): a broken checkpoint"], result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("out/**/*.png"))


# --------------------------------------------------------------------------- Google Drive entries (AVSegFormer)
DRIVE_NAME = "avsegformer-tiny-s4"
DRIVE_ID = "tiny-file-id"


class DriveStandIn:
    """Google Drive, locally: stands in for ``upstream.fetch_from_gdrive`` (the one call of gdown) and copies the
    file the test wrote, or fails as gdown does without a network (requests' ConnectionError over a failed name
    lookup). Everything after it is av2ts's own code."""

    def __init__(self, source: Path):
        self.source, self.calls, self.network = source, [], True

    def __call__(self, file_id: str, out: Path) -> None:
        import socket

        self.calls.append(file_id)
        if not self.network:
            raise ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries exceeded") \
                from socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        shutil.copyfile(self.source, out)


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """A registry entry for an avsegformer-tiny checkpoint in the reference's layout on 'Google Drive' (the stand-in),
    av2ts's cache in tmp_path, online."""
    from _avsegformer_keys import tiny_reference_state
    from huggingface_hub import constants

    source = tmp_path / "S4_best.pth"
    torch.save(tiny_reference_state("s4", seed=2), source)
    entry = registry.RegistryEntry(
        registry.gdrive_page(DRIVE_ID), "avsegformer-tiny, a test entry", convert_kind="avsegformer",
        convert_preset="avsegformer-tiny", convert_subset="s4", gdrive_id=DRIVE_ID,
        published={"subset": "s4", "J": 1.5, "F": 2.5, "protocol": "avsegformer"}, licence="none stated",
        authors="test authors")
    monkeypatch.setitem(registry.REGISTRY, DRIVE_NAME, entry)
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    stand_in = DriveStandIn(source)
    monkeypatch.setattr(upstream, "fetch_from_gdrive", stand_in)
    return stand_in


def test_a_drive_entry_is_fetched_converted_once_and_used_offline(drive, tmp_path, monkeypatch):
    """`av2ts download NAME` fetches the file into av2ts's cache and converts it once, keyed by its sha256; then, with
    HF_HUB_OFFLINE set and the network gone, resolve_model loads the converted checkpoint and nothing is fetched or
    converted again."""
    import hashlib

    from _avsegformer_keys import UNBUILT
    from huggingface_hub import constants

    from av2ts_cli.weights.convert_avsegformer import rename

    cli._state["debug"] = False
    result = runner.invoke(cli.app, ["download", DRIVE_NAME, "--json"])
    assert result.exit_code == 0, result.output
    (fetched,) = json.loads(result.stdout)["downloads"]
    sha256 = hashlib.sha256(drive.source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    folder = cache / "converted" / f"avsegformer-{sha256[:32]}"
    kept = cache / "downloads" / "gdrive" / f"{DRIVE_ID}.pth"
    assert drive.calls == [DRIVE_ID] and fetched["converted"] and fetched["sha256"] == sha256
    assert fetched["path"] == str(folder) and fetched["source_file"] == str(kept)
    assert fetched["source"] == f"https://drive.google.com/file/d/{DRIVE_ID}/view"
    assert kept.read_bytes() == drive.source.read_bytes()
    assert kept.with_name(kept.name + ".sha256").read_text().strip() == sha256
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name, kept.name + ".sha256"]  # no lock, no partial
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert set(stamps) == {"config.json", "model.safetensors"}

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    drive.network = False
    model, cfg, doc = resolve.resolve_model(DRIVE_NAME)
    assert drive.calls == [DRIVE_ID] and (cfg.preset, cfg.subset) == ("avsegformer-tiny", "s4")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # loaded, not converted again
    state = torch.load(drive.source, weights_only=True)
    assert doc["meta"]["registry"] == {"name": DRIVE_NAME, "source": fetched["source"], "sha256": sha256,
                                       "licence": "none stated",
                                       "unused_source_entries": sorted(k for k in state if k.startswith(UNBUILT))}
    assert doc["trained_on"]["published"] == {"J": 1.5, "F": 2.5, "protocol": "avsegformer"}
    loaded = model.state_dict()
    for key, tensor in state.items():
        if not key.startswith(UNBUILT):
            assert torch.equal(loaded[rename(key)[0]], tensor), key
    again = upstream.prepare_registry_checkpoint(DRIVE_NAME)
    assert not again.converted and again.sha256 == sha256 and again.folder == folder and drive.calls == [DRIVE_ID]


def _manual_route(subset: str = "s4") -> str:
    return (f"download https://drive.google.com/file/d/{DRIVE_ID}/view by hand and run: av2ts convert FILE --kind "
            f"avsegformer --subset {subset} --out DIR, then pass --model DIR")


def test_a_drive_entry_offline_or_without_a_network_is_one_line_naming_the_file_id(drive, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cli._state["debug"] = False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(cli.app, ["download", DRIVE_NAME])
    assert result.exit_code == 1 and drive.calls == []
    folder = tmp_path / "cache" / "downloads" / "gdrive"
    assert one_line(result.output) == (
        f"error: {DRIVE_NAME}: Google Drive file {DRIVE_ID} is not in av2ts's cache ({folder}) and HF_HUB_OFFLINE "
        f"is set (offline mode: it needs a network once); or {_manual_route()}")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    drive.network = False
    with pytest.raises(CheckpointError) as info:
        resolve.resolve_model(DRIVE_NAME)
    assert drive.calls == [DRIVE_ID]
    assert info.value.message == (
        f"{DRIVE_NAME}: could not download Google Drive file {DRIVE_ID} (its host name could not be resolved (no "
        f"network, or no DNS)); without a network, {_manual_route()}")
    assert list(folder.iterdir()) == []  # nothing half-fetched is kept


def test_a_drive_download_that_is_a_web_page_is_refused_and_not_kept(drive, tmp_path):
    drive.source.write_text("<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>")
    with pytest.raises(CheckpointError) as info:
        upstream.prepare_registry_checkpoint(DRIVE_NAME)
    assert info.value.message.startswith(f"{DRIVE_NAME}: the download of Google Drive file {DRIVE_ID} is not a "
                                         "checkpoint (a web page, not a checkpoint")
    assert _manual_route() in info.value.message
    assert list((tmp_path / "cache" / "downloads" / "gdrive").iterdir()) == []


def test_the_avsegformer_registry_entries_carry_the_published_table():
    """Six names, each the authors' Google Drive file (spec: avsegformer.md, section 7), its published J and F under
    protocol avsegformer, no licence stated."""
    expected = {"r50-s4": (76.38, 86.7, "1nvIfR-1XZ_BgP8ZSUDuAsGhAwDJRxgC3"),
                "pvt-s4": (83.06, 90.5, "1ZJ55jxoHP1ur-hLBkGcha8sjptE_shfw"),
                "r50-ms3": (53.81, 65.6, "1MRk5gQnUtiWwYDpPfB20fO07SVLhfuIV"),
                "pvt-ms3": (61.33, 73.0, "1iKTxWtehAgCkNVty-4H1zVyAOaNxipHv"),
                "r50-avss": (26.58, 31.5, "1RvL6psDsINuUwd9V1ESgE2Kixh9MXIke"),
                "pvt-avss": (37.31, 42.8, "1P8a2dJSUoW0EqFyxyP8B1-Rnscxnh0YY")}
    for suffix, (j, f, file_id) in expected.items():
        backbone, subset = suffix.split("-")
        entry = registry.REGISTRY[f"avsegformer-{suffix}"]
        assert entry.converted_on_use and entry.gdrive_id == file_id and entry.convert_kind == "avsegformer"
        assert (entry.convert_preset, entry.convert_subset) == (f"avsegformer-{backbone}", subset)
        assert entry.published == {"subset": subset, "J": j, "F": f, "protocol": "avsegformer"}
        assert entry.licence == "none stated" and entry.source == f"https://drive.google.com/file/d/{file_id}/view"
