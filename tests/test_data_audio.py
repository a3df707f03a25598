"""Audio of a clip (av2ts_cli/data/audio.py): WAV reading, resampling, the log-mel cache, log-mel pickles and
the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from av2ts_cli.data.audio import (
    LogMelCache,
    fit_examples,
    load_wave_16k,
    read_log_mel_pickle,
    read_wav,
    write_log_mel_pickle,
)
from av2ts_cli.errors import DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AV2TS_CACHE", str(tmp_path / "cache"))


def write_pcm(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """samples: [S] or [S, C] integers of ``width`` bytes."""
    samples = samples.reshape(len(samples), -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 3:
            data = samples.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        else:
            data = samples.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes()
        w.writeframes(data)
    return path


def test_wav_reading_scales_like_vggish(tmp_path):
    stereo = np.array([[16384, 0], [-32768, -32768], [100, 300]])
    wave_, rate = read_wav(write_pcm(tmp_path / "s.wav", stereo, 16000))
    assert rate == 16000 and wave_.tolist() == pytest.approx([0.25, -1.0, 200 / 32768])  # int16 / 32768, mean
    assert read_wav(write_pcm(tmp_path / "u8.wav", np.array([128, 255, 0]), 16000, 1))[0].tolist() == \
        pytest.approx([0, 127 / 128, -1])
    assert read_wav(write_pcm(tmp_path / "i24.wav", np.array([-(1 << 23), 1 << 22]), 16000, 3))[0].tolist() == \
        pytest.approx([-1, 0.5])


def test_truncated_and_foreign_wavs_are_errors(tmp_path):
    good = write_pcm(tmp_path / "good.wav", np.zeros(1000), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(DataError, match="cut.wav: truncated WAV"):
        read_wav(cut)
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    with pytest.raises(DataError, match="text.wav: not a WAV"):
        read_wav(text)
    with pytest.raises(DataError, match="missing audio file"):
        read_wav(tmp_path / "none.wav")


def test_other_sample_rates_are_resampled_with_one_warning_per_file(tmp_path, capsys):
    t = np.arange(48000) / 48000
    path = write_pcm(tmp_path / "48k.wav", np.round(8000 * np.sin(2 * np.pi * 1000 * t)), 48000)
    first = load_wave_16k(path)
    second = load_wave_16k(path)
    assert first.shape == (16000,) and torch.equal(first, second)
    spectrum = torch.fft.rfft(first).abs()
    assert int(spectrum.argmax()) == 1000  # 1 kHz survives: 1 Hz per bin for 1 s at 16 kHz
    err = capsys.readouterr().err
    assert err.count("resampled to 16000 Hz") == 1 and "48k.wav" in err


def test_log_mel_cache_on_disk_is_keyed_by_size_and_mtime(tmp_path):
    t = np.arange(32000) / 16000
    path = write_pcm(tmp_path / "a.wav", np.round(8000 * np.sin(2 * np.pi * 440 * t)), 16000)
    cache = LogMelCache(tmp_path / "cache")
    first = cache.examples(path)
    assert first.shape == (2, 96, 64) and len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert torch.equal(LogMelCache(tmp_path / "cache").examples(path), first)  # read back from disk
    write_pcm(path, np.round(8000 * np.sin(2 * np.pi * 2000 * t)), 16000)
    os.utime(path, ns=(1, 1))
    assert not torch.equal(LogMelCache(tmp_path / "cache").examples(path), first)
    assert not list((tmp_path / "cache").rglob("*.partial*"))


def test_log_mel_pickles_round_trip_and_official_style_pickles_load(tmp_path):
    examples = torch.randn(5, 96, 64)
    write_log_mel_pickle(tmp_path / "ours.pkl", examples)
    assert torch.equal(read_log_mel_pickle(tmp_path / "ours.pkl"), examples)
    with open(tmp_path / "official.pkl", "wb") as f:  # what AVSBench did: pickle.dump of a grad-tracking tensor
        pickle.dump(examples.unsqueeze(1).requires_grad_(True), f)
    assert torch.equal(read_log_mel_pickle(tmp_path / "official.pkl"), examples)
    torch.save(examples.unsqueeze(1), tmp_path / "saved.pkl")
    assert torch.equal(read_log_mel_pickle(tmp_path / "saved.pkl"), examples)
    with open(tmp_path / "numpy.pkl", "wb") as f:
        pickle.dump(examples.unsqueeze(1).numpy(), f)
    assert torch.equal(read_log_mel_pickle(tmp_path / "numpy.pkl"), examples)
    torch.save(torch.zeros(3, 4), tmp_path / "shape.pkl")
    with pytest.raises(DataError, match=r"shape.pkl: log-mel of shape \[3, 4\]"):
        read_log_mel_pickle(tmp_path / "shape.pkl")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(DataError, match=r"evil.pkl: refusing to unpickle the global (posix|os)\.system"):
        read_log_mel_pickle(evil)
    assert not marker.exists()
    nested = tmp_path / "nested.pkl"  # deeper inside a container
    nested.write_bytes(pickle.dumps({"log_mel": [torch.zeros(1), _Exploit(marker)]}))
    with pytest.raises(DataError, match="nested.pkl: refusing"):
        read_log_mel_pickle(nested)
    archive = tmp_path / "archive.pkl"  # a torch.save zip goes through torch's weights-only loader
    torch.save({"log_mel": _Exploit(marker)}, archive)
    with pytest.raises(DataError, match="archive.pkl: refused"):
        read_log_mel_pickle(archive)
    assert not marker.exists()


def test_examples_are_cut_or_padded_by_repeating_the_last_one():
    examples = torch.arange(2 * 96 * 64, dtype=torch.float32).reshape(2, 96, 64)
    padded = fit_examples(examples, 4)
    assert padded.shape == (4, 96, 64) and torch.equal(padded[:2], examples)
    assert torch.equal(padded[2], examples[1]) and torch.equal(padded[3], examples[1])
    assert torch.equal(fit_examples(examples, 1), examples[:1])
    assert fit_examples(torch.zeros(0, 96, 64), 3).shape == (3, 96, 64)  # no audio at all: silence examples
