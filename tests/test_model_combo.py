"""The COMBO network (model/combo.py): the query-audio arithmetic, shapes, presets, parameter counts and tensor
shapes against the reference's layouts (tests/data/combo-keys-*.tsv), gradients."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from _combo_keys import combo_rows

from av2ts_cli.config import ModelConfig, get_preset
from av2ts_cli.model import AV2TS, COMBO, build_model
from av2ts_cli.model.combo import audio_for_queries, query_audio_frames

REFERENCE_PARTS = {
    "backbone": ("backbone.",),
    "siam_backbone": ("pre_sam_backbone.",),
    "siam_gates": ("scale_factor_module.",),
    "audio_encoder": ("audio_backbone.",),
    "pixel_decoder": ("sem_seg_head.pixel_decoder.",),
    "fusion": ("sem_seg_head.fusion_module.", "sem_seg_head.audio_transformation."),
    "decoder": ("sem_seg_head.predictor.",),
}


def reference_parameters(tsv: str) -> dict[str, list[tuple[int, ...]]]:
    """Per part, the shapes of the reference's parameters (FrozenBN tensors and criterion.empty_weight are buffers)."""
    rows = combo_rows(tsv)
    with_stats = {key.rsplit(".", 1)[0] for key, _ in rows if key.endswith(".running_mean")}
    parts = defaultdict(list)
    for key, shape in rows:
        if key.rsplit(".", 1)[0] in with_stats or key.startswith("criterion."):
            continue
        part = next(p for p, prefixes in REFERENCE_PARTS.items() if key.startswith(prefixes))
        parts[part].append(shape)
    return parts


def clip(batch: int, frames: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, frames, 3, size, size, generator=g) * 255,
            torch.randn(batch, frames, 96, 64, generator=g) - 2.0,
            torch.rand(batch, frames, 3, size, size, generator=g) * 255)


# ------------------------------------------------------------------------------------------ query-audio arithmetic
def test_query_audio_frames_hand_checked():
    """T = 3 frames, Q = 4 queries: entry (t, q) is (q * 3 + t) // 4."""
    assert query_audio_frames(3, 4).tolist() == [[0, 0, 1, 2],
                                                [0, 1, 1, 2],
                                                [0, 1, 2, 2]]


@pytest.mark.parametrize("frames, block", [(5, 20), (10, 10)])
def test_reference_configurations_give_blocks_of_queries(frames, block):
    """S4/MS3 (5 frames, 100 queries): query q of every frame carries frame q // 20's audio; AVSS (10): q // 10."""
    source = query_audio_frames(frames, 100)
    assert source.shape == (frames, 100)
    assert (source == (torch.arange(100) // block)[None, :]).all()


def test_one_clip_equals_the_reference_reshape():
    """For one clip, the reference's literal expression: audio [T, 1, C] .repeat(1, Q, 1).reshape(Q, T, C), read as
    the decoder's query-major [Q, T, C] layout (we are batch-first, hence the final transpose)."""
    t, q, c = 5, 100, 7
    audio = torch.randn(t, 1, c)
    reference = audio.repeat(1, q, 1).reshape(q, -1, c).transpose(0, 1)
    assert torch.equal(audio_for_queries(audio.reshape(1, t, c), q), reference)


def test_batched_clips_use_their_own_audio():
    """The per-clip rule for batches: clip 1's queries equal those of clip 1 alone (the reference's whole-batch
    reshape would give it clip 0's sounds)."""
    audio = torch.randn(2, 5, 3)
    both = audio_for_queries(audio, 100)
    assert both.shape == (10, 100, 3)
    assert torch.equal(both[5:], audio_for_queries(audio[1:], 100))
    whole_batch = audio.reshape(10, 1, 3).repeat(1, 100, 1).reshape(100, 10, 3).transpose(0, 1)
    assert not torch.equal(both, whole_batch)


# --------------------------------------------------------------------------------------------- presets, configs
def test_presets_and_family():
    for subset in ("s4", "ms3", "avss"):
        for name in ("combo-r50", "combo-pvt"):
            cfg = get_preset(name, subset)
            assert cfg.family == "combo" and cfg.siam and cfg.num_queries == 100 and cfg.decoder_layers == 9
            assert cfg.audio_dim == 128 and cfg.vggish_widths == (64, 128, 256, 256, 512, 512)
            assert cfg.num_classes == (71 if subset == "avss" else 2)
    assert get_preset("combo-pvt").backbone == "pvt_v2_b5" and get_preset("combo-r50").backbone == "resnet50"
    tiny = get_preset("combo-tiny")
    assert tiny.family == "combo" and not tiny.siam and tiny.num_frames == 5 and tiny.input_size % 32 == 0
    assert get_preset("av2ts-r50").family == "av2ts" and get_preset("av2ts-r50").num_queries == 96


def test_config_round_trip_and_old_configs():
    cfg = get_preset("combo-tiny", "avss", siam=True)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = get_preset("av2ts-tiny").to_dict()
    del old["family"], old["vggish_widths"], old["object_queries"]  # written before COMBO existed
    assert ModelConfig.from_dict(old).family == "av2ts"
    with pytest.raises(Exception, match="family"):
        ModelConfig(family="mask2former")


def test_build_model_follows_the_family():
    assert type(build_model(get_preset("combo-tiny"))) is COMBO
    assert type(build_model(get_preset("av2ts-tiny"))) is AV2TS
    with pytest.raises(ValueError, match="family"):
        COMBO(get_preset("av2ts-tiny"))


# -------------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("subset, frames, siam", [("s4", 5, False), ("avss", 10, True)])
def test_tiny_forward_and_segment_shapes(subset, frames, siam):
    torch.manual_seed(0)
    cfg = get_preset("combo-tiny", subset, siam=siam)
    model = build_model(cfg).eval()
    video, audio, maskiges = clip(1, frames, cfg.input_size)
    side, k, q = cfg.input_size, cfg.num_classes, cfg.num_queries
    with torch.inference_mode():
        out = model(video, audio, maskiges if siam else None)
        semseg = model.segment(video, audio, maskiges if siam else None)
    assert out["pred_logits"].shape == (frames, q, k + 1)
    assert out["pred_masks"].shape == (frames, q, side // 4, side // 4)
    assert len(out["aux_outputs"]) == cfg.decoder_layers and len(out["middle_masks"]) == cfg.decoder_layers
    assert all(m.shape == (frames, q, (side // 4) ** 2) for m in out["middle_masks"])
    assert semseg.shape == (1, frames, k, side, side) and torch.isfinite(semseg).all()
    assert semseg.min() >= 0 and semseg.max() <= q


def test_inner_shapes():
    """Through every part: VGGish [B*T, 32], pixel decoder (stride 4 + 3 memory levels), fusion, query audio."""
    cfg = get_preset("combo-tiny")
    model = build_model(cfg).eval()
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs, output)  # returns None: the output is left as it is
        return hook

    for name in ("audio_encoder", "pixel_decoder", "fusion", "decoder"):
        getattr(model, name).register_forward_hook(keep(name))
    video, audio, _ = clip(2, 3, 64)
    with torch.inference_mode():
        model(video, audio)
    assert seen["audio_encoder"][0][0].shape == (6, 1, 96, 64) and seen["audio_encoder"][1].shape == (6, 32)
    mask_features, memories = seen["pixel_decoder"][1]
    assert mask_features.shape == (6, 64, 16, 16)
    assert [tuple(m.shape) for m in memories] == [(6, 64, 2, 2), (6, 64, 4, 4), (6, 64, 8, 8)]
    fused_visual, fused_audio = seen["fusion"][1]
    assert fused_visual.shape == (6, 64, 16, 16) and fused_audio.shape == (6, 1, 64)
    memories_in, queries_audio, per_pixel = seen["decoder"][0]
    assert len(memories_in) == 3 and queries_audio.shape == (6, 16, 64) and per_pixel is fused_visual


def test_input_errors():
    model = build_model(get_preset("combo-tiny", siam=True))
    video, audio, maskiges = clip(1, 2, 64)
    with pytest.raises(Exception, match="maskiges"):
        model(video, audio)
    with pytest.raises(Exception, match="audio"):
        model(video, audio.transpose(-1, -2), maskiges)


def test_clips_in_a_batch_do_not_mix():
    torch.manual_seed(0)
    model = build_model(get_preset("combo-tiny", siam=True)).eval()
    video, audio, maskiges = clip(2, 5, 64)
    with torch.inference_mode():
        both = model(video, audio, maskiges)["pred_masks"]
        second = model(video[1:], audio[1:], maskiges[1:])["pred_masks"]
    torch.testing.assert_close(both[5:], second, atol=1e-4, rtol=1e-4)


def test_audio_changes_the_prediction():
    torch.manual_seed(0)
    model = build_model(get_preset("combo-tiny")).eval()
    with torch.no_grad():
        model.fusion.gamma_visual.fill_(1.0)  # at init (1e-4) the audio's effect on the map is tiny
    video, audio, _ = clip(1, 5, 64)
    with torch.inference_mode():
        a = model(video, audio)["pred_masks"]
        b = model(video, audio.flip(1))["pred_masks"]
    assert not torch.allclose(a, b)


def test_gradients_reach_every_trainable_parameter_and_never_vggish():
    """COMBO's forward uses every module it builds: after two optimiser steps (at init, timm's zero-initialised
    last BatchNorm of each residual branch and the deformable attention's zero projections close some paths)
    every trainable tensor has a non-zero gradient; VGGish is frozen and runs without autograd."""
    torch.manual_seed(0)
    model = build_model(get_preset("combo-tiny", siam=True)).train()
    grad_in_vggish = []
    model.audio_encoder.register_forward_hook(lambda *_: grad_in_vggish.append(torch.is_grad_enabled()))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("audio_encoder.") for n, _ in trainable)
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
    video, audio, maskiges = clip(2, 3, 64)
    for _ in range(2):
        optimiser.zero_grad()
        out = model(video, audio, maskiges)
        loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
        loss = loss + sum(a["pred_masks"].sigmoid().mean() + a["pred_logits"].softmax(-1)[..., 0].mean()
                          for a in out["aux_outputs"])
        loss.backward()
        optimiser.step()
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert grad_in_vggish == [False, False]


# ------------------------------------------------------------------------------------------- reference counts
def _check_against_reference(model, tsv: str, total: int, trainable: int | None = None) -> None:
    assert sum(p.numel() for p in model.parameters()) == total
    if trainable is not None:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    reference = reference_parameters(tsv)
    ours = defaultdict(list)
    for name, p in model.named_parameters():
        ours[name.split(".")[0]].append(tuple(p.shape))
    assert set(ours) == set(reference)
    for part in reference:  # one tensor of ours for one of theirs, same shapes (the converter is a rename table)
        assert sorted(ours[part]) == sorted(reference[part]), part
    assert sum(math.prod(s) for shapes in reference.values() for s in shapes) == total


def test_r50_s4_parameters_equal_the_reference():
    _check_against_reference(build_model(get_preset("combo-r50", "s4")), "combo-keys-r50-s4.tsv",
                             158_903_091, 86_761_907)


def test_r50_avss_parameters_equal_the_reference():
    _check_against_reference(build_model(get_preset("combo-r50", "avss")), "combo-keys-r50-avss.tsv", 158_920_824)


@pytest.mark.slow
def test_pvt_s4_parameters_equal_the_reference():
    _check_against_reference(build_model(get_preset("combo-pvt", "s4")), "combo-keys-pvt-s4.tsv",
                             273_507_203, 201_366_019)
