"""Importing COMBO-AVS files (convert_combo.py): a detectron2 Checkpointer file in the layout of
tests/data/combo-keys-r50-s4.tsv (random tensors) converts into a COMBO checkpoint that loads and segments; unused,
unknown and missing keys are reported; the VGGish release fills the audio encoder."""

from __future__ import annotations

import pytest
import torch
from _combo_keys import combo_rows, random_combo_state

from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.model import COMBO
from av2ts_cli.weights.convert import convert_to_checkpoint
from av2ts_cli.weights.convert_combo import convert_combo_kind, read_combo_checkpoint
from av2ts_cli.weights.resolve import load_checkpoint

TSV = "combo-keys-r50-s4.tsv"


@pytest.fixture(scope="module")
def reference_state():
    return random_combo_state(TSV)


def write_checkpointer_file(path, model_state):
    """What detectron2's Checkpointer writes: the model, the trainer's state (plain values) and the iteration."""
    trainer = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
               "scheduler": {"last_epoch": 7, "base_lrs": [1e-4]}, "iteration": 7}
    torch.save({"model": model_state, "trainer": trainer, "iteration": 7}, path)
    return path


def test_reader_keeps_only_the_model(tmp_path):
    state = {"a.weight": torch.zeros(2)}
    model_state, others = read_combo_checkpoint(write_checkpointer_file(tmp_path / "m.pth", state))
    assert list(model_state) == ["a.weight"]
    assert set(others) == {"trainer", "iteration"} and "not model weights" in others["trainer"]


def test_reader_refuses_non_tensor_model_entries(tmp_path):
    torch.save({"model": {"a.weight": torch.zeros(2), "b": 3}}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="'b'.*not a tensor"):
        read_combo_checkpoint(tmp_path / "m.pth")


def test_an_av2ts_checkpoint_is_pointed_to_kind_reference(tmp_path):
    torch.save({"model": {"time_attn_blocks_1.norm1.weight": torch.zeros(2),
                          "backbone.stem.conv1.weight": torch.zeros(1)}}, tmp_path / "av2ts.pth")
    with pytest.raises(CheckpointError, match="--kind reference"):
        convert_combo_kind(str(tmp_path / "av2ts.pth"), "combo")


def test_cli_routes_the_combo_kinds(tmp_path):
    """`av2ts convert --kind combo` reaches convert_combo (its one-line error names the file and the right kind)."""
    from conftest import invoke_cli

    torch.save({"model": {"time_attn_blocks_1.norm1.weight": torch.zeros(2)}}, tmp_path / "av2ts.pth")
    result = invoke_cli(["convert", str(tmp_path / "av2ts.pth"), "--kind", "combo", "--out", str(tmp_path / "o")],
                        expect=CheckpointError.exit_code)
    assert "av2ts.pth" in result.output and "--kind reference" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_convert_load_and_segment(reference_state, tmp_path):
    source = write_checkpointer_file(tmp_path / "model_best.pth", reference_state)
    report = convert_to_checkpoint(str(source), "combo", tmp_path / "combo-r50-s4")
    assert (report["preset"], report["subset"], report["num_classes"], report["siam"]) == ("combo-r50", "s4", 2, True)
    assert report["source_tensors_used"] == len(reference_state) - 1  # all but criterion.empty_weight
    dropped = " | ".join(report["dropped"])
    assert "no-object weight" in dropped and "trainer state" in dropped and "iteration" in dropped

    model, cfg, doc = load_checkpoint(tmp_path / "combo-r50-s4")
    assert isinstance(model, COMBO) and cfg.family == "combo" and doc["model"]["family"] == "combo"
    assert report["filled_tensors"] == len(model.state_dict())
    ours = model.state_dict()
    for theirs, mine in [("sem_seg_head.fusion_module.b_attn.attn_list.0.v_proj.weight", "fusion.attn.v_proj.weight"),
                         ("sem_seg_head.fusion_module.b_attn.gamma_v_list.0", "fusion.gamma_visual"),
                         ("sem_seg_head.audio_transformation.embeddings.4.weight", "fusion.audio_mlp.layers.4.weight"),
                         ("sem_seg_head.pixel_decoder.input_proj.2.0.weight", "pixel_decoder.input_proj.2.0.weight"),
                         ("sem_seg_head.pixel_decoder.adapter_1.weight", "pixel_decoder.lateral.conv.weight"),
                         ("sem_seg_head.predictor.query_feat.weight", "decoder.query_feat.weight"),
                         ("sem_seg_head.predictor.level_embed.weight", "decoder.level_embed.weight"),
                         ("audio_backbone.embeddings.0.weight", "audio_encoder.embeddings.0.weight"),
                         ("pre_sam_backbone.res5.2.conv3.weight", "siam_backbone.layer4.2.conv3.weight"),
                         ("scale_factor_module.3.fc2.bias", "siam_gates.gates.3.fc2.bias")]:
        assert torch.equal(ours[mine], reference_state[theirs]), mine

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(1, 2, 3, 64, 64, generator=g) * 255
    audio = torch.randn(1, 2, 96, 64, generator=g) - 2
    with torch.inference_mode():
        semseg = model.segment(frames, audio, frames.flip(-1))
    assert semseg.shape == (1, 2, 2, 64, 64) and torch.isfinite(semseg).all()


@pytest.mark.slow
def test_missing_and_unknown_keys_are_reported(reference_state, tmp_path):
    missing = {k: v for k, v in reference_state.items() if k != "sem_seg_head.fusion_module.b_attn.gamma_a"}
    with pytest.raises(CheckpointError, match=r"unfilled \(fusion\.gamma_audio\)"):
        convert_combo_kind(str(write_checkpointer_file(tmp_path / "missing.pth", missing)), "combo")
    unknown = {**reference_state, "sem_seg_head.fusion_module.a2i_attn.proj.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"1 keys of no known layout \(sem_seg_head\.fusion_module\.a2i_attn"):
        convert_combo_kind(str(write_checkpointer_file(tmp_path / "unknown.pth", unknown)), "combo")


@pytest.mark.slow
def test_vggish_release_fills_the_audio_encoder(reference_state, tmp_path):
    release = {k[len("audio_backbone."):]: reference_state[k] for k, _ in combo_rows(TSV)
               if k.startswith("audio_backbone.")}
    torch.save(release, tmp_path / "vggish-10086976.pth")
    model, cfg, mapping, meta = convert_combo_kind(str(tmp_path / "vggish-10086976.pth"), "vggish")
    assert cfg.preset == "combo-r50" and len(mapping.tensors) == len(release) == 18
    assert torch.equal(model.audio_encoder.features[13].weight, release["features.13.weight"])
    assert meta["initialised_from"][-1]["kind"] == "vggish"
    with pytest.raises(UsageError, match="COMBO's audio encoder"):
        convert_combo_kind(str(tmp_path / "vggish-10086976.pth"), "vggish", preset="av2ts-tiny")
