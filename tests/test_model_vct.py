"""The VCT network (model/vct.py and its options in the shared modules): presets, shapes through every part with
vct-tiny, the query generator's hard assignment, the unmasked audio level, ``segment``'s geometry, gradients, and
the full presets' parameters against the reference's layouts (tests/data/vct-keys-*.tsv, measured by building
spyflying/VCT_AVS with random weights)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from av2ts_cli.config import ModelConfig, get_preset
from av2ts_cli.model import VCT, build_model
from av2ts_cli.model.backbone import SwinFeatures
from av2ts_cli.model.decoder import MaskedAttentionDecoder
from av2ts_cli.model.vct import AssignAttention, VisionQueries
from av2ts_cli.model.vggish import VGGish

DATA = Path(__file__).parent / "data"
VGGISH_FC = 67_641_472  # audio_backbone.embeddings.*: built and loaded by the reference, never run; not built here
# the reference's parameters (all its float tensors but the criterion's no-object weight) and trainable ones
REFERENCE = {"s4": (289_850_000, 217_708_816), "ms3": (289_449_359, 217_308_175), "avss": (289_880_021, 217_738_837)}
# reference prefix -> our top-level part (the part of a key is decided by its longest matching prefix)
REFERENCE_PARTS = {
    "backbone.": "backbone", "pre_sam_backbone.": "siam_backbone", "scale_factor_module.": "siam_gates",
    "audio_backbone.features.": "audio_encoder", "sem_seg_head.audio_transformation.": "audio_mlp",
    "sem_seg_head.pixel_decoder.": "pixel_decoder", "sem_seg_head.predictor.": "decoder",
    "sem_seg_head.predictor.visual_query_block.": "queries", "sem_seg_head.predictor.audio_proj.": "alignment",
    "sem_seg_head.predictor.proto_proj.": "alignment", "criterion.logit_scale": "alignment",
}


def layout(subset: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, dtype, shape) of every tensor of the reference's state dict."""
    rows = []
    for line in (DATA / f"vct-keys-{subset}.tsv").read_text().splitlines()[1:]:
        key, dtype, shape, _ = line.split("\t")
        rows.append((key, dtype, tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())))
    return rows


def clip(batch: int, frames: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, frames, 3, size, size, generator=g) * 255,
            torch.randn(batch, frames, 96, 64, generator=g) - 2.0,
            torch.rand(batch, frames, 3, size, size, generator=g) * 255)


@pytest.fixture(scope="module")
def tiny_siam():
    torch.manual_seed(0)
    return build_model(get_preset("vct-tiny", "s4", siam=True)).eval()


# --------------------------------------------------------------------------------------------- presets, configs
@pytest.mark.parametrize("subset, classes, prototypes", [("s4", 2, 23), ("ms3", 2, 0), ("avss", 71, 71)])
def test_presets(subset, classes, prototypes):
    cfg = get_preset("vct-swinb", subset)
    assert (cfg.family, cfg.siam, cfg.num_classes, cfg.num_prototypes) == ("vct", True, classes, prototypes)
    assert (cfg.input_size, cfg.output_size, cfg.num_queries, cfg.decoder_layers) == (384, 224, 100, 9)
    assert cfg.backbone == "swin_base_patch4_window12_384" and cfg.backbone_kwargs["always_partition"]
    assert cfg.drop_path_rate == 0.3 and cfg.loss.cosine_weight == 0.0
    tiny = get_preset("vct-tiny", subset)
    assert tiny.family == "vct" and not tiny.siam and tiny.num_prototypes == prototypes
    assert tiny.input_size % 32 == 0 and tiny.output_size in (0, tiny.input_size)
    assert ModelConfig.from_dict(tiny.to_dict()) == tiny
    assert ModelConfig.from_dict(get_preset("vct-swinb", subset).to_dict()) == cfg


def test_build_model_follows_the_family():
    assert type(build_model(get_preset("vct-tiny"))) is VCT
    with pytest.raises(ValueError, match="family"):
        VCT(get_preset("combo-tiny"))


def test_tiny_geometry_follows_its_input_size():
    """The query generator's pixel MLP takes (input/4)^2 pixels: 1024 for vct-tiny's 128 px, 9216 for 384."""
    model = build_model(get_preset("vct-tiny"))
    assert model.queries.query_mixer.layers[0].in_features == (128 // 4) ** 2
    with torch.device("meta"):
        assert build_model(get_preset("vct-swinb")).queries.query_mixer.layers[0].in_features == 96 * 96


# -------------------------------------------------------------------------------------------------------- shapes
def test_shapes_through_every_part(tiny_siam):
    """B = 1 clip of T = 3 frames at 128 px: Swin 32/64/128/256 at strides 4..32, VGGish conv map [64, 6, 4], 24
    audio tokens, the pixel decoder, 16 vision-derived queries, 4 memory levels, heads, PAC embeddings."""
    model, seen = tiny_siam, {}
    handles = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i, o)))
               for name in ("backbone", "siam_backbone", "siam_gates", "audio_encoder", "audio_mlp",
                            "pixel_decoder", "queries", "decoder")]
    video, audio, maskiges = clip(1, 3, 128)
    try:
        with torch.inference_mode():
            out = model(video, audio, maskiges)
    finally:
        for handle in handles:
            handle.remove()
    pyramid = [(3, 32, 32, 32), (3, 64, 16, 16), (3, 128, 8, 8), (3, 256, 4, 4)]
    for part in ("backbone", "siam_backbone", "siam_gates"):
        assert [tuple(f.shape) for f in seen[part][1]] == pyramid, part
    assert seen["audio_encoder"][0][0].shape == (3, 1, 96, 64) and seen["audio_encoder"][1].shape == (3, 64, 6, 4)
    assert seen["audio_mlp"][0][0].shape == (3, 6, 4, 64) and seen["audio_mlp"][1].shape == (3, 6, 4, 64)
    mask_features, memories = seen["pixel_decoder"][1]
    assert mask_features.shape == (3, 64, 32, 32)
    assert [tuple(m.shape) for m in memories] == [(3, 64, 4, 4), (3, 64, 8, 8), (3, 64, 16, 16)]
    queries, prototypes = seen["queries"][1]
    assert queries.shape == (3, 16, 64) and prototypes.shape == (23, 64)
    levels, added, per_pixel = seen["decoder"][0]
    assert [tuple(m.shape) for m in levels] == [(3, 64, 6, 4)] + [tuple(m.shape) for m in memories]
    assert added is queries and per_pixel is mask_features
    assert out["pred_logits"].shape == (3, 16, 3) and out["pred_masks"].shape == (3, 16, 32, 32)
    assert len(out["aux_outputs"]) == 4 and all(a["pred_masks"].shape == (3, 16, 32, 32) for a in out["aux_outputs"])
    pac = out["pac"]
    assert pac["audio"].shape == (3, 64) and pac["prototypes"].shape == (3, 23, 64) and pac["logits"].shape == (3, 23)
    assert torch.allclose(pac["audio"].norm(dim=-1), torch.ones(3))
    assert torch.allclose(pac["logits"], model.alignment.logit_scale.exp() * torch.einsum(
        "nc,nkc->nk", pac["audio"], pac["prototypes"]))


@pytest.mark.parametrize("subset, frames", [("ms3", 5), ("avss", 2)])
def test_forward_and_segment_per_subset(subset, frames):
    torch.manual_seed(0)
    cfg = get_preset("vct-tiny", subset)
    model = build_model(cfg).eval()
    video, audio, _ = clip(1, frames, cfg.input_size)
    with torch.inference_mode():
        out = model(video, audio)
        semseg = model.segment(video, audio)
    k = cfg.num_classes
    assert out["pred_logits"].shape == (frames, 16, k + 1) and ("pac" in out) == (subset != "ms3")
    assert semseg.shape == (1, frames, k, 128, 128) and torch.isfinite(semseg).all()
    assert semseg.min() >= 0 and semseg.max() <= cfg.num_queries


def test_segment_resizes_the_map_as_the_reference_test_loop(tiny_siam):
    """With an output size (224 for vct-swinb), the semantic map is made at the input size, then resized bilinearly:
    the reference's semantic inference at 384 px and its fixed 224 px ``sem_seg_postprocess``."""
    model = tiny_siam
    video, audio, maskiges = clip(1, 2, 128, seed=3)
    with torch.inference_mode():
        at_input = model.segment(video, audio, maskiges)
        model.cfg = dataclasses.replace(model.cfg, output_size=96)
        try:
            resized = model.segment(video, audio, maskiges)
        finally:
            model.cfg = dataclasses.replace(model.cfg, output_size=0)
    assert at_input.shape == (1, 2, 2, 128, 128) and resized.shape == (1, 2, 2, 96, 96)
    expected = F.interpolate(at_input[0], size=(96, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized[0], expected, atol=1e-5, rtol=1e-5)


def test_lean_decoder_gives_the_same_maps(tiny_siam):
    """model/inference.py's lean decoder (intermediate masks at the attention sizes only) changes nothing."""
    video, audio, maskiges = clip(1, 2, 128, seed=5)
    with torch.inference_mode():
        full = tiny_siam.segment(video, audio, maskiges)
        tiny_siam.decoder.full_masks = False
        try:
            lean = tiny_siam.segment(video, audio, maskiges)
        finally:
            tiny_siam.decoder.full_masks = True
    torch.testing.assert_close(lean, full, atol=1e-5, rtol=1e-5)


def test_input_errors(tiny_siam):
    video, audio, maskiges = clip(1, 2, 128)
    with pytest.raises(ValueError, match="maskiges"):
        tiny_siam(video, audio)
    small = clip(1, 2, 64)
    with pytest.raises(ValueError, match="128x128"):
        tiny_siam(*small)


def test_clips_in_a_batch_do_not_mix(tiny_siam):
    video, audio, maskiges = clip(2, 3, 128)
    with torch.inference_mode():
        both = tiny_siam(video, audio, maskiges)["pred_masks"]
        second = tiny_siam(video[1:], audio[1:], maskiges[1:])["pred_masks"]
    torch.testing.assert_close(both[3:], second, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ shared options
def test_swin_features_are_the_timm_stages_with_their_norms():
    """Stage outputs before the next merging, each with its own LayerNorm; the last one with timm's final norm,
    so it equals timm's ``forward_features``; stage 4 still shifts its windows (``always_partition``)."""
    kwargs = get_preset("vct-tiny").backbone_kwargs
    torch.manual_seed(0)
    swin = SwinFeatures("swin_tiny_patch4_window7_224", **kwargs).eval()
    torch.manual_seed(0)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **kwargs).eval()
    reference.load_state_dict({k: v for k, v in swin.state_dict().items() if not k.startswith("stage_norms.")})
    x = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        maps = swin(x)
        torch.testing.assert_close(maps[3], reference.forward_features(x).permute(0, 3, 1, 2))
    assert [m.shape[1] for m in maps] == [32, 64, 128, 256] and list(swin.feature_info.reduction()) == [4, 8, 16, 32]
    assert {k.split(".")[0] for k in swin.state_dict()} == {"patch_embed", "layers", "norm", "stage_norms"}
    assert any(swin.layers[3].blocks[1].shift_size) and not any(swin.layers[3].blocks[0].shift_size)


def test_swin_drop_path_is_linear_over_all_blocks():
    with torch.device("meta"):
        model = build_model(get_preset("vct-swinb", "ms3"))
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.backbone.modules() if hasattr(b, "drop_path1")]
    assert len(rates) == 24
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 24))


def test_vggish_without_embeddings_returns_the_conv_map():
    vggish = VGGish((8, 16, 32, 32, 64, 64), embeddings=False)
    assert not hasattr(vggish, "embeddings") and vggish(torch.randn(2, 1, 96, 64)).shape == (2, 64, 6, 4)


def test_unmasked_levels_see_every_memory_position():
    """VCT's audio level (0) is read without an attention mask; the others with the previous prediction's."""
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(32, 2, 4, num_layers=4, num_heads=4, ffn_dim=64, num_memory_levels=2,
                                     unmasked_levels=(0,)).eval()
    masks = []
    for layer in decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda m, args: masks.append(args[3]))
    memories = [torch.randn(2, 32, 6, 4), torch.randn(2, 32, 4, 4)]
    with torch.inference_mode():
        decoder(memories, torch.randn(2, 4, 32), torch.randn(2, 32, 8, 8))
        decoder.full_masks = False  # the inference path (model/inference.py)
        decoder(memories, torch.randn(2, 4, 32), torch.randn(2, 32, 8, 8))
    assert len(masks) == 8
    assert [m is None for m in masks] == [True, False, True, False] * 2
    assert all(m.shape == (2, 1, 4, 16) for m in masks[1::2])


# -------------------------------------------------------------------------------------------- query generator
def test_hard_assignment_averages_each_querys_pixels():
    """Eval: each pixel goes to its arg-max query; a query gets proj(sum of its pixels' values / (count + 1)),
    a query without pixels proj's bias."""
    torch.manual_seed(0)
    assign = AssignAttention(8).eval()
    queries, pixels = torch.randn(2, 5, 8), torch.randn(2, 30, 8)
    with torch.no_grad():
        out = assign(queries, pixels)
        winner = (assign.q_proj(queries) @ assign.k_proj(pixels).transpose(1, 2)).argmax(dim=1)  # [2, 30]
        values = assign.v_proj(pixels)
        for n in range(2):
            for q in range(5):
                chosen = winner[n] == q
                mean = values[n][chosen].sum(0) / (chosen.sum() + 1)
                torch.testing.assert_close(out[n, q], assign.proj(mean), atol=1e-5, rtol=1e-5)


def test_assignment_is_straight_through_and_noisy_in_training():
    torch.manual_seed(0)
    assign = AssignAttention(8).train()
    queries = torch.randn(1, 4, 8, requires_grad=True)
    pixels = torch.randn(1, 20, 8)
    first, second = assign(queries, pixels), assign(queries, pixels)
    assert not torch.equal(first, second)  # Gumbel noise
    first.sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert assign.q_proj.weight.grad.abs().sum() > 0 and assign.k_proj.weight.grad.abs().sum() > 0


def test_vision_queries_need_their_pixel_count():
    generator = VisionQueries(32, 64, 6, num_prototypes=5)
    queries, prototypes = generator(torch.randn(2, 32, 8, 8))
    assert queries.shape == (2, 6, 32) and prototypes.shape == (5, 32)
    assert VisionQueries(32, 64, 6)(torch.randn(1, 32, 8, 8))[1] is None
    with pytest.raises(ValueError, match="64 pixels"):
        generator(torch.randn(2, 32, 4, 4))


# ----------------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_trainable_parameter_and_never_vggish():
    torch.manual_seed(0)
    model = build_model(get_preset("vct-tiny", "s4", siam=True)).train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("audio_encoder.") for n, _ in trainable)
    optimiser = torch.optim.Adam([p for _, p in trainable], lr=1e-3)
    video, audio, maskiges = clip(1, 2, 128)
    for _ in range(2):
        optimiser.zero_grad()
        out = model(video, audio, maskiges)
        loss = out["pred_logits"].logsumexp(-1).mean() + out["pred_masks"].sigmoid().mean()
        loss = loss + sum(a["pred_masks"].sigmoid().mean() + a["pred_logits"].softmax(-1)[..., 0].mean()
                          for a in out["aux_outputs"])
        loss = loss + F.binary_cross_entropy_with_logits(out["pac"]["logits"], torch.eye(23)[[3, 3]])
        loss.backward()
        optimiser.step()
    dead = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


# ------------------------------------------------------------------------------------------- reference counts
def reference_parts(subset: str) -> dict[str, list[tuple[int, ...]]]:
    """Per part of ours, the shapes of the reference's parameters that av2ts builds."""
    parts = defaultdict(list)
    for key, dtype, shape in layout(subset):
        if dtype != "float32" or key == "criterion.empty_weight" or key.startswith("audio_backbone.embeddings."):
            continue  # int64 Swin index buffers, the loss's constant, VGGish's never-run linear layers
        prefix = max((p for p in REFERENCE_PARTS if key.startswith(p)), key=len)
        parts[REFERENCE_PARTS[prefix]].append(shape)
    return parts


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_parameters_equal_the_reference_less_vggish_fc(subset):
    """The full presets (built on the meta device) have the reference's parameters less VGGish's linear layers
    (67,641,472, frozen, never run), one tensor for one tensor per part, with the same shapes."""
    total, trainable = REFERENCE[subset]
    rows = layout(subset)
    assert sum(math.prod(s) for k, d, s in rows if d == "float32" and k != "criterion.empty_weight") == total
    assert sum(math.prod(s) for k, _, s in rows if k.startswith("audio_backbone.embeddings.")) == VGGISH_FC
    with torch.device("meta"):
        model = build_model(get_preset("vct-swinb", subset))
    assert sum(p.numel() for p in model.parameters()) == total - VGGISH_FC
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    ours = defaultdict(list)
    for name, p in model.named_parameters():
        ours[name.split(".")[0]].append(tuple(p.shape))
    reference = reference_parts(subset)
    assert set(ours) == set(reference)
    for part in reference:
        assert sorted(ours[part]) == sorted(reference[part]), part
