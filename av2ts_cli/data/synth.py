"""``av2ts data synth``: synthetic "sounding shapes" data in the exact official layouts (docs/data-and-metrics.md,
'Synthetic data: sounding shapes').

The output folder becomes a dataset root of the seed layout: S4 goes to ``AVSBench_object/Single-source``, MS3 to
``AVSBench_object/Multi-sources``, AVSS to ``AVSBench_semantic`` (so several subsets can share one root, and
``--data`` may name the root or the subset folder). Every file is what the official data has at that path:

- S4: ``s4_meta_data.csv`` (name, start, category, split); ``s4_data/visual_frames/<split>/<category>/<video>/
  <video>_<k>.png`` (224 x 224 RGB); ``gt_masks`` (0/255 grey PNGs; training videos only the first frame);
  ``audio_wav/<split>/<category>/<video>.wav`` (16 kHz mono 16-bit, 5 s); ``audio_log_mel/...pkl`` (a pickled
  [5, 1, 96, 64] float32 tensor of the WAV's VGGish log-mel); ``pre_SAM_mask/.../<frame>_mask_color.png``.
- MS3: ``ms3_meta_data.csv`` (name, split); ``ms3_data/visual_frames/<video>/<video>.mp4_<k>.png``;
  ``gt_masks/<split>/<video>/<video>_<k>.png`` (all frames); ``audio_wav/<split>/<video>.wav``; ``audio_log_mel``;
  ``pre_SAM_mask/<video>/<video>.mp4_<k>_mask_color.png``.
- AVSS: ``metadata.csv`` (vid, uid, s_min, s_sec, a_obj, split, label), ``label2idx.json`` (the 71 official
  classes); ``<label>/<uid>/frames/<i>.jpg``, ``labels_semantic/<i>.png`` (class indices), ``labels_rgb/<i>.png``
  (palette colours), ``audio.wav``; v1s clips (5 s, S4-like, training: first frame labelled), v1m (5 s, MS3-like),
  v2 (10 s); maskiges under ``pre_SAM_mask/AVSBench_semantic/<label>/<uid>/processed_frames/<i>_mask_color.png``.

Frames are rendered at the AVSBench sample times (k - 1) + 15/16 s. Each video draws from its own generator seeded
by (seed, subset, split, index), so the same seed writes the same bytes, and a split's videos do not depend on the
sizes of the other splits. The subset folder is built beside its final place and renamed into it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from av2ts_cli import files, locks
from av2ts_cli.avsbench import SAMPLE_RATE
from av2ts_cli.classes import AVSS_CLASSES, avss_palette, label2idx
from av2ts_cli.data.audio import log_mel_examples, write_log_mel_pickle
from av2ts_cli.data.images import write_jpeg, write_png
from av2ts_cli.data.layout import AVSS_SETS, DATA_FOLDERS, LABEL2IDX, METADATA, SPLITS, check_subset, subset_folder_in
from av2ts_cli.data.scene import CATEGORIES, Scene, sample_times, write_video_clip
from av2ts_cli.errors import DataError, UsageError
from av2ts_cli.media import write_wav
from av2ts_cli.memory import available_mib

DEFAULT_VIDEOS = {"s4": 48, "ms3": 32, "avss": 36}  # training videos; val and test get a quarter each (min 2)
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # YouTube id characters
SUBSET_CODES = {"s4": 4, "ms3": 3, "avss": 71}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# ADE20K's first palette colours: Semantic-SAM maskiges paint segment k (by area, smallest first) with colour k
MASKIGE_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7)], dtype=np.uint8)


@dataclass
class SynthOptions:
    """What ``synthesize`` writes. ``counts``: videos per split; ``categories``: how many of the six sounding-shape
    categories appear (the first ones; fewer is easier); ``size``: frame side; ``maskiges``: also the Siam
    encoder's maskiges; ``log_mel``: also the S4/MS3 ``audio_log_mel`` pickles."""

    subset: str
    counts: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    categories: int = len(CATEGORIES)
    size: int = 224
    maskiges: bool = True
    log_mel: bool = True

    def __post_init__(self) -> None:
        check_subset(self.subset)
        train = self.counts.get("train", DEFAULT_VIDEOS[self.subset])
        default_eval = max(2, train // 4)
        self.counts = {"train": train, "val": self.counts.get("val", default_eval),
                       "test": self.counts.get("test", default_eval)}
        if any(n < 0 for n in self.counts.values()) or not any(self.counts.values()):
            raise UsageError(f"video counts must be >= 0 and not all 0, got {self.counts}")
        if not 2 <= self.categories <= len(CATEGORIES):
            raise UsageError(f"--categories must be 2..{len(CATEGORIES)}, got {self.categories}")
        if self.size < 32:
            raise UsageError(f"--size must be at least 32, got {self.size}")


def synthesize(out: str | os.PathLike, options: SynthOptions, force: bool = False,
               on_video: Callable[[str, int], None] | None = None) -> dict:
    """Write the subset under the dataset root ``out``; returns {"subset", "root", "splits": {split: videos},
    "frames", "masks", "seed", "categories"}. ``on_video(split, index)`` is called after each video (progress)."""
    out = Path(out)
    target = subset_folder_in(out, options.subset)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one synth at a time into a dataset root; under its lock, what a killed synth left beside the subset goes
    with locks.held(target.parent, label=target.parent):
        locks.sweep_temps(target.parent, recursive=False, stem=target.name)
        if target.exists() and not force:
            raise DataError(target, "already exists (use --force to replace it)")
        with files.atomic_folder(target) as temp:
            writer = {"s4": _S4Writer, "ms3": _MS3Writer, "avss": _AVSSWriter}[options.subset](temp, options)
            for split in SPLITS:
                for index in range(options.counts[split]):
                    writer.add(split, index)
                    if on_video is not None:
                        on_video(split, index)
            writer.finish()
    return {"subset": options.subset, "root": str(target), "splits": dict(options.counts), "frames": writer.frames,
            "masks": writer.masks, "seed": options.seed, "categories": [c.name for c in
                                                                       CATEGORIES[: options.categories]]}


# --------------------------------------------------------------------------------------------------- writers
class _Writer:
    subset = ""

    def __init__(self, root: Path, options: SynthOptions):
        self.root, self.options = root, options
        root.mkdir(parents=True, exist_ok=True)  # atomic_folder made it
        self.rows: list[list[str]] = []
        self.frames = self.masks = 0
        self.names: set[str] = set()

    def rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed, SUBSET_CODES[self.subset], SPLIT_CODES[split], index])

    def video_id(self, rng: np.random.Generator) -> str:
        while True:  # ids are unique within a subset
            name = "".join(ID_ALPHABET[i] for i in rng.integers(len(ID_ALPHABET), size=11))
            if name not in self.names and name[0] != "-":
                self.names.add(name)
                return name

    def scene(self, rng: np.random.Generator, kind: str) -> Scene:
        return Scene.random(rng, kind, categories=self.options.categories)

    def frames_of(self, scene: Scene):
        """Per sample time: (rgb, labels, maskige)."""
        size = self.options.size
        for t in sample_times(scene.duration):
            rgb, labels = scene.render(t, size)
            yield rgb, labels, (_maskige(scene.instance_map(t, size)) if self.options.maskiges else None)

    def write_audio(self, scene: Scene, wav: Path, pkl: Path | None) -> None:
        wave = scene.audio(SAMPLE_RATE)
        wav.parent.mkdir(parents=True, exist_ok=True)
        write_wav(wav, wave, SAMPLE_RATE)
        if pkl is not None:
            quantised = np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
            pkl.parent.mkdir(parents=True, exist_ok=True)
            write_log_mel_pickle(pkl, log_mel_examples(torch.from_numpy(quantised), scene.duration))

    def write_csv(self, header: list[str]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(self.rows)
        (self.root / METADATA[self.subset]).write_text(buffer.getvalue(), encoding="utf-8")


class _S4Writer(_Writer):
    subset = "s4"

    def add(self, split: str, index: int) -> None:
        rng = self.rng(split, index)
        name = self.video_id(rng)
        scene = self.scene(rng, "s4")
        category = scene.categories()[scene.sounding_at(0)[0]].s4_category
        data = self.root / DATA_FOLDERS["s4"]
        key = Path(split, category, name)
        for k, (rgb, labels, maskige) in enumerate(self.frames_of(scene), start=1):
            write_png(data / "visual_frames" / key / f"{name}_{k}.png", rgb)
            self.frames += 1
            if split != "train" or k == 1:
                write_png(data / "gt_masks" / key / f"{name}_{k}.png", _binary(labels))
                self.masks += 1
            if maskige is not None:
                write_png(data / "pre_SAM_mask" / key / f"{name}_{k}_mask_color.png", maskige)
        self.write_audio(scene, data / "audio_wav" / split / category / f"{name}.wav",
                         data / "audio_log_mel" / split / category / f"{name}.pkl" if self.options.log_mel else None)
        self.rows.append([name, "0", category, split])

    def finish(self) -> None:
        self.write_csv(["name", "start", "category", "split"])


class _MS3Writer(_Writer):
    subset = "ms3"

    def add(self, split: str, index: int) -> None:
        rng = self.rng(split, index)
        name = self.video_id(rng)
        scene = self.scene(rng, "ms3")
        data = self.root / DATA_FOLDERS["ms3"]
        for k, (rgb, labels, maskige) in enumerate(self.frames_of(scene), start=1):
            write_png(data / "visual_frames" / name / f"{name}.mp4_{k}.png", rgb)
            write_png(data / "gt_masks" / split / name / f"{name}_{k}.png", _binary(labels))
            self.frames += 1
            self.masks += 1
            if maskige is not None:
                write_png(data / "pre_SAM_mask" / name / f"{name}.mp4_{k}_mask_color.png", maskige)
        self.write_audio(scene, data / "audio_wav" / split / f"{name}.wav",
                         data / "audio_log_mel" / split / f"{name}.pkl" if self.options.log_mel else None)
        self.rows.append([name, split])

    def finish(self) -> None:
        self.write_csv(["name", "split"])


class _AVSSWriter(_Writer):
    subset = "avss"

    def add(self, split: str, index: int) -> None:
        rng = self.rng(split, index)
        label = tuple(AVSS_SETS)[index % len(AVSS_SETS)]  # v1s, v1m, v2 in turn: every split has all three
        vid = self.video_id(rng)
        start = int(rng.integers(0, 240))
        scene = self.scene(rng, label)
        uid = f"{vid}_{start * 1000}_{(start + scene.duration) * 1000}"
        folder = self.root / label / uid
        only_first = label == "v1s" and split == "train"
        palette = avss_palette()
        for i, (rgb, labels, maskige) in enumerate(self.frames_of(scene)):
            write_jpeg(folder / "frames" / f"{i}.jpg", rgb)
            self.frames += 1
            if i == 0 or not only_first:
                write_png(folder / "labels_semantic" / f"{i}.png", labels.astype(np.uint8))
                write_png(folder / "labels_rgb" / f"{i}.png", palette[labels])
                self.masks += 1
            if maskige is not None:
                write_png(self.root / "pre_SAM_mask" / "AVSBench_semantic" / label / uid / "processed_frames"
                          / f"{i}_mask_color.png", maskige)
        self.write_audio(scene, folder / "audio.wav", None)
        sounding = sorted({CATEGORIES[scene.objects[i].category].avss_class
                           for t in range(scene.duration) for i in scene.sounding_at(t)})
        self.rows.append([vid, uid, str(start // 60), str(start % 60), " ".join(sounding), split, label])

    def finish(self) -> None:
        self.write_csv(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
        (self.root / LABEL2IDX).write_text(json.dumps(label2idx(AVSS_CLASSES), indent=1) + "\n", encoding="utf-8")


def _binary(labels: np.ndarray) -> np.ndarray:
    return np.where(labels > 0, 255, 0).astype(np.uint8)


def _maskige(instances: np.ndarray) -> np.ndarray:
    """A Semantic-SAM-style maskige: visible objects numbered by area (smallest first, from 1), background 0,
    painted with the ADE20K palette."""
    ids = np.unique(instances[instances > 0])
    areas = [(int((instances == i).sum()), int(i)) for i in ids]
    lookup = np.zeros(int(instances.max()) + 1, dtype=np.int64)
    for rank, (_, i) in enumerate(sorted(areas), start=1):
        lookup[i] = min(rank, len(MASKIGE_PALETTE) - 1)
    return MASKIGE_PALETTE[lookup[instances]]


# -------------------------------------------------------------------------------------------------- one clip
CLIP_KINDS = ("s4", "ms3")


def clip_masks_folder(video: str | os.PathLike) -> Path:
    """Where ``write_clip`` puts a clip's known masks: ``<stem>-masks/`` beside the video."""
    video = Path(video)
    return video.with_name(f"{video.stem}-masks")


# Peak memory of write_clip per pixel of the frame side squared: 17.6 GB for a 20000 px clip (killed there), about
# 15 copies of one RGB frame in flight (the scene's float layers, the frame, the encoder's pipe buffer)
_CLIP_BYTES_PER_PIXEL = 3 * 15


def _check_clip_size(size: int) -> None:
    """A UsageError before any work when a clip of ``size`` px cannot fit in the free memory."""
    free = available_mib()
    needed = size * size * _CLIP_BYTES_PER_PIXEL / 2**20
    if free is not None and needed > free:
        fits = int((free * 2**20 / _CLIP_BYTES_PER_PIXEL) ** 0.5)
        raise UsageError(f"--size {size}: a clip that large needs about {needed:.0f} MB, {free:.0f} MB are free; "
                         f"at most --size {fits}")


def write_clip(out: str | os.PathLike, *, kind: str = "s4", seconds: int = 15, size: int = 256, fps: float = 25.0,
               seed: int = 0, categories: int = len(CATEGORIES), force: bool = False) -> dict:
    """One synthetic clip to run ``predict`` on (the bundled demo is one): ``out``, an H.264 MP4 with its sound, and
    its known masks in ``clip_masks_folder(out)``: 0/255 PNGs at the AVSBench sample times k + 15/16 s, named as
    ``predict`` names its masks (``NNNNNN.png``), plus ``truth.json`` (times, video frame indices, sounding
    categories). kind: "s4" (one object sounds throughout) or "ms3" (the sounding objects change each second)."""
    out = Path(out)
    if kind not in CLIP_KINDS:
        raise UsageError(f"--kind must be one of {', '.join(CLIP_KINDS)}, got {kind!r}")
    if not 2 <= categories <= len(CATEGORIES) or seconds < 1 or size < 32 or fps <= 0:
        raise UsageError(f"a clip needs 2-{len(CATEGORIES)} categories, at least 1 s, 32 px and fps > 0")
    _check_clip_size(size)
    masks = clip_masks_folder(out)
    for path in (out, masks):
        if path.exists() and not force:
            raise DataError(path, "already exists (use --force to replace it)")
    scene = Scene.random(np.random.default_rng([seed, 7919]), kind, duration=seconds, categories=categories)
    with files.atomic_folder(masks) as temp:
        truth = write_video_clip(scene, out, fps=fps, size=size)
        for k, labels in enumerate(truth.labels):
            write_png(temp / f"{k:06d}.png", _binary(labels))
        names = [category.name for category in scene.categories()]
        doc = {"video": out.name, "kind": kind, "seed": seed, "fps": truth.fps, "size": size, "times": truth.times,
               "frame_indices": truth.frame_indices,
               "sounding": [[names[i] for i in scene.sounding_at(t)] for t in truth.times]}
        (temp / "truth.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return {"video": str(out), "masks": str(masks), "seconds": seconds, "size": size, "fps": truth.fps,
            "sounding": doc["sounding"]}
