"""The AV2TS network: builds, shapes, parameter counts against the reference checkpoint layout, gradients."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from av2ts_cli import cli
from av2ts_cli.config import get_preset
from av2ts_cli.errors import EXIT_USAGE
from av2ts_cli.model import build_model, class_map, foreground_probability

DATA = Path(__file__).parent / "data"

# Our top-level parts and the reference state-dict prefixes they replace (model/av2ts.py docstring).
REFERENCE_PARTS = {
    "backbone": ("backbone.",),
    "siam_backbone": ("pre_sam_backbone.",),
    "siam_gates": ("scale_factor_module.",),
    "audio_encoder": ("audio_backbone.",),
    "acoustic_attention": ("time_attn_blocks_", "time_norm.", "audio_linear"),
    "visual_attention": ("visual_project.", "time_visual_attn_blocks.", "time_visual_norm."),
    "pixel_decoder": ("sem_seg_head.pixel_decoder.",),
    "fusion": ("sem_seg_head.fusion_module.",),
    "decoder": ("sem_seg_head.predictor.",),
}
# Built by the reference but never used in its forward; deliberately absent from ours.
REFERENCE_UNUSED = ("sem_seg_head.pixel_decoder.input_proj.", "sem_seg_head.pixel_decoder.linear1.",
                    "audio_backbone.outputlayer.")


def reference_parameters(tsv: str) -> dict[str, list[tuple[int, ...]]]:
    """Per part, the shapes of the reference's trainable-or-frozen *parameters*: buffers are left out (the
    entries of every module with running statistics, i.e. detectron2 FrozenBN and CED's frozen init BatchNorm,
    whose four tensors are all buffers, and ``criterion.empty_weight``), and so are the unused modules."""
    rows = [line.rstrip("\n").split("\t") for line in (DATA / tsv).read_text().splitlines()[1:]]
    with_stats = {key.rsplit(".", 1)[0] for key, _, _ in rows if key.endswith(".running_mean")}
    parts = defaultdict(list)
    for key, shape, _ in rows:
        if key.rsplit(".", 1)[0] in with_stats or key.startswith("criterion.") or key.startswith(REFERENCE_UNUSED):
            continue
        part = next((p for p, prefixes in REFERENCE_PARTS.items() if key.startswith(prefixes)), None)
        assert part is not None, f"reference key {key} belongs to no part"
        parts[part].append(tuple(json_shape(shape)))
    return parts


def json_shape(text: str) -> list[int]:
    return [int(x) for x in text.strip("[]").split(",") if x.strip()]


def our_parameters(model) -> dict[str, list[tuple[int, ...]]]:
    parts = defaultdict(list)
    for name, p in model.named_parameters():
        parts[name.split(".")[0]].append(tuple(p.shape))
    return parts


def clip(batch: int, frames: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, frames, 3, size, size, generator=g) * 255,
            torch.randn(batch, frames, 96, 64, generator=g) - 2.0,
            torch.rand(batch, frames, 3, size, size, generator=g) * 255)


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return build_model(get_preset("av2ts-r50", "s4")).eval()


@pytest.fixture(scope="module")
def pvt():
    torch.manual_seed(0)
    return build_model(get_preset("av2ts-pvt", "s4")).eval()


def check_outputs(out: dict, frames: int, classes: int, side: int, layers: int, queries: int = 96):
    assert out["pred_logits"].shape == (frames, queries, classes + 1)
    assert out["pred_masks"].shape == (frames, queries, side // 4, side // 4)
    assert len(out["aux_outputs"]) == layers and len(out["middle_masks"]) == layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    for middle in out["middle_masks"]:
        assert middle.shape == (frames, queries, (side // 4) ** 2)
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("name, tsv", [("r50", "reference-keys-r50-s4.tsv"), ("pvt", "reference-keys-pvt-s4.tsv")])
def test_reference_forward_and_parameters(name, tsv, request):
    model = request.getfixturevalue(name)
    frames, audio, maskiges = clip(1, 5, 224)
    captured = []
    hook = model.decoder.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.inference_mode():
            semseg = model.segment(frames, audio, maskiges)  # runs forward once; the hook keeps its raw outputs
    finally:
        hook.remove()
    check_outputs(captured[0], frames=5, classes=2, side=224, layers=12)
    check_semantic_map(semseg, classes=2)

    reference, ours = reference_parameters(tsv), our_parameters(model)
    assert set(ours) == set(reference)
    for part in reference:
        ref_count, our_count = sum(map(math.prod, reference[part])), sum(map(math.prod, ours[part]))
        assert abs(our_count - ref_count) <= 0.02 * ref_count, (part, our_count, ref_count)
        # stronger: one tensor of ours for one tensor of theirs, same shapes (the converter is a rename table)
        assert sorted(ours[part]) == sorted(reference[part]), part
    # and all of CED is frozen
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())


def test_pvt_stochastic_depth_rises_linearly_over_blocks(pvt):
    from timm.layers import DropPath

    rates = [m.drop_prob for m in pvt.backbone.modules() if isinstance(m, DropPath)]
    assert len(rates) == 2 * (3 + 6 + 40 + 3 - 1)  # two per block, the first block's rate is 0
    assert rates == sorted(rates) and abs(rates[-1] - 0.1) < 1e-6


def test_avss_reference_parameters():
    model = build_model(get_preset("av2ts-r50", "avss"))
    reference, ours = reference_parameters("reference-keys-r50-avss.tsv"), our_parameters(model)
    assert sorted(ours["decoder"]) == sorted(reference["decoder"])
    assert model.decoder.class_embed.weight.shape == (72, 256)


def check_semantic_map(semseg: torch.Tensor, classes: int, queries: int = 96):
    assert semseg.shape == (1, 5, classes, 224, 224)
    assert semseg.min() >= 0 and semseg.max() <= queries  # sum over queries of probability x sigmoid
    prob = foreground_probability(semseg)
    assert prob.shape == (1, 5, 224, 224) and prob.min() >= 0 and prob.max() <= 1
    labels = class_map(semseg)
    assert labels.dtype == torch.int64 and labels.shape == (1, 5, 224, 224)
    assert torch.equal(labels == 1, semseg[:, :, 1] > semseg[:, :, 0])


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
@pytest.mark.parametrize("siam", [False, True])
def test_tiny_builds_per_subset(subset, siam):
    cfg = get_preset("av2ts-tiny", subset, siam=siam)
    model = build_model(cfg)
    assert hasattr(model, "siam_backbone") == siam and hasattr(model, "siam_gates") == siam
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert params * 4 <= 25e6  # the fp32 checkpoint stays under 25 MB, Siam encoder or not


@pytest.mark.parametrize("frames_per_clip", [5, 10])
def test_tiny_forward_shapes(frames_per_clip):
    cfg = get_preset("av2ts-tiny", "avss")
    model = build_model(cfg).eval()
    frames, audio, _ = clip(1, frames_per_clip, cfg.input_size)
    with torch.inference_mode():
        out = model(frames, audio)
    check_outputs(out, frames=frames_per_clip, classes=71, side=cfg.input_size, layers=cfg.decoder_layers)


def test_clips_in_a_batch_do_not_mix():
    """Frame-major reshapes in DSTA: clip 0 alone gives the same result as clip 0 batched with another clip."""
    torch.manual_seed(0)
    model = build_model(get_preset("av2ts-tiny", siam=True)).eval()
    frames, audio, maskiges = clip(2, 4, 96)
    with torch.inference_mode():
        both = model(frames, audio, maskiges)["pred_masks"]
        alone = model(frames[:1], audio[:1], maskiges[:1])["pred_masks"]
    torch.testing.assert_close(both[:4], alone, atol=1e-4, rtol=1e-4)


def test_audio_changes_the_prediction():
    torch.manual_seed(0)
    model = build_model(get_preset("av2ts-tiny")).eval()
    frames, audio, _ = clip(1, 3, 64)
    with torch.inference_mode():
        a = model(frames, audio)["pred_masks"]
        b = model(frames, audio.flip(1))["pred_masks"]  # same sounds, other order in time
    assert not torch.allclose(a, b)


def test_gradients_reach_every_trainable_parameter_and_never_ced():
    """Checked on the second step: at initialisation some paths are closed on purpose (timm's zero-initialised
    last BatchNorm of each residual branch; the zero-initialised offset and weight projections of deformable
    attention make the pixel decoder's level embedding irrelevant), and one optimiser step opens them."""
    torch.manual_seed(0)
    model = build_model(get_preset("av2ts-tiny", siam=True)).train()
    grad_enabled_in_ced = []
    model.audio_encoder.register_forward_hook(lambda *_: grad_enabled_in_ced.append(torch.is_grad_enabled()))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
    frames, audio, maskiges = clip(2, 3, 64)
    for _ in range(2):
        optimiser.zero_grad()
        out = model(frames, audio, maskiges)
        loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
        loss = loss + sum(a["pred_masks"].sigmoid().mean() + a["pred_logits"].softmax(-1)[..., 0].mean()
                          for a in out["aux_outputs"])
        loss.backward()
        optimiser.step()
    assert grad_enabled_in_ced == [False, False]
    assert len(trainable) > 100
    missing = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, missing
    for name, p in model.audio_encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_frozen_bn_keeps_statistics_in_training(r50):
    from av2ts_cli.model.blocks import FrozenBatchNorm2d

    frozen = [m for m in r50.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53  # every BatchNorm of ResNet-50
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in r50.modules())
    tiny = build_model(get_preset("av2ts-tiny"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.backbone.modules())


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(get_preset("av2ts-tiny")).eval()
    frames, audio, _ = clip(1, 3, 64)
    with torch.inference_mode():
        reference = model(frames, audio)["pred_masks"]
        model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(frames, audio)["pred_masks"], reference, atol=1e-4, rtol=1e-4)
        dtypes = []
        model.pixel_decoder.register_forward_hook(lambda m, i, o: dtypes.append(o[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(frames, audio)
    assert dtypes == [torch.float32]  # the deformable-attention pixel decoder stays in fp32
    assert torch.isfinite(out["pred_masks"].float()).all()


def test_bad_inputs_raise_value_errors():
    model = build_model(get_preset("av2ts-tiny", siam=True))
    frames, audio, maskiges = clip(1, 2, 64)
    with pytest.raises(ValueError, match="maskiges are required"):
        model(frames, audio)
    with pytest.raises(ValueError, match="audio must be"):
        model(frames, audio[:, :1], maskiges)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(frames[..., :48, :48], audio, maskiges[..., :48, :48])
    with pytest.raises(ValueError, match="frames must be"):
        model(frames[0], audio, maskiges)
    with pytest.raises(ValueError, match="2-class"):
        foreground_probability(torch.zeros(1, 3, 4, 4))


def test_the_cli_shows_the_networks_value_errors_as_usage_errors():
    """The network raises ValueError (it cannot import ``errors``); a command that meets one prints the message as
    one line and exits 2, as for any usage error. A ValueError from elsewhere stays an unexpected failure (exit 1)."""
    model = build_model(get_preset("av2ts-tiny", siam=True))
    frames, audio, _ = clip(1, 2, 64)
    app = typer.Typer()

    @app.command()
    @cli._reported
    def segment(network: bool = True) -> None:
        if network:
            model(frames, audio)
        else:
            int("not a number")

    cli._state["debug"] = False
    result = CliRunner().invoke(app, [])
    assert result.exit_code == EXIT_USAGE
    assert result.output.strip() == "error: model av2ts-tiny uses the Siam encoder: maskiges are required"
    result = CliRunner().invoke(app, ["--no-network"])
    assert result.exit_code == 1 and "ValueError: invalid literal" in result.output


def sounding_shapes_batch(size: int = 64, frames: int = 4):
    """Two clips with a red square and a blue disc drifting apart; in clip 0 the square sounds (440 Hz tone), in
    clip 1 the disc (2.5 kHz). Returns frames [2, T, 3, S, S], log-mel [2, T, 96, 64] and the criterion's targets
    (class 1 = the sounding shape, every frame supervised)."""
    from av2ts_cli.model.audio import SAMPLE_RATE, waveform_to_examples

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    video = torch.full((2, frames, 3, size, size), 110.0)
    masks = torch.zeros(2, frames, size, size, dtype=torch.long)
    audio = []
    for c, tone in enumerate((440.0, 2500.0)):
        for t in range(frames):
            square = (yy >= 10) & (yy < 30) & (xx >= 8 + 2 * t + 4 * c) & (xx < 28 + 2 * t + 4 * c)
            disc = (yy - 44) ** 2 + (xx - 44 + 2 * t) ** 2 < 100
            video[c, t, :, square] = torch.tensor([230.0, 40.0, 40.0])[:, None]
            video[c, t, :, disc] = torch.tensor([40.0, 60.0, 230.0])[:, None]
            masks[c, t] = (square if c == 0 else disc).long()
        seconds = torch.arange(frames * SAMPLE_RATE) / SAMPLE_RATE
        wave = 0.5 * torch.sin(2 * math.pi * tone * seconds) + 0.01 * torch.randn(seconds.shape, generator=g)
        audio.append(waveform_to_examples(wave, num_examples=frames))
    return video, torch.stack(audio), {"masks": masks, "supervised": torch.ones(2, frames, dtype=torch.bool)}


@pytest.mark.slow
def test_tiny_overfits_one_synthetic_batch():
    """The whole network and the criterion train together: 60 AdamW steps on one batch cut the loss by 90% and
    the semantic map finds the sounding shapes."""
    from av2ts_cli.training.criterion import build_criterion

    torch.manual_seed(0)
    cfg = get_preset("av2ts-tiny", "ms3")
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-3, weight_decay=0.0)
    video, audio, targets = sounding_shapes_batch()
    history = []
    for _ in range(60):
        loss = sum(criterion(model(video, audio), targets).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 <= 0.1 * history[0], (history[0], history[-3:])

    model.eval()
    with torch.inference_mode():
        found = foreground_probability(model.segment(video, audio)) > 0.5
    truth = targets["masks"] == 1
    iou = (found & truth).sum((-2, -1)) / (found | truth).sum((-2, -1))
    assert iou.min() > 0.8, iou


def test_decoder_attention_equals_torch_multihead_attention():
    """Our SDPA-based attention is nn.MultiheadAttention (the reference's module) with the mask convention flipped
    (visible instead of hidden) and broadcast over heads instead of repeated."""
    from av2ts_cli.model.decoder import MultiHeadAttention

    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 4)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    query, memory = torch.randn(2, 6, 32), torch.randn(2, 10, 32)
    hidden = torch.rand(2, 6, 10) > 0.6
    hidden[:, :, 0] = False  # no query is blind
    expected = theirs(query, memory, memory, attn_mask=hidden.repeat_interleave(4, dim=0), need_weights=False)[0]
    torch.testing.assert_close(ours(query, memory, memory, ~hidden.unsqueeze(1)), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(query, query, query), theirs(query, query, query, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)


def test_deformable_attention_weights_are_the_softmax_in_inference_and_training():
    """The CPU inference form of the attention weights' softmax (whole-tensor ops, in place) is torch's softmax,
    leaves its input alone, and training (autograd) gets torch's own."""
    from av2ts_cli.model.pixel_decoder import _softmax_last

    logits = torch.randn(2, 9, 8, 12) * 4
    logits[0, 0, 0] = torch.tensor([80.0] * 6 + [-80.0] * 6)  # exp would overflow without the max taken out
    kept = logits.clone()
    with torch.no_grad():
        torch.testing.assert_close(_softmax_last(logits), logits.softmax(-1), atol=1e-6, rtol=0)
    assert torch.equal(logits, kept)
    trained = logits.clone().requires_grad_()
    weights = _softmax_last(trained)
    (weights * torch.arange(12.0)).sum().backward()
    assert torch.equal(weights, logits.softmax(-1)) and trained.grad is not None and trained.grad.abs().sum() > 0


def test_dsta_follows_the_reference_data_flow():
    """TAA and TVA against a step-by-step computation written from docs/model.md, 'DSTA: temporal attention' (views,
    permutes and the
    per-location repeat of the shared map exactly as described), reusing only the blocks' weights."""
    from av2ts_cli.model.temporal import TemporalAcousticAttention, TemporalVisualAttention

    torch.manual_seed(0)
    b, t, p, c, heads = 2, 3, 24, 32, 8
    taa, tva = TemporalAcousticAttention(c, c, heads), TemporalVisualAttention([16, 24], c, heads)
    tokens = torch.randn(b * t, p, c)
    maps = [torch.randn(b * t, 16, 4, 4), torch.randn(b * t, 24, 2, 2)]
    with torch.no_grad():
        queries, shared = taa(tokens, t)
        visual = tva(maps, shared)

        x = tokens.view(b, t, p, c).permute(0, 2, 1, 3).reshape(b * p, t, c)
        x1 = taa.blocks[0](x)
        n1 = taa.blocks[1].norm1(x1)
        x2 = taa.blocks[1](x1)
        n2 = taa.blocks[2].norm1(x2)
        x3, logits = taa.blocks[2](x2, return_logits=True)
        x3 = taa.norm(x3)

        def frames(y):
            return y.view(b, p, t, c).transpose(1, 2).reshape(b * t, p, c)

        expected = torch.cat([taa.projections[0](tokens), taa.projections[1](frames(n1)),
                              taa.projections[2](frames(n2)), taa.projections[3](frames(x3))], dim=1)
        torch.testing.assert_close(queries, expected)
        mean_map = logits.view(b, p, heads, t, t).mean(1).unsqueeze(1)  # [B, 1, heads, T, T]
        torch.testing.assert_close(shared, mean_map[:, 0])

        for level, feature in enumerate(maps):
            block = tva.blocks[level]
            proj = tva.projections[level](feature)
            h, w = proj.shape[-2:]
            series = proj.view(b, t, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, t, c)
            attn = mean_map.repeat(1, h * w, 1, 1, 1).view(b * h * w, heads, t, t)
            v = block.attn.v(block.norm1(series)).reshape(b * h * w, t, heads, c // heads).transpose(1, 2)
            mixed = ((attn * (c // heads) ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b * h * w, t, c)
            y = series + block.attn.proj(mixed)
            y = tva.norms[level](y + block.mlp(block.norm2(y)))
            y = y.view(b, h, w, t, c).permute(0, 3, 4, 1, 2).reshape(b * t, c, h, w)
            torch.testing.assert_close(visual[level], y, atol=1e-5, rtol=1e-5)


def test_osa_follows_the_reference_data_flow():
    """Space-to-depth with channel index c*16 + dy*4 + dx, level embedding, LayerNorms, one stream, layer scale."""
    from av2ts_cli.model.blocks import sine_position_embedding
    from av2ts_cli.model.fusion import OneStreamFusion

    torch.manual_seed(0)
    n, c, q = 2, 32, 96
    osa = OneStreamFusion(c, q, num_blocks=2, num_heads=8, layer_scale_init=0.5)
    features, audio = torch.randn(n, c, 16, 12), torch.randn(n, q, c)
    with torch.no_grad():
        visual, fused_audio = osa(features, audio)
        folded = features.view(n, c, 4, 4, 3, 4).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 16, 4, 3)
        x = osa.reduce(folded).flatten(2) + osa.level_embed.weight[0][None, :, None]
        v = osa.norm_visual(x.transpose(1, 2))
        a = osa.norm_audio(audio)
        z = torch.cat([v + sine_position_embedding(4, 3, c).flatten(1).t(), a + osa.audio_pos.weight], dim=1)
        for block in osa.blocks:
            z = block(z)
        dv, da = osa.norm(z).split([12, q], dim=1)
        torch.testing.assert_close(visual, (v + osa.gamma_visual * dv).transpose(1, 2).reshape(n, c, 4, 3))
        torch.testing.assert_close(fused_audio, a + osa.gamma_audio * da)


def test_sine_position_embedding_is_detr_normalised_sine():
    from av2ts_cli.model.blocks import sine_position_embedding

    h, w, dim = 5, 7, 16
    ones = torch.ones(1, h, w)
    y = ones.cumsum(1) / (ones.cumsum(1)[:, -1:, :] + 1e-6) * 2 * math.pi
    x = ones.cumsum(2) / (ones.cumsum(2)[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(dim // 2) // 2) / (dim // 2))
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    expected = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)[0]
    torch.testing.assert_close(sine_position_embedding(h, w, dim), expected)


@pytest.mark.parametrize(("preset", "subset"), [("av2ts-tiny", "s4"), ("av2ts-tiny", "avss"), ("combo-tiny", "s4")])
def test_the_semantic_map_is_the_batched_formula_bit_for_bit(preset, subset):
    """segment() works frame by frame (docs/model.md, 'Semantic maps'); the numbers are those of upsampling every
    frame's masks at once: sum over queries of softmax(class)[:K] * sigmoid(bilinear(mask))."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset, subset)).eval()
    frames, audio = torch.rand(2, 3, 3, 128, 128) * 255, torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        semseg = model.segment(frames, audio)
        out = model(frames, audio)
    masks = torch.nn.functional.interpolate(out["pred_masks"], size=(128, 128), mode="bilinear", align_corners=False)
    probs = out["pred_logits"].softmax(-1)[..., :-1]
    expected = torch.einsum("nqk,nqhw->nkhw", probs, masks.sigmoid()).reshape(semseg.shape)
    assert semseg.shape == (2, 3, model.cfg.num_classes, 128, 128)
    assert torch.equal(semseg, expected)
