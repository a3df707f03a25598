"""Audio of a dataset clip: WAV -> 16 kHz mono -> VGGish log-mel examples, cached; or a precomputed log-mel pickle.

WAVs are read with our own RIFF reader (PCM 8/16/24/32-bit and IEEE float; int16 / 32768 as VGGish does, channels
averaged). Another sample rate is resampled to 16 kHz (``torchaudio.functional.resample``) with one warning per file.
The examples come from ``av2ts_cli.model.audio.waveform_to_examples``, so training, evaluation and prediction share
one front end. Results are cached in memory and on disk under the av2ts cache folder, keyed by the WAV's absolute
path, size and modification time (never inside the dataset folder).

``audio_log_mel/*.pkl`` files (AVSBench pickles a torch tensor [N, 1, 96, 64]) are read by a restricted unpickler
that rebuilds tensors and numpy arrays only; any other global is refused before it is touched.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from av2ts_cli import files
from av2ts_cli.avsbench import EXAMPLE_FRAMES, MEL_BANDS, SAMPLE_RATE, pad_by_repeating_last
from av2ts_cli.config import cache_root
from av2ts_cli.console import warn
from av2ts_cli.errors import DataError
from av2ts_cli.model.audio import waveform_to_examples
from av2ts_cli.safe_pickle import NUMPY_PICKLE_GLOBALS, NumpyOnlyUnpickler

CACHE_VERSION = 1  # bump when the front end changes: old cache entries are then never read
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_warned_resampled: set[str] = set()


# ---------------------------------------------------------------------------------------------------- WAV files
class WavInfo(collections.namedtuple("WavInfo", "sample_rate channels bits float_samples frames data_offset")):
    """What a WAV header says; ``frames`` is the sample count per channel the file really holds."""


def read_wav_info(path: str | os.PathLike) -> WavInfo:
    """Parse a WAV header (RIFF chunks up to ``data``); a file cut short of its declared data is an error."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            riff = f.read(12)
            if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
                raise DataError(path, "not a WAV file (no RIFF/WAVE header)")
            fmt = None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    raise DataError(path, "unreadable WAV: no data chunk")
                chunk, length = head[:4], struct.unpack("<I", head[4:])[0]
                if chunk == b"fmt ":
                    fmt = f.read(length)
                    if len(fmt) < 16:
                        raise DataError(path, "unreadable WAV: short fmt chunk")
                    f.seek(length % 2, 1)
                elif chunk == b"data":
                    if fmt is None:
                        raise DataError(path, "unreadable WAV: data chunk before fmt chunk")
                    offset = f.tell()
                    break
                else:
                    f.seek(length + length % 2, 1)
    except FileNotFoundError:
        raise DataError(path, "missing audio file") from None
    except OSError as err:
        raise DataError(path, f"unreadable WAV: {err.strerror or err}") from None
    tag, channels, rate, _, block, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if tag not in (_PCM, _FLOAT) or channels < 1 or rate < 1 or bits not in (8, 16, 24, 32, 64):
        raise DataError(path, f"unsupported WAV format (format tag {tag}, {channels} channels, {bits}-bit)")
    if tag == _FLOAT and bits not in (32, 64):
        raise DataError(path, f"unsupported WAV format ({bits}-bit float)")
    available = size - offset
    if length not in (0, 0xFFFFFFFF) and length > available:  # 0 / 0xFFFFFFFF: a streamed file, size unknown
        raise DataError(path, f"truncated WAV: the header declares {length} bytes of samples, {available} present")
    data_bytes = available if length in (0, 0xFFFFFFFF) else length
    return WavInfo(rate, channels, bits, tag == _FLOAT, data_bytes // block, offset)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(wave float32 [S] mono in [-1, 1], sample rate) of a WAV file."""
    path = Path(path)
    info = read_wav_info(path)
    width = info.bits // 8
    count = info.frames * info.channels
    try:
        with open(path, "rb") as f:
            f.seek(info.data_offset)
            raw = f.read(count * width)
    except OSError as err:
        raise DataError(path, f"unreadable WAV: {err.strerror or err}") from None
    if info.float_samples:
        samples = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: sign-extend three little-endian bytes into an int32
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        samples = (np.where(value >= 1 << 23, value - (1 << 24), value) / float(1 << 23)).astype(np.float32)
    else:
        samples = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float32) / float(1 << (info.bits - 1))
    samples = samples.reshape(-1, info.channels)
    wave = samples[:, 0] if info.channels == 1 else samples.mean(axis=1)
    return np.ascontiguousarray(wave, dtype=np.float32), info.sample_rate


def load_wave_16k(path: str | os.PathLike) -> torch.Tensor:
    """A WAV as a float32 [S] tensor at 16 kHz mono; another rate is resampled, with one warning per file."""
    wave, rate = read_wav(path)
    tensor = torch.from_numpy(wave)
    if rate != SAMPLE_RATE:
        key = str(Path(path).resolve())
        if key not in _warned_resampled:
            _warned_resampled.add(key)
            warn(f"{path}: sample rate {rate} Hz, resampled to {SAMPLE_RATE} Hz")
        import torchaudio.functional as AF  # local: 1.7 s to import, needed only for a WAV at another rate

        tensor = AF.resample(tensor, rate, SAMPLE_RATE)
    return tensor


# -------------------------------------------------------------------------------------------------- log-mel cache
@contextlib.contextmanager
def single_thread():
    """torch on one thread for small ops: on a busy machine a second intra-op thread makes a 5 s log-mel up to 20x
    slower (DataLoader workers run single-threaded anyway)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def log_mel_examples(wave: torch.Tensor, num_examples: int | None = None) -> torch.Tensor:
    """``waveform_to_examples`` on one thread: [S] 16 kHz -> [N, 96, 64] float32."""
    with single_thread():
        return waveform_to_examples(wave, num_examples).contiguous()


def default_cache_folder() -> Path:
    return cache_root() / "log-mel"


class LogMelCache:
    """VGGish log-mel examples of WAV files, kept in memory (the last ``memory_items``) and as ``.npy`` files under
    ``folder`` (None: memory only). Entries are keyed by absolute path, size and mtime, so an edited WAV is
    recomputed. Picklable (DataLoader workers each get a copy and share the disk cache)."""

    def __init__(self, folder: str | os.PathLike | None = "default", memory_items: int = 512):
        self.folder = default_cache_folder() if folder == "default" else (Path(folder) if folder else None)
        self.memory_items = memory_items
        self._memory: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def examples(self, wav: str | os.PathLike) -> torch.Tensor:
        """[N, 96, 64] float32 log-mel examples of the whole WAV (N = complete 0.96 s examples)."""
        wav = Path(wav)
        try:
            stat = wav.stat()
        except OSError:
            raise DataError(wav, "missing audio file") from None
        key = hashlib.sha1(f"{CACHE_VERSION}|{wav.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        examples = self._read_disk(key)
        if examples is None:
            examples = log_mel_examples(load_wave_16k(wav))
            self._write_disk(key, examples)
        self._memory[key] = examples
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return examples

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def _read_disk(self, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return None
        try:
            array = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.dtype != np.float32 or array.ndim != 3 or array.shape[1:] != (EXAMPLE_FRAMES, MEL_BANDS):
            return None
        return torch.from_numpy(array)

    def _write_disk(self, key: str, examples: torch.Tensor) -> None:
        """Best effort: a read-only or full cache folder only costs recomputation."""
        if self.folder is None:
            return
        with contextlib.suppress(OSError), files.atomic_open(self._path(key), "wb") as f:
            np.save(f, examples.numpy(), allow_pickle=False)


def fit_examples(examples: torch.Tensor, count: int) -> torch.Tensor:
    """[N, 96, 64] -> exactly [count, 96, 64]: cut, or padded by repeating the last example (AVSBench S4/MS3)."""
    if examples.shape[0] == 0:
        return waveform_to_examples(torch.zeros(0), num_examples=count)
    if examples.shape[0] >= count:
        return examples[:count]
    return torch.stack(pad_by_repeating_last(list(examples), count))


# ------------------------------------------------------------------------------------------------ log-mel pickles
_TORCH_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "from_numpy"),
}
_TORCH_DTYPES = {"float32", "float64", "float16", "bfloat16"}


def _storage_from_bytes(data: bytes):
    """What ``torch.storage._load_from_bytes`` does, through torch's own weights-only loader."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _TensorOnlyUnpickler(NumpyOnlyUnpickler):
    """The converters' numpy-only unpickler, plus what a pickled torch tensor needs; every other global is
    refused before it is touched."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _TORCH_GLOBALS or (module == "torch" and name in _TORCH_DTYPES):
            return getattr(importlib.import_module(module), name)
        if (module, name) in NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(self.path, f"refusing to unpickle the global {module}.{name}: only torch tensors and numpy "
                                   "arrays are accepted from log-mel pickles")

    def persistent_load(self, pid):
        raise DataError(self.path, "refusing a pickle with persistent ids (not a plain pickled tensor)")


def read_log_mel_pickle(path: str | os.PathLike) -> torch.Tensor:
    """A log-mel pickle -> float32 [N, 96, 64] (``[N, 1, 96, 64]`` squeezed; a ``torch.save`` zip file works too)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "missing log-mel pickle")
    try:
        if zipfile.is_zipfile(path):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                obj = _TensorOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refusing a global
        raise DataError(path, f"refused: it holds more than tensors ({str(err).splitlines()[0]})") from None
    except (OSError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DataError(path, f"unreadable pickle: {type(err).__name__}: {err}") from None
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        obj = torch.from_numpy(np.array(obj, dtype=np.float32))
    if not isinstance(obj, torch.Tensor):
        raise DataError(path, f"holds a {type(obj).__name__}, expected a tensor [N, 1, 96, 64]")
    tensor = obj.detach().float()
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.dim() != 3 or tensor.shape[1:] != (EXAMPLE_FRAMES, MEL_BANDS):
        raise DataError(path, f"log-mel of shape {list(obj.shape)}, expected [N, 1, {EXAMPLE_FRAMES}, "
                              f"{MEL_BANDS}]")
    return tensor.contiguous()


def write_log_mel_pickle(path: str | os.PathLike, examples: torch.Tensor) -> None:
    """Pickle [N, 96, 64] examples as a [N, 1, 96, 64] float32 tensor, atomically and byte-for-byte reproducibly.

    ``pickle.dump(tensor)`` (what AVSBench did) embeds a ``torch.save`` archive carrying a random serialization id,
    so equal tensors give different files. We write the pickle ``torch.from_numpy(<float32 array>)`` instead (protocol
    2, assembled from the array's own pickle): any ``pickle.load`` returns the same tensor, no random bytes inside.
    """
    path = Path(path)
    array = np.ascontiguousarray(examples.detach().float().unsqueeze(1).cpu().numpy())
    body = pickle.dumps(array, protocol=2)  # PROTO 2, the array's opcodes, STOP (protocol 2 has no frames)
    assert body[:2] == b"\x80\x02" and body[-1:] == pickle.STOP
    call = pickle.GLOBAL + b"torch\nfrom_numpy\n"
    data = body[:2] + call + body[2:-1] + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
    files.write_bytes(path, data)
