"""Audio side of AV2TS: the VGGish log-mel front end.

AV2TS feeds CED-Mini with VGGish log-mel examples, not with CED's own front end (docs/model.md, 'Audio front end'):
16 kHz mono, |STFT| with a 400-sample periodic Hann window, hop 160, 512-point FFT; 64 HTK mel bands from 125 to
7500 Hz; log(mel + 0.01); non-overlapping examples of 96 frames (0.96 s). The CED encoder lives in this file too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS, SAMPLE_RATE
from av2ts_cli.model.blocks import FrozenBatchNorm2d, TransformerBlock

# SAMPLE_RATE (16 kHz), MEL_BANDS (64) and EXAMPLE_FRAMES (96 hops of 10 ms: 0.96 s per example, one example per
# video frame) are the AVSBench contract's (avsbench.py, through config).
WINDOW_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
FFT_LENGTH = 512
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01


def _hertz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(hz / 700.0)  # HTK


def mel_matrix(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VGGish's mel weights [FFT_LENGTH // 2 + 1, MEL_BANDS] (triangles in HTK mel, DC bin zeroed)."""
    bins = FFT_LENGTH // 2 + 1
    bins_mel = _hertz_to_mel(torch.linspace(0.0, SAMPLE_RATE / 2, bins, dtype=torch.float64))
    edges = torch.linspace(
        float(_hertz_to_mel(torch.tensor(MEL_MIN_HZ, dtype=torch.float64))),
        float(_hertz_to_mel(torch.tensor(MEL_MAX_HZ, dtype=torch.float64))),
        MEL_BANDS + 2,
        dtype=torch.float64,
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0, :] = 0.0
    return weights.to(dtype)


def log_mel_spectrogram(wave: torch.Tensor) -> torch.Tensor:
    """wave: [S] float, 16 kHz mono in [-1, 1] -> [F, 64] log-mel frames, F = 1 + (S - 400) // 160 (0 if S < 400)."""
    wave = wave.to(torch.float32)
    if wave.numel() < WINDOW_LENGTH:
        return wave.new_zeros(0, MEL_BANDS)
    frames = wave.unfold(0, WINDOW_LENGTH, HOP_LENGTH)  # [F, 400], no centring, as VGGish
    window = torch.hann_window(WINDOW_LENGTH, periodic=True, dtype=wave.dtype, device=wave.device)
    magnitude = torch.fft.rfft(frames * window, n=FFT_LENGTH).abs()  # [F, 257]
    mel = magnitude @ mel_matrix(wave.dtype).to(wave.device)
    return torch.log(mel + LOG_OFFSET)


def waveform_to_examples(wave: torch.Tensor, num_examples: int | None = None) -> torch.Tensor:
    """wave: [S] float 16 kHz mono -> [N, 96, 64] VGGish log-mel examples (non-overlapping, 0.96 s each).

    With ``num_examples`` the result is cut or padded to exactly that many by repeating the last example, as the
    AVSBench S4/MS3 preprocessing does (silence stands in when the wave is too short for even one example).
    """
    frames = log_mel_spectrogram(wave)
    count = frames.shape[0] // EXAMPLE_FRAMES
    examples = frames[: count * EXAMPLE_FRAMES].reshape(count, EXAMPLE_FRAMES, MEL_BANDS)
    if num_examples is None:
        return examples
    if count == 0:
        silence = torch.full((1, EXAMPLE_FRAMES, MEL_BANDS), math.log(LOG_OFFSET), dtype=frames.dtype)
        examples = silence.to(frames.device)
    if examples.shape[0] < num_examples:
        pad = examples[-1:].expand(num_examples - examples.shape[0], -1, -1)
        examples = torch.cat([examples, pad], dim=0)
    return examples[:num_examples]


class CEDEncoder(nn.Module):
    """CED audio transformer (CED-Mini in the reference: dim 256, depth 12, 4 heads), frozen, without its head.

    One log-mel example [96 frames, 64 mels] -> frozen BatchNorm over the mel bins -> 16x16 patches (a 4 x 6 grid:
    frequency x time) -> + time and frequency position embeddings -> ``depth`` pre-norm blocks -> LayerNorm ->
    24 tokens, token index 6 * f + t (docs/model.md, 'Audio encoder (CED)'). Deliberately absent: CED's own front end
    (AV2TS feeds
    VGGish log-mel) and its classification head ``outputlayer`` (never used by AV2TS).
    """

    def __init__(self, dim: int = 256, depth: int = 12, num_heads: int = 4, patch: int = 16,
                 max_frames: int = 1012, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim = dim
        self.init_bn = FrozenBatchNorm2d(MEL_BANDS)
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.time_pos_embed = nn.Parameter(torch.randn(1, dim, 1, (max_frames - patch) // patch + 1) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, dim, (MEL_BANDS - patch) // patch + 1, 1) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, qkv_bias=True, eps=1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for m in self.modules():  # CED's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """examples: [N, 96, 64] log-mel (time, mel) -> tokens [N, 24, dim]."""
        x = examples.transpose(1, 2).unsqueeze(2)  # [N, 64 mels, 1, 96]: the BatchNorm runs over mel bins
        x = self.init_bn(x).transpose(1, 2)  # [N, 1, 64, 96]
        x = self.patch_embed(x)  # [N, dim, 4, 6]
        x = x + self.time_pos_embed[..., : x.shape[-1]] + self.freq_pos_embed
        x = x.flatten(2).transpose(1, 2)  # [N, 24, dim]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
