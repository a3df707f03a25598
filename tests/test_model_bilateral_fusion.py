"""Bilateral fusion and audio MLP (model/bilateral_fusion.py): shapes, the attention on hand-checkable cases,
layer scales, the reference layout and parameter counts."""

from __future__ import annotations

import pytest
import torch
from _combo_keys import combo_rows

from av2ts_cli.model.bilateral_fusion import AudioMlp, BilateralAttention, BilateralFusion


def test_fusion_shapes():
    fusion = BilateralFusion(dim=64, audio_dim=32, num_heads=8, mlp_dim=48).eval()
    with torch.no_grad():
        visual, audio = fusion(torch.randn(6, 64, 8, 12), torch.randn(6, 1, 32))
    assert visual.shape == (6, 64, 8, 12) and audio.shape == (6, 1, 64)


@pytest.mark.parametrize("audio_shape", [(6, 32), (6, 2, 32), (5, 1, 32)])
def test_audio_must_be_one_token_per_frame(audio_shape):
    fusion = BilateralFusion(dim=64, audio_dim=32, num_heads=8, mlp_dim=48)
    with pytest.raises(ValueError):
        fusion(torch.randn(6, 64, 4, 4), torch.randn(audio_shape))


def test_zero_layer_scales_give_the_normalised_inputs():
    """Residuals are taken on the layer-normalised streams (with the level embedding added before the norm)."""
    fusion = BilateralFusion(dim=64, audio_dim=32, num_heads=8, mlp_dim=48).eval()
    with torch.no_grad():
        fusion.gamma_visual.zero_()
        fusion.gamma_audio.zero_()
        fusion.level_embed.weight.normal_()
        x, a = torch.randn(2, 64, 4, 4), torch.randn(2, 1, 32)
        visual, audio = fusion(x, a)
        expected_v = fusion.norm_visual(x.flatten(2).transpose(1, 2) + fusion.level_embed.weight)
        assert torch.allclose(visual, expected_v.transpose(1, 2).reshape(2, 64, 4, 4), atol=1e-6)
        assert torch.allclose(audio, fusion.audio_mlp(fusion.norm_audio(a)), atol=1e-6)


def _identity(layer: torch.nn.Linear) -> None:
    torch.nn.init.eye_(layer.weight)
    torch.nn.init.zeros_(layer.bias)


def test_attention_normalises_over_positions():
    """One softmax over the L positions per head: the visual updates of all positions sum to the audio value,
    and with equal logits (zero queries) the audio update is the mean of the visual values."""
    attn = BilateralAttention(visual_dim=16, audio_dim=16, embed_dim=16, num_heads=2).eval()
    with torch.no_grad():
        for layer in (attn.values_v_proj, attn.values_a_proj, attn.out_v_proj, attn.out_a_proj):
            _identity(layer)
        v, a = torch.randn(3, 10, 16), torch.randn(3, 1, 16)
        pos_v, pos_a = torch.randn(10, 16), torch.randn(1, 16)
        delta_v, delta_a = attn(v, a, pos_v, pos_a)
        assert delta_v.shape == (3, 10, 16) and delta_a.shape == (3, 1, 16)
        torch.testing.assert_close(delta_v.sum(1, keepdim=True), a)  # sum_l p_l * value_a, sum_l p_l = 1

        attn.v_proj.weight.zero_()
        attn.v_proj.bias.zero_()
        delta_v, delta_a = attn(v, a, pos_v, pos_a)
        torch.testing.assert_close(delta_a, v.mean(1, keepdim=True))  # uniform over the positions
        torch.testing.assert_close(delta_v, a.expand(3, 10, 16) / 10)


def test_attention_logits_per_head():
    """Head h's logit at position l is (q_l . k) / sqrt(d) over that head's channels only."""
    attn = BilateralAttention(visual_dim=4, audio_dim=4, embed_dim=4, num_heads=2).eval()
    with torch.no_grad():
        for layer in (attn.v_proj, attn.a_proj, attn.values_v_proj, attn.values_a_proj, attn.out_v_proj,
                      attn.out_a_proj):
            _identity(layer)
        v = torch.tensor([[[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0]]])  # 2 positions
        a = torch.tensor([[[2.0, 0.0, 1.0, 1.0]]])
        zero_v, zero_a = torch.zeros(2, 4), torch.zeros(1, 4)
        _, delta_a = attn(v, a, zero_v, zero_a)
    d = 2
    logits_h0 = torch.tensor([1.0 * 2.0, 0.0]) / d ** 0.5  # channels 0-1
    logits_h1 = torch.tensor([2.0 * 1.0, 1.0 * 1.0]) / d ** 0.5  # channels 2-3
    p0, p1 = logits_h0.softmax(0), logits_h1.softmax(0)
    expected = torch.cat([p0 @ v[0, :, :2], p1 @ v[0, :, 2:]])
    torch.testing.assert_close(delta_a[0, 0], expected)


def test_dropout_only_in_training():
    fusion = BilateralFusion(dim=64, audio_dim=32, num_heads=8, mlp_dim=48)
    with torch.no_grad():
        fusion.gamma_visual.fill_(1.0)
        x, a = torch.randn(2, 64, 4, 4), torch.randn(2, 1, 32)
        fusion.eval()
        assert torch.equal(fusion(x, a)[0], fusion(x, a)[0])
        fusion.train()
        torch.manual_seed(0)
        first = fusion(x, a)[0]
        assert not torch.equal(first, fusion(x, a)[0])


def test_reference_layout_and_counts():
    """Our fusion holds the reference's fusion_module (MHA-B) and audio_transformation tensors, same shapes."""
    fusion = BilateralFusion(dim=256, audio_dim=128, num_heads=8, mlp_dim=4096)
    rows = combo_rows("combo-keys-r50-s4.tsv")
    reference = sorted(s for k, s in rows if k.startswith(("sem_seg_head.fusion_module.",
                                                           "sem_seg_head.audio_transformation.")))
    assert sorted(tuple(p.shape) for p in fusion.parameters()) == reference
    assert sum(p.numel() for p in AudioMlp(128, 4096, 256).parameters()) == 18_358_528
    assert torch.all(fusion.gamma_visual == 1e-4) and torch.all(fusion.gamma_audio == 1e-4)
