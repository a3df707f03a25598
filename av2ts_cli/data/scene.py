""""Sounding shapes": a continuous-time synthetic audio-visual scene (docs/data-and-metrics.md, 'Synthetic data:
sounding shapes').

A ``Scene`` holds two or more shapes of different categories drifting over a textured background, and for every
second which of them sound. Each category has its own form, colour and sound; the sounds sit in different bands
of the VGGish log-mel (whose 64 mel bins a CED patch grid splits into 4 rows of 16: about 125-750 Hz, 750-1830 Hz,
1830-3740 Hz and 3740-7500 Hz), so that they stay distinct after the front end even for a random, frozen audio
encoder. Only the sounding objects are in the labels, so which shape to segment can only be told from the audio.

    scene = Scene.random(np.random.default_rng(0), "ms3")
    rgb, labels = scene.render(t=1.9375, size=224)   # uint8 [H, W, 3]; int64 [H, W] AVSS class of sounding objects
    wave = scene.audio(16000)                          # float32 [duration * 16000]

Everything is a deterministic function of the parameters drawn in ``Scene.random``: the same generator state gives
the same pixels and samples. ``av2ts_cli.data.synth`` writes scenes in the official layouts; ``write_video_clip``
renders one as an MP4 with sound (for the demo clip and the predict tests) and returns its known masks.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from av2ts_cli import media
from av2ts_cli.avsbench import SAMPLE_RATE, frame_time
from av2ts_cli.classes import AVSS_CLASSES


@dataclass(frozen=True)
class Category:
    """A synthetic category: a form and colour on screen, a sound, and the real class names it stands for."""

    shape: str  # disc | triangle | star | square | cross | ring
    colour: tuple[int, int, int]
    sound: str  # rumble | siren | chirps | hiss | harmonic | clicks
    s4_category: str  # one of the 23 S4 categories
    avss_class: str  # one of the 70 AVSS classes

    @property
    def avss_index(self) -> int:
        return AVSS_CLASSES.index(self.avss_class)

    @property
    def name(self) -> str:
        return f"{self.sound} {self.shape}"


# Ordered so that any prefix is as easy as possible: the first four sounds each fill their own log-mel row.
CATEGORIES = (
    Category("disc", (225, 45, 40), "rumble", "helicopter", "helicopter"),  # band noise 150-600 Hz, rotor AM
    Category("triangle", (240, 205, 25), "siren", "ambulance_siren", "emergency-car"),  # 800-1450 Hz sweeping tone
    Category("star", (40, 190, 60), "chirps", "mynah_bird_singing", "bird"),  # 2-3.4 kHz up-chirps, ~4 per second
    Category("square", (45, 85, 235), "hiss", "chainsawing_trees", "hair-dryer"),  # band noise 4-7 kHz
    Category("cross", (215, 50, 205), "harmonic", "playing_violin", "violin"),  # 180-260 Hz, 10 harmonics, vibrato
    Category("ring", (30, 200, 215), "clicks", "playing_tabla", "tabla"),  # 1-7 kHz bursts, 5-7 per second
)
SINGLE_SOURCE = ("s4", "v1s")  # one category sounds throughout, silent distractors of other categories
MULTI_SOURCE = ("ms3", "v1m", "v2", "avss")  # a random non-empty subset of the objects sounds in each second


def sample_times(duration: int) -> list[float]:
    """AVSBench's frame times for a clip of ``duration`` seconds: (k - 1) + 15/16 s, k = 1..duration."""
    return [frame_time(k) for k in range(duration)]


@dataclass(frozen=True)
class SceneObject:
    category: int  # index into CATEGORIES
    radius: float  # in frame heights
    anchor: tuple[float, float]  # centre (x, y) around which the object drifts, in frame heights
    drift: tuple[float, float, float, float, float, float]  # amplitude x, y; frequency x, y (Hz); phase x, y
    spin: tuple[float, float]  # angle at t = 0, angular speed (rad/s)
    pulse: tuple[float, float, float]  # size change: relative amplitude, frequency (Hz), phase
    brightness: float  # colour multiplier of this instance
    sounding: tuple[bool, ...]  # per second
    pitch: float  # multiplies the frequencies of its sound
    rate: float  # multiplies the repetition rate of its sound
    gain: float  # loudness relative to the other objects

    def centre(self, t: float) -> tuple[float, float]:
        ax, ay, fx, fy, px, py = self.drift
        return (self.anchor[0] + ax * math.sin(2 * math.pi * fx * t + px),
                self.anchor[1] + ay * math.sin(2 * math.pi * fy * t + py))

    def size_at(self, t: float) -> float:
        amplitude, frequency, phase = self.pulse
        return self.radius * (1 + amplitude * math.sin(2 * math.pi * frequency * t + phase))

    def angle(self, t: float) -> float:
        return self.spin[0] + self.spin[1] * t


@dataclass(frozen=True)
class Scene:
    """A synthetic clip: objects (drawn in order, later ones in front), background texture, audio seed."""

    duration: int  # seconds
    objects: tuple[SceneObject, ...]
    background: tuple[float, ...]  # grey level, tint r, g, b, then 4 waves x (kx, ky, phase, speed, amplitude)
    texture: np.ndarray  # uint8 [24, 24] fine texture, blown up to the frame
    audio_seed: int

    # ---------------------------------------------------------------------------------------------- sampling
    @classmethod
    def random(cls, rng: np.random.Generator, subset: str = "s4", duration: int | None = None,
               categories: int = len(CATEGORIES), objects: int | None = None) -> Scene:
        """A random scene. subset: "s4"/"v1s" (one category sounds throughout, 1-2 silent distractors), "ms3",
        "v1m", "v2" or "avss" (2-3 objects, a random non-empty subset sounds each second, mostly one);
        duration: seconds (default 10 for v2, else 5); categories: how many of CATEGORIES to use (2-6, the
        first ones); objects: force the number of objects."""
        if subset not in SINGLE_SOURCE + MULTI_SOURCE:
            raise ValueError(f"unknown scene kind {subset!r}")
        if not 2 <= categories <= len(CATEGORIES):
            raise ValueError(f"categories must be 2..{len(CATEGORIES)}, got {categories}")
        duration = int(duration or (10 if subset == "v2" else 5))
        single = subset in SINGLE_SOURCE
        count = objects or int(rng.integers(2, 4))
        count = max(2, min(count, categories))
        kinds = [int(k) for k in rng.permutation(categories)[:count]]
        if single:
            sounding = [[i == 0] * duration for i in range(count)]  # the first drawn category sounds
        else:
            sounding = _sounding_subsets(rng, count, duration)
        radius_range = (0.17, 0.22) if count == 2 else (0.15, 0.19)
        radii = [float(rng.uniform(*radius_range)) for _ in range(count)]
        anchors = _spread_anchors(rng, radii)
        order = [int(i) for i in rng.permutation(count)]  # drawing order independent of who sounds
        items = []
        for i in order:
            items.append(SceneObject(
                category=kinds[i], radius=radii[i], anchor=anchors[i],
                drift=(float(rng.uniform(0.03, 0.07)), float(rng.uniform(0.03, 0.07)),
                       float(rng.uniform(0.08, 0.25)), float(rng.uniform(0.08, 0.25)),
                       float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi))),
                spin=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(-0.6, 0.6))),
                pulse=(float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.1, 0.4)), float(rng.uniform(0, 6.3))),
                brightness=float(rng.uniform(0.88, 1.08)),
                sounding=tuple(bool(s) for s in sounding[i]),
                pitch=float(rng.uniform(0.92, 1.08)), rate=float(rng.uniform(0.85, 1.15)),
                gain=float(rng.uniform(0.8, 1.2)),
            ))
        waves = []
        for _ in range(4):
            angle = rng.uniform(0, 2 * math.pi)
            frequency = rng.uniform(2.0, 9.0)  # cycles per frame height
            waves += [frequency * math.cos(angle), frequency * math.sin(angle), rng.uniform(0, 2 * math.pi),
                      rng.uniform(-0.6, 0.6), rng.uniform(6, 16)]
        grey = rng.uniform(85, 150)
        tint = rng.uniform(-12, 12, size=3)
        background = tuple(float(v) for v in (grey, *tint, *waves))
        texture = rng.integers(0, 256, size=(24, 24)).astype(np.uint8)
        return cls(duration, tuple(items), background, texture, int(rng.integers(2**31)))

    # ---------------------------------------------------------------------------------------------- queries
    def sounding_at(self, t: float) -> list[int]:
        """Indices (into ``objects``) of the objects sounding at time t."""
        second = min(max(int(math.floor(t)), 0), self.duration - 1)
        return [i for i, obj in enumerate(self.objects) if obj.sounding[second]]

    def categories(self) -> list[Category]:
        return [CATEGORIES[obj.category] for obj in self.objects]

    # ---------------------------------------------------------------------------------------------- pictures
    def render(self, t: float, size: int | tuple[int, int] = 224) -> tuple[np.ndarray, np.ndarray]:
        """The frame at time t: (RGB uint8 [H, W, 3], labels int64 [H, W]), labels = the AVSS class index of the
        objects sounding at t (0 elsewhere; ``labels > 0`` is the S4/MS3 binary mask). ``size``: side or (W, H)."""
        rgb, layers = self._draw(t, size)
        labels = np.zeros(rgb.shape[:2], dtype=np.int64)
        for i in self.sounding_at(t):
            labels[layers[i]] = CATEGORIES[self.objects[i].category].avss_index
        return rgb, labels

    def instance_map(self, t: float, size: int | tuple[int, int] = 224) -> np.ndarray:
        """int64 [H, W]: 1 + index of the object visible at each pixel, 0 for the background (sounding or not)."""
        _, layers = self._draw(t, size, colour=False)
        out = np.zeros(layers[0].shape if layers else _hw(size), dtype=np.int64)
        for i, visible in enumerate(layers):
            out[visible] = i + 1
        return out

    def _draw(self, t: float, size, colour: bool = True) -> tuple[np.ndarray | None, list[np.ndarray]]:
        h, w = _hw(size)
        x, y = _grid(h, w)
        shapes = [_shape_mask(CATEGORIES[obj.category].shape, x, y, obj.centre(t), obj.size_at(t), obj.angle(t))
                  for obj in self.objects]
        layers = []
        covered = np.zeros((h, w), dtype=bool)
        for mask in reversed(shapes):  # front to back: an object shows where nothing in front of it is
            layers.append(mask & ~covered)
            covered |= mask
        layers.reverse()
        if not colour:
            return None, layers
        image = self._background_image(t, h, w, x, y)
        for obj, mask in zip(self.objects, shapes, strict=True):
            cx, cy = obj.centre(t)
            angle = obj.angle(t)
            across = ((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)) / max(obj.size_at(t), 1e-6)
            shade = obj.brightness * (0.97 + 0.15 * np.clip(across, -1, 1))  # a soft gradient that turns with it
            colour_rgb = np.asarray(CATEGORIES[obj.category].colour, dtype=np.float32)
            image[mask] = shade[mask][:, None] * colour_rgb
        return np.clip(image + 0.5, 0, 255).astype(np.uint8), layers

    def _background_image(self, t: float, h: int, w: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        grey, tr, tg, tb, *waves = self.background
        level = np.full((h, w), grey, dtype=np.float32)
        for kx, ky, phase, speed, amplitude in zip(*[iter(waves)] * 5, strict=True):
            level += amplitude * np.cos(2 * math.pi * (kx * x + ky * y) + phase + speed * t).astype(np.float32)
        fine = cv2.resize(self.texture, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        level += (fine - 128.0) * 0.12
        return level[..., None] + np.asarray([tr, tg, tb], dtype=np.float32)

    # ------------------------------------------------------------------------------------------------ sound
    def audio(self, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """float32 [duration * sample_rate] mono in [-1, 1]: the sounding objects' sounds, switched per second
        with 10 ms ramps, over faint noise."""
        n = self.duration * sample_rate
        t = np.arange(n, dtype=np.float64) / sample_rate
        rng = np.random.default_rng(self.audio_seed)
        mix = 0.002 * rng.standard_normal(n)
        ramp = np.hanning(max(3, int(0.01 * sample_rate)))
        ramp /= ramp.sum()
        for index, obj in enumerate(self.objects):
            if not any(obj.sounding):
                continue
            gate = np.repeat(np.asarray(obj.sounding, dtype=np.float64), sample_rate)
            gate = np.convolve(np.pad(gate, len(ramp) // 2, mode="edge"), ramp, mode="valid")[:n]
            sound = _sound(CATEGORIES[obj.category].sound, t, sample_rate, obj,
                           np.random.default_rng([self.audio_seed, index]))
            mix += 0.1 * obj.gain * gate * sound
        peak = float(np.abs(mix).max())
        if peak > 0.99:  # rare pile-ups: turn the whole clip down rather than clip it
            mix *= 0.99 / peak
        return mix.astype(np.float32)


# ----------------------------------------------------------------------------------------------- scene sampling
def _sounding_subsets(rng: np.random.Generator, count: int, duration: int) -> list[list[bool]]:
    """Per object and second: a non-empty subset sounds each second; one source 60%, two 30%, three 10%."""
    weights = np.asarray([0.6, 0.3, 0.1][:count])
    weights /= weights.sum()
    table = [[False] * duration for _ in range(count)]
    for second in range(duration):
        k = int(rng.choice(len(weights), p=weights)) + 1
        for i in rng.choice(count, size=k, replace=False):
            table[int(i)][second] = True
    return table


def _spread_anchors(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    """Anchor points that keep the objects mostly apart (rejection sampling, bounded tries)."""
    anchors: list[tuple[float, float]] = []
    for r in radii:
        best, best_gap = None, -1.0
        for _ in range(200):
            p = (float(rng.uniform(r * 0.8, 1 - r * 0.8)), float(rng.uniform(r * 0.8, 1 - r * 0.8)))
            placed = zip(anchors, radii[: len(anchors)], strict=True)
            gap = min((math.dist(p, q) - r - rq for q, rq in placed), default=1.0)
            if gap > best_gap:
                best, best_gap = p, gap
            if gap >= 0.06:
                break
        anchors.append(best)
    return anchors


# ------------------------------------------------------------------------------------------------------ shapes
def _hw(size) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    w, h = size
    return int(h), int(w)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in frame heights, the unit square centred in the frame (wider frames show more sides)."""
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    x = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / h + 0.5
    xx, yy = np.meshgrid(x, y)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, centre: tuple[float, float], r: float,
                angle: float) -> np.ndarray:
    """bool [H, W]: the pixels inside a shape of circumradius ~r turned by ``angle``."""
    dx, dy = x - centre[0], y - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes at distance r/2 from the centre (equilateral, circumradius r)
            a = 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.5 * r
        return inside
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "star":
        phi = np.arctan2(v, u)
        boundary = r * (0.7 + 0.3 * np.cos(5 * phi))
        return u * u + v * v <= boundary * boundary
    raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------------------------------------------ sounds
def _bandpass(x: np.ndarray, sample_rate: int, low: float, high: float) -> np.ndarray:
    """FFT band-pass with raised-cosine edges (15% of the band edge frequency)."""
    spectrum = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1 / sample_rate)
    gain = np.clip((f - low * 0.85) / (low * 0.3), 0, 1) * np.clip((high * 1.15 - f) / (high * 0.3), 0, 1)
    gain = 0.5 - 0.5 * np.cos(np.pi * gain)
    return np.fft.irfft(spectrum * gain, n=len(x))


def _pulses(t: np.ndarray, rate: float, length: float, offset: float) -> np.ndarray:
    """Time since the start of the current pulse where a pulse is on, NaN elsewhere (pulses every 1/rate s)."""
    local = np.mod(t - offset, 1.0 / rate)
    return np.where(local < length, local, np.nan)


def _sound(kind: str, t: np.ndarray, sample_rate: int, obj: SceneObject, rng: np.random.Generator) -> np.ndarray:
    """One object's sound over the whole clip at RMS 1 (lower where its peaks would pass 5x the RMS)."""
    p, rate = obj.pitch, obj.rate
    if kind == "rumble":  # band noise 150-600 Hz, amplitude-modulated like a rotor
        wave = _bandpass(rng.standard_normal(len(t)), sample_rate, 150 * p, 600 * p)
        wave *= 0.55 + 0.45 * np.abs(np.sin(math.pi * 11 * rate * t))
    elif kind == "siren":  # a tone sweeping 800-1450 Hz about once a second
        f = 1100 * p + 300 * np.sin(2 * math.pi * 0.9 * rate * t + rng.uniform(0, 2 * math.pi))
        phase = 2 * math.pi * np.cumsum(f) / sample_rate
        wave = np.sin(phase) + 0.15 * np.sin(2 * phase)
    elif kind == "chirps":  # short up-sweeps 2.0 -> 3.4 kHz, ~4 per second
        length = 0.11
        tau = _pulses(t, 4.2 * rate, length, rng.uniform(0, 0.2))
        on = ~np.isnan(tau)
        tau = np.nan_to_num(tau)
        f0, f1 = 2000 * p, 3400 * p
        phase = 2 * math.pi * (f0 * tau + (f1 - f0) * tau * tau / (2 * length))
        wave = np.where(on, np.sin(math.pi * tau / length) ** 2 * np.sin(phase), 0.0)
    elif kind == "hiss":  # band noise 4-7 kHz with a slow swell
        wave = _bandpass(rng.standard_normal(len(t)), sample_rate, 4000 * p, 7000)
        wave *= 0.8 + 0.2 * np.sin(2 * math.pi * 0.5 * rate * t)
    elif kind == "harmonic":  # a bowed-string-like tone: 180-260 Hz, 10 harmonics, vibrato
        f0 = 220 * p * (1 + 0.015 * np.sin(2 * math.pi * 5.5 * rate * t))
        phase = 2 * math.pi * np.cumsum(f0) / sample_rate
        wave = sum(np.sin(k * phase) / k for k in range(1, 11))
    elif kind == "clicks":  # broadband (1-7 kHz) decaying bursts, ~6 per second
        tau = _pulses(t, 6.0 * rate, 0.08, rng.uniform(0, 0.15))
        envelope = np.where(np.isnan(tau), 0.0, np.exp(-np.nan_to_num(tau) / 0.012))
        wave = _bandpass(rng.standard_normal(len(t)) * envelope, sample_rate, 1000, 7000)
    else:
        raise ValueError(f"unknown sound {kind!r}")
    level = max(float(np.sqrt(np.mean(wave * wave))), float(np.abs(wave).max()) / 5, 1e-9)  # tame spiky sounds
    return wave / level


# ------------------------------------------------------------------------------------------------------- video
@dataclass(frozen=True)
class ClipTruth:
    """What ``write_video_clip`` knows about the clip it wrote."""

    path: Path
    fps: float
    times: tuple[float, ...]  # AVSBench sample times (k - 1) + 15/16 s
    frame_indices: tuple[int, ...]  # the video frame shown at each sample time
    labels: np.ndarray  # int64 [N, H, W] AVSS class indices of the sounding objects in those frames

    @property
    def masks(self) -> np.ndarray:
        """bool [N, H, W]: the S4/MS3 binary masks (any sounding object)."""
        return self.labels > 0


def write_video_clip(scene: Scene, path: str | os.PathLike, fps: float = 25.0, size: int | tuple[int, int] = 224,
                     audio: bool = True) -> ClipTruth:
    """Render ``scene`` as an H.264 MP4 (frame i at time i / fps) with its sound as the audio track, atomically;
    return the labels of the frames shown at the AVSBench sample times."""
    path = Path(path)
    count = int(round(scene.duration * fps))
    frames = (scene.render(i / fps, size)[0] for i in range(count))
    with tempfile.TemporaryDirectory(prefix="av2ts-scene-") as folder:
        wav = None
        if audio:
            wav = media.write_wav(Path(folder) / "audio.wav", scene.audio(SAMPLE_RATE), SAMPLE_RATE)
        media.encode_video(frames, path, fps, audio_from=wav)
    times = tuple(sample_times(scene.duration))
    indices = tuple(min(int(math.floor(t * fps + 1e-9)), count - 1) for t in times)
    labels = np.stack([scene.render(i / fps, size)[1] for i in indices])
    return ClipTruth(path, float(fps), times, indices, labels)
