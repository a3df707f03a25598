"""VGGish (model/vggish.py): shapes, input checks, the released layout and count, the channels-last flatten."""

from __future__ import annotations

import pytest
import torch
from _combo_keys import combo_rows

from av2ts_cli.model.vggish import VGGish


def test_shapes_and_non_negative_output():
    model = VGGish((4, 8, 8, 8, 16, 16), hidden=32, out_dim=12).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, 96, 64))
    assert out.shape == (3, 12) and (out >= 0).all()  # the last linear layer is followed by ReLU too
    assert model.features(torch.randn(1, 1, 96, 64)).shape == (1, 16, 6, 4)


def test_a_random_vggish_tells_inputs_apart():
    """Frozen and random (combo-tiny): the embeddings of different inputs must differ by more than noise, or the
    network downstream cannot hear which clip it sees. PyTorch's default init gave a spread across inputs of 0.3% of
    the mean; He init with zero biases about half of it."""
    torch.manual_seed(0)
    model = VGGish((8, 16, 32, 32, 64, 64), hidden=128, out_dim=32).eval()
    examples = torch.randn(16, 1, 96, 64) * 1.6 - 1.7  # the level and spread of synthetic S4's log-mel examples
    with torch.no_grad():
        out = model(examples)
    live = out.mean(0) > 0
    assert live.sum() >= 8
    assert (out.std(0)[live] / out.mean(0)[live]).mean() > 0.1


@pytest.mark.parametrize("shape", [(2, 96, 64), (2, 1, 64, 96), (2, 3, 96, 64)])
def test_wrong_input_shapes_are_value_errors(shape):
    with pytest.raises(ValueError, match="96, 64"):
        VGGish((4, 8, 8, 8, 16, 16), 32, 12)(torch.zeros(shape))


def test_release_layout_and_parameter_count():
    """Same keys and shapes as the reference's audio_backbone (and vggish-10086976.pth): 72,141,184 parameters."""
    model = VGGish()
    reference = {k[len("audio_backbone."):]: s for k, s in combo_rows("combo-keys-r50-s4.tsv")
                 if k.startswith("audio_backbone.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    assert sum(p.numel() for p in model.parameters()) == 72_141_184


def test_flatten_is_channels_last():
    """Input j of the first linear layer is feature (h, w, c) with j = (h * 4 + w) * C + c (TF order), not c-major."""
    model = VGGish((4, 8, 8, 8, 16, 16), hidden=32, out_dim=32).eval()
    channels, h, w, c = 16, 2, 3, 5
    with torch.no_grad():
        first, second, last = model.embeddings[0], model.embeddings[2], model.embeddings[4]
        for layer in (first, second, last):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, (h * 4 + w) * channels + c] = 1.0
        second.weight[0, 0] = 1.0
        last.weight[0, 0] = 1.0
        x = torch.randn(2, 1, 96, 64)
        expected = model.features(x)[:, c, h, w]  # >= 0 after the ReLU
        assert torch.allclose(model(x)[:, 0], expected)
