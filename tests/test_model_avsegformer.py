"""The AVSegFormer network (model/avsegformer.py, model/avsegformer_head.py): presets, shapes through every module,
``segment``, per-frame independence, the AVSS frame flag, gradients, and the parameter counts of the full presets
against the reference's (vvvb-github/AVSegFormer at 7083cb6) minus the modules av2ts does not build."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from av2ts_cli.config import ModelConfig, get_preset
from av2ts_cli.errors import UsageError
from av2ts_cli.model import AVSegFormer, build_model, foreground_probability
from av2ts_cli.model.avsegformer import output_channels
from av2ts_cli.model.avsegformer_head import CrossModalMixer, cell_centres, sine_positions

# The reference's measured totals (parameters, buffers excluded) and the parameters of the modules av2ts does not
# build: head.fpn (1,770,240) + head.attn_fc (331,968, or 334,208 with 71 classes), and the ResNet's layer3_2 +
# layer4_2 (22,063,104). Both are sums over the key layouts avsegformer-keys-*.tsv (checked below when present).
REFERENCE_TOTALS = {
    ("avsegformer-pvt", "s4", "avsegformer-keys-pvt-s4.tsv"): (186_053_504, 2_102_208),
    ("avsegformer-r50", "ms3", "avsegformer-keys-r50-ms3.tsv"): (150_902_528, 24_165_312),
    ("avsegformer-pvt", "avss", "avsegformer-keys-pvt-avss.tsv"): (186_057_984, 2_104_448),
}
UNBUILT = ("head.fpn.", "head.attn_fc.", "backbone.layer3_2.", "backbone.layer4_2.")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
LAYOUT_DIRS = (Path(__file__).parent / "data", Path("/work/shared/spec"))


def layout_rows(name: str) -> list[tuple[str, tuple[int, ...]]] | None:
    """(key, shape) rows of a reference layout file, from tests/data or the spec folder; None if neither has it."""
    for folder in LAYOUT_DIRS:
        if (folder / name).is_file():
            lines = (folder / name).read_text().splitlines()[1:]
            return [(k, tuple(int(x) for x in s.strip("[]").split(",") if x.strip()))
                    for k, _, s, _ in (line.split("\t") for line in lines)]
    return None


def clip(batch: int, frames: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, frames, 3, size, size, generator=g) * 255
    return video, torch.randn(batch, frames, 96, 64, generator=g) - 2


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(get_preset("avsegformer-tiny")).eval()


# --------------------------------------------------------------------------------------------- presets, configs
@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_presets(subset):
    for name, backbone in (("avsegformer-pvt", "pvt_v2_b5"), ("avsegformer-r50", "resnet50")):
        cfg = get_preset(name, subset)
        assert cfg.family == "avsegformer" and cfg.backbone == backbone and not cfg.siam
        avss = subset == "avss"
        assert cfg.input_size == (224 if avss else 512) and cfg.num_frames == (10 if avss else 5)
        assert cfg.num_queries == 300 and cfg.hidden_dim == 256 and cfg.audio_dim == 128
        assert (cfg.encoder_layers, cfg.generator_layers, cfg.decoder_layers) == (6, 6, 6)
        assert (cfg.encoder_ffn_dim, cfg.generator_ffn_dim, cfg.decoder_ffn_dim) == (2048, 1024, 2048)
        assert output_channels(cfg) == (71 if subset == "avss" else 1)
    assert not get_preset("avsegformer-r50").frozen_bn  # the reference trains its BatchNorm
    tiny = get_preset("avsegformer-tiny", subset)
    assert tiny.family == "avsegformer" and tiny.input_size % 32 == 0 and not tiny.siam


def test_no_siam_and_round_trip():
    assert not get_preset("avsegformer-pvt", "s4", siam=True).siam  # the flag does not apply to this family
    with pytest.raises(UsageError, match="Siam"):
        ModelConfig(family="avsegformer", siam=True)
    cfg = get_preset("avsegformer-pvt", "avss")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_build_model_follows_the_family(tiny):
    assert type(tiny) is AVSegFormer
    with pytest.raises(ValueError, match="family"):
        AVSegFormer(get_preset("av2ts-tiny"))


# -------------------------------------------------------------------------------------------------------- shapes
def test_shapes_through_every_module(tiny):
    cfg = tiny.cfg
    c, q, n = cfg.hidden_dim, cfg.num_queries, 6
    seen = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = (inputs, output)
        return hook

    head = tiny.head
    modules = {"backbone": tiny.backbone, "audio_encoder": tiny.audio_encoder, "audio_proj": tiny.audio_proj,
               "in_proj0": head.in_proj[0], "in_proj3": head.in_proj[3], "encoder0": head.encoder[0],
               "encoder_last": head.encoder[-1], "query_generator": head.query_generator,
               "generator0": head.query_generator.layers[0], "decoder_last": head.decoder[-1],
               "lateral_conv": head.lateral_conv, "out_conv": head.out_conv, "mixer": head.mixer,
               "mlp_last": head.mlp[-1], "fc": head.fc, "head": head}
    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    video, audio = clip(2, 3, 64)  # 64 px: maps 16, 8, 4, 2 -> S = 64 + 16 + 4 = 84 encoder tokens
    try:
        with torch.inference_mode():
            out = tiny(video, audio)
    finally:
        for handle in handles:
            handle.remove()
    assert [tuple(f.shape) for f in seen["backbone"][1]] == [(n, 32, 16, 16), (n, 64, 8, 8), (n, 128, 4, 4),
                                                              (n, 256, 2, 2)]
    assert seen["audio_encoder"][0][0].shape == (n, 1, 96, 64) and seen["audio_encoder"][1].shape == (n, 32)
    assert seen["audio_proj"][1].shape == (n, c)
    assert seen["in_proj0"][1].shape == (n, c, 16, 16) and seen["in_proj3"][1].shape == (n, c, 2, 2)
    src, pos, reference_points, spatial_shapes, level_start_index = seen["encoder0"][0]
    assert src.shape == (n, 84, c) and pos.shape == (1, 84, c) and reference_points.shape == (1, 84, 2)
    assert spatial_shapes.tolist() == [[8, 8], [4, 4], [2, 2]] and level_start_index.tolist() == [0, 64, 80]
    assert seen["encoder_last"][1].shape == (n, 84, c)
    assert seen["query_generator"][0][0].shape == (n, 1, c) and seen["query_generator"][1].shape == (n, q, c)
    assert seen["generator0"][1].shape == (n, q, c)
    query, memory = seen["decoder_last"][0]
    assert query.shape == (n, q, c) and memory.shape == (n, 84, c) and seen["decoder_last"][1].shape == (n, q, c)
    assert seen["lateral_conv"][1].shape == (n, c, 16, 16) and seen["out_conv"][1].shape == (n, c, 16, 16)
    assert seen["mixer"][1].shape == (n, c, 16, 16)
    assert seen["mlp_last"][0][0].shape == (n, cfg.mask_mlp_dim, 16, 16) and seen["mlp_last"][1].shape == (n, c, 16, 16)
    assert seen["fc"][0][0].shape == (n, c, 16, 16) and seen["fc"][1].shape == (n, 1, 64, 64)
    assert out["logits"].shape == (n, 1, 64, 64) and out["mask_features"].shape == (n, c, 16, 16)
    assert out["mask_features"] is seen["mixer"][1]


@pytest.mark.parametrize("subset", ["s4", "avss"])
def test_forward_and_segment(subset):
    torch.manual_seed(0)
    cfg = get_preset("avsegformer-tiny", subset)
    model = build_model(cfg).eval()
    video, audio = clip(1, 2, cfg.input_size)
    side, k = cfg.input_size, cfg.num_classes
    with torch.inference_mode():
        logits = model(video, audio)["logits"]
        semseg = model.segment(video, audio, maskiges=video)  # maskiges accepted and unused
    assert logits.shape == (2, output_channels(cfg), side, side)
    assert semseg.shape == (1, 2, k, side, side) and semseg.dtype == torch.float32 and torch.isfinite(semseg).all()
    if k == 2:  # [0, z]: the foreground probability is exactly the reference's sigmoid
        torch.testing.assert_close(foreground_probability(semseg)[0], logits[:, 0].sigmoid())
    else:
        torch.testing.assert_close(semseg[0], logits)


def test_a_frame_depends_on_its_own_frame_and_audio_only(tiny):
    """No module mixes frames: changing frame 1 (image and audio) of clip 0 leaves every other frame's output as it
    was, and one frame alone (B*T = 1, where the reference's mixer fails) gives what it gives in the batch."""
    video, audio = clip(2, 3, 64, seed=1)
    other_video, other_audio = video.clone(), audio.clone()
    other_video[0, 1] = 255 - other_video[0, 1]
    other_audio[0, 1] = other_audio[0, 1].flip(0)
    with torch.inference_mode():
        a = tiny(video, audio)
        b = tiny(other_video, other_audio)
        alone = tiny(video[1:, 2:], audio[1:, 2:])
    keep = [0, 2, 3, 4, 5]
    for key in ("logits", "mask_features"):
        torch.testing.assert_close(a[key][keep], b[key][keep], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a[key][1], b[key][1])
        torch.testing.assert_close(alone[key][0], a[key][5], atol=1e-5, rtol=1e-5)


def test_frame_mask_zeroes_padded_slots(tiny):
    video, audio = clip(1, 3, 64, seed=2)
    with torch.inference_mode():
        plain = tiny(video, audio)
        masked = tiny(video, audio, frame_mask=torch.tensor([[1.0, 1.0, 0.0]]))
        with pytest.raises(ValueError, match="frame_mask"):
            tiny(video, audio, frame_mask=torch.ones(3))
    for key in ("logits", "mask_features"):
        assert (masked[key][2] == 0).all()
        torch.testing.assert_close(masked[key][:2], plain[key][:2])


def test_input_errors(tiny):
    video, audio = clip(1, 2, 64)
    with pytest.raises(ValueError, match="audio"):
        tiny(video, audio.transpose(-1, -2))
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(video[..., :48, :48], audio)


def test_gradients_reach_every_trainable_parameter_and_never_vggish():
    """The forward uses every module built (no fpn / attn_fc left idle): after two optimiser steps every trainable
    tensor has a gradient; VGGish is frozen and runs without autograd; freeze_backbone switches the backbone off."""
    torch.manual_seed(0)
    model = build_model(get_preset("avsegformer-tiny")).train()
    grad_in_vggish = []
    model.audio_encoder.register_forward_hook(lambda *_: grad_in_vggish.append(torch.is_grad_enabled()))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("audio_encoder.") for n, _ in trainable)
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
    video, audio = clip(2, 2, 64)
    for _ in range(2):
        optimiser.zero_grad()
        out = model(video, audio)
        loss = out["logits"].sigmoid().mean() + out["mask_features"].mean(1).sigmoid().mean()
        loss.backward()
        optimiser.step()
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    assert grad_in_vggish == [False, False]
    model.freeze_backbone()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.backbone.parameters())


# -------------------------------------------------------------------------------------------------- components
def test_sine_positions_and_cell_centres():
    """Unnormalised DETR encoding: channel k of the y half at row i is sin/cos((i + 1) / 10000^(2*(k//2)/(d/2)))."""
    pos = sine_positions(3, 4, 16)
    assert pos.shape == (12, 16)
    i, j = 2, 1
    token = pos[i * 4 + j]
    for k in range(8):
        f = 10000 ** (2 * (k // 2) / 8)
        trig = math.sin if k % 2 == 0 else math.cos
        assert token[k].item() == pytest.approx(trig((i + 1) / f), abs=1e-6)
        assert token[8 + k].item() == pytest.approx(trig((j + 1) / f), abs=1e-6)
    centres = cell_centres(2, 4)
    assert centres[5].tolist() == pytest.approx([1.5 / 4, 1.5 / 2])


def test_mixer_is_an_audio_to_pixel_channel_gate():
    torch.manual_seed(0)
    mixer = CrossModalMixer(32, 4)
    feature_map, audio = torch.randn(1, 32, 3, 5), torch.randn(1, 1, 32)  # one frame works
    out = mixer(feature_map, audio)
    x = feature_map.flatten(2).transpose(1, 2)[0]  # [HW, C]
    q = (audio[0] @ mixer.q_proj.weight.T).view(4, 8)
    kv = x @ mixer.kv_proj.weight.T
    k, v = kv[:, :32].view(15, 4, 8), kv[:, 32:].view(15, 4, 8)
    attn = torch.einsum("hd,nhd->hn", q, k).div(math.sqrt(8)).softmax(-1)
    gate = torch.sigmoid(mixer.proj(torch.einsum("hn,nhd->hd", attn, v).reshape(32)))
    torch.testing.assert_close(out, feature_map * gate.view(1, 32, 1, 1))


# ------------------------------------------------------------------------------------------- reference counts
@pytest.mark.parametrize("preset, subset, tsv", list(REFERENCE_TOTALS))
def test_parameters_equal_the_reference_minus_the_modules_not_built(preset, subset, tsv):
    total, unbuilt = REFERENCE_TOTALS[preset, subset, tsv]
    with torch.device("meta"):  # full size, no memory; drop path has no tensors (and a meta build cannot set it)
        model = build_model(dataclasses.replace(get_preset(preset, subset), drop_path_rate=0.0))
    assert sum(p.numel() for p in model.parameters()) == total - unbuilt
    assert sum(model.reference_only_parameters().values()) == unbuilt  # what `av2ts info --model` adds back
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    rows = layout_rows(tsv)
    if rows is None:
        pytest.skip(f"{tsv} is not in tests/data or the spec folder: the totals above were taken from it")
    params = [(k, s) for k, s in rows if not k.endswith(BUFFERS)]
    assert sum(math.prod(s) for _, s in params) == total
    assert sum(math.prod(s) for k, s in params if k.startswith(UNBUILT)) == unbuilt
