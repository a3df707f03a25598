"""The VGGish log-mel front end against an independent NumPy reading of the recipe, and the CED encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from av2ts_cli.model.audio import SAMPLE_RATE, CEDEncoder, log_mel_spectrogram, waveform_to_examples


def _vggish_numpy(wave: np.ndarray) -> np.ndarray:
    """VGGish log-mel examples written from the recipe (docs/model.md, 'Audio front end'), float64 throughout -> [N,
    96, 64]."""
    window, hop, fft = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; FFT = next power of two
    count = 1 + (len(wave) - window) // hop
    frames = np.stack([wave[i * hop: i * hop + window] for i in range(count)])
    hann = 0.5 - 0.5 * np.cos(2 * np.pi / window * np.arange(window))  # periodic
    spectrum = np.abs(np.fft.rfft(frames * hann, fft))  # [F, 257]

    def mel(hz):
        return 1127.0 * np.log(1.0 + hz / 700.0)

    bins_mel = mel(np.linspace(0.0, SAMPLE_RATE / 2, fft // 2 + 1))
    edges = np.linspace(mel(125.0), mel(7500.0), 64 + 2)
    weights = np.zeros((fft // 2 + 1, 64))
    for i in range(64):
        lower, centre, upper = edges[i:i + 3]
        rising = (bins_mel - lower) / (centre - lower)
        falling = (upper - bins_mel) / (upper - centre)
        weights[:, i] = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # the DC bin carries no mel weight
    log_mel = np.log(spectrum @ weights + 0.01)
    examples = log_mel.shape[0] // 96
    return log_mel[: examples * 96].reshape(examples, 96, 64)


def _tone_plus_noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tones = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.2 * np.sin(2 * np.pi * 3000.0 * t)
    wave = tones + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def test_log_mel_matches_numpy_vggish_recipe():
    wave = _tone_plus_noise(3.2)
    expected = _vggish_numpy(wave.astype(np.float64))
    got = waveform_to_examples(torch.from_numpy(wave)).numpy()
    assert got.shape == expected.shape == (3, 96, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_num_examples_pads_by_repeating_and_cuts():
    wave = torch.from_numpy(_tone_plus_noise(2.5))
    plain = waveform_to_examples(wave)
    assert plain.shape[0] == 2
    padded = waveform_to_examples(wave, num_examples=5)
    assert padded.shape == (5, 96, 64)
    torch.testing.assert_close(padded[:2], plain)
    for i in range(2, 5):
        torch.testing.assert_close(padded[i], plain[-1])
    assert waveform_to_examples(wave, num_examples=1).shape == (1, 96, 64)


def test_too_short_wave_gives_silence_examples():
    assert log_mel_spectrogram(torch.zeros(100)).shape == (0, 64)
    silent = waveform_to_examples(torch.zeros(100), num_examples=3)
    assert silent.shape == (3, 96, 64)
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(0.01))))


def test_ced_token_layout_and_frozen_mel_norm():
    """Token index 6*f + t, time/frequency position embeddings, BatchNorm over mel bins (no blocks, to see them)."""
    torch.manual_seed(0)
    ced = CEDEncoder(dim=32, depth=0, num_heads=4).eval()
    with torch.no_grad():
        ced.patch_embed.weight.zero_()
        ced.patch_embed.bias.zero_()
        ced.patch_embed.weight[0, 0] = 1.0 / 256  # channel 0 = mean of the normalised patch
        ced.init_bn.running_mean.copy_(torch.arange(64.0))  # the norm subtracts the mel index per mel band
        ced.norm.weight.fill_(1.0)
    examples = torch.arange(64.0).expand(2, 96, 64).clone()  # value = mel index: normalised to exactly 0
    tokens = ced(examples)
    assert tokens.shape == (2, 24, 32)
    pos = ced.time_pos_embed[0, :, 0, :6][:, None, :] + ced.freq_pos_embed[0, :, :, 0][:, :, None]  # [C, f, t]
    expected = torch.nn.functional.layer_norm(pos.flatten(1).t(), (32,), eps=1e-6)  # [(f t), C]
    torch.testing.assert_close(tokens[0], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 2])
def test_ced_shapes(depth):
    ced = CEDEncoder(dim=64, depth=depth, num_heads=4)
    assert ced(torch.randn(3, 96, 64)).shape == (3, 24, 64)
    assert ced.time_pos_embed.shape == (1, 64, 1, 63) and ced.freq_pos_embed.shape == (1, 64, 4, 1)
