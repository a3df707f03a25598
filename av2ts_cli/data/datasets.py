"""PyTorch datasets of the official AVSBench layouts: S4, MS3 and AVSS (docs/data-and-metrics.md, 'Dataset layouts').

An item is one clip (docs/data-and-metrics.md, 'Dataset items')::

    frames      uint8 [T, 3, S, S]    RGB, S = the model's input size
    audio       float32 [T, 96, 64]   one VGGish log-mel example per frame
    masks       int64 [T, h, w]       class indices, 255 = ignore / no label (S4/MS3: 0 background, 1 object);
                                      training: at S x S, after the augmentation; evaluation: at the label's own
                                      size (AVSS: 224 x 224, the official evaluation size)
    supervised  bool [T]              frames with a label
    maskiges    uint8 [T, 3, S, S]    only with ``maskiges=True`` (models with the Siam encoder)
    video       str                   the video's name (AVSS: uid)
    category    str                   S4: the clip's category (its metadata's category column); "" otherwise
    mask_paths  list of T str         each frame's label path relative to the split (the predictions' layout)

T is 5 for S4/MS3; for AVSS, evaluation gives all real frames (5 for v1s/v1m, 10 for v2) and training a window of
``clip_frames`` (5) frames, a random one for v2 clips (docs/model.md, 'Frames per clip'). S4 training clips (and AVSS
v1s ones)
have only their first frame labelled. Items are built with PIL/OpenCV and numpy, no per-pixel Python; the dataset
holds only paths and small caches, so it pickles into DataLoader workers. Use ``collate_clips`` as collate_fn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from av2ts_cli.avsbench import IGNORE_INDEX, subsets_compatible
from av2ts_cli.classes import AVSS_NUM_CLASSES, BINARY_CLASSES, avss_palette
from av2ts_cli.data.audio import LogMelCache, fit_examples, read_log_mel_pickle
from av2ts_cli.data.images import read_mask, read_rgb
from av2ts_cli.data.layout import (
    AVSS_COMBO_MASKIGES,
    FORM_384,
    FORM_STANDARD,
    MASK_RGB,
    Video,
    check_split,
    check_subset,
    form_for,
    list_videos,
    read_class_names,
    resolve_root,
)
from av2ts_cli.data.transforms import (
    ClipArrays,
    eval_transform,
    resize_images,
    square_short_side,
    train_transform,
    uncrop_centre,
)
from av2ts_cli.errors import DataError, UsageError

AVSS_EVAL_SIZE = (224, 224)  # AVSBench, AVSegFormer and COMBO score AVSS at 224 x 224 (nearest-resized labels)
AUDIO_SOURCES = ("auto", "wav", "pkl")


class AVSDataset(Dataset):
    """Clips of one split of an AVSBench subset.

    - data: the dataset root or the subset's folder (``layout.resolve_root``); input_size: the model's square input.
    - train: training items (labels at the input size, AVSS v2 windows; default: split == "train").
    - augment: with ``train``, the reference augmentation (False: frames and labels only resized to the input).
    - maskiges: also load the Siam encoder's maskiges.
    - audio: "wav" (log-mel from the WAVs, cached), "pkl" (the precomputed pickles) or "auto" (the WAV, else the
      pickle).
    - clip_frames: the AVSS training window; labels: AVSS "semantic", "rgb" or "auto" (semantic where present).
    - cache: a LogMelCache, "default" (memory + disk under the av2ts cache folder) or None (memory only).
    - audio_from: per item, the index of the video whose audio to use (``--shuffle-audio``).
    - seed: None draws the augmentation from torch's RNG (seeded per DataLoader worker); an int makes it a function
      of (seed, epoch, index) (``set_epoch``).
    - form: the layout read (``layout.FORMS``): "standard", or "384", VCT's (its files where they exist). VCT's
      AVSS training clips are squashed to the square of their short side, then augmented as S4/MS3's (random
      resize and crop), as its mapper does; COMBO's take the short side and the centre crop.
    """

    def __init__(self, data: str | os.PathLike, subset: str, split: str, input_size: int = 224, *,
                 train: bool | None = None, augment: bool = True, maskiges: bool = False, audio: str = "auto",
                 clip_frames: int = 5,
                 labels: str = "auto", cache: LogMelCache | str | None = "default",
                 audio_from: Sequence[int] | None = None, seed: int | None = None, form: str = FORM_STANDARD):
        self.subset = check_subset(subset)
        self.split = check_split(split)
        if audio not in AUDIO_SOURCES:
            raise UsageError(f"unknown audio source {audio!r}; choose from {', '.join(AUDIO_SOURCES)}")
        if input_size < 32 or input_size % 32:
            raise UsageError(f"input size must be a positive multiple of 32, got {input_size}")
        self.root = resolve_root(data, subset)
        self.form = form
        self.videos: list[Video] = list_videos(self.root, subset, split, labels, form)
        self.input_size = int(input_size)
        self.train = split == "train" if train is None else bool(train)
        self.augment = bool(augment)
        self.maskiges = bool(maskiges)
        self.audio = audio
        self.clip_frames = int(clip_frames)
        self.class_names = read_class_names(self.root) if subset == "avss" else BINARY_CLASSES
        self.num_classes = len(self.class_names)
        self.palette = avss_palette(max(self.num_classes, AVSS_NUM_CLASSES))
        self.cache = cache if isinstance(cache, LogMelCache) else LogMelCache(cache)  # "default" or None
        if audio_from is not None and len(audio_from) != len(self.videos):
            raise UsageError(f"audio_from has {len(audio_from)} entries for {len(self.videos)} videos")
        self.audio_from = None if audio_from is None else [int(i) for i in audio_from]
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.videos)

    def set_epoch(self, epoch: int) -> None:
        """With a fixed ``seed``: a new draw of augmentations and windows per epoch."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        video = self.videos[index]
        rng = self._rng(index) if self.train else None
        frames = range(video.num_frames)
        if rng is not None and video.num_frames > self.clip_frames:  # AVSS v2: a random window of clip_frames
            start = int(rng.integers(0, video.num_frames - self.clip_frames + 1))
            frames = range(start, start + self.clip_frames)
        clip = self.read_clip(video, frames)
        if self.train:
            square = self.subset == "avss" and self.form == FORM_384  # VCT's AVSS mapper
            if square:
                clip = square_short_side(clip)
            clip = train_transform(clip, self.input_size, rng if self.augment else None,
                                   random_resize=self.subset != "avss" or square)
        else:
            clip = eval_transform(clip, self.input_size, AVSS_EVAL_SIZE if self.subset == "avss" else None)
        audio_video = video if self.audio_from is None else self.videos[self.audio_from[index]]
        audio = self.read_audio(audio_video, video.num_frames)[frames.start:frames.stop]
        item = {
            "frames": _channels_first(clip.frames),
            "audio": audio.contiguous(),
            "masks": torch.from_numpy(clip.masks.astype(np.int64)),
            "supervised": torch.tensor([video.masks[i] is not None for i in frames]),
            "video": video.name,
            "category": video.group if self.subset == "s4" else "",  # S4: the metadata's category (VCT's PAC term)
            "mask_paths": [video.mask_names[i] for i in frames],
        }
        if self.maskiges:
            item["maskiges"] = _channels_first(clip.maskiges)
        return item

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng([self.seed, self.epoch, index])
        return np.random.default_rng(int(torch.randint(2**62, (1,)).item()))

    def read_clip(self, video: Video, frames: Sequence[int] | None = None) -> ClipArrays:
        """The frames, labels (255 where a frame has none) and maskiges of ``frames`` (default: all), unresized."""
        frames = range(video.num_frames) if frames is None else frames
        images = np.stack([read_rgb(video.frames[i]) for i in frames])
        if len({im.shape for im in images}) > 1:
            raise DataError(video.frames[frames[0]].parent, "frames of one video differ in size")
        palette = self.palette if video.mask_format == MASK_RGB else None
        labels = {i: read_mask(video.masks[i], video.mask_format, palette) for i in frames
                  if video.masks[i] is not None}
        label_shape = next(iter(labels.values())).shape if labels else images.shape[1:3]
        # training transforms move frames and labels together: their sizes must agree (evaluation scores the labels
        # at their own size: VCT's 384 layout has 384 px frames and 224 px evaluation labels)
        if label_shape != images.shape[1:3] and (self.train or self.form != FORM_384):
            first = next(iter(labels))
            raise DataError(video.masks[first], f"mask is {label_shape[1]}x{label_shape[0]}, its frames are "
                                                f"{images.shape[2]}x{images.shape[1]}")
        for i, label in labels.items():
            if label.shape != label_shape:
                raise DataError(video.masks[i], f"mask is {label.shape[1]}x{label.shape[0]}, the video's first "
                                                f"mask is {label_shape[1]}x{label_shape[0]}")
        masks = np.stack([labels[i] if i in labels else np.full(label_shape, IGNORE_INDEX, np.uint8)
                          for i in frames])
        maskiges = None
        if self.maskiges:
            maskiges = np.stack([read_rgb(video.maskiges[i], "maskige") for i in frames])
            # fitted to the frames for the transforms; VCT's evaluation resizes its maskiges to the input once
            # (its 384 ones then go in as they are, as in the reference), not through the frames' size
            if maskiges.shape[1:3] != images.shape[1:3] and (self.train or self.form != FORM_384):
                # COMBO's AVSS maskiges are made on the preprocessed 224 x 224 frames: the centre crop for
                # training, the whole (squashed) frame for evaluation; nearest neighbour, as the preprocessing.
                # Every other maskige shows the whole frame (VCT's 384 ones too)
                if self.subset == "avss" and self.train and video.maskiges[0].parent.name == AVSS_COMBO_MASKIGES:
                    maskiges = uncrop_centre(maskiges, *images.shape[1:3])
                else:
                    maskiges = resize_images(maskiges, *images.shape[1:3], nearest=True)
        return ClipArrays(images, masks, maskiges)

    def eval_labels(self, video: Video) -> tuple[list[int], np.ndarray]:
        """(indices of the labelled frames, their labels uint8 [n, h, w]) as evaluation scores them: at their own
        size (AVSS: nearest-resized to 224 x 224)."""
        annotated = video.annotated
        palette = self.palette if video.mask_format == MASK_RGB else None
        labels = [read_mask(video.masks[i], video.mask_format, palette) for i in annotated]
        if len({label.shape for label in labels}) > 1:
            raise DataError(video.masks[annotated[0]].parent, "masks of one video differ in size")
        masks = np.stack(labels) if labels else np.zeros((0, 1, 1), np.uint8)
        if self.subset == "avss" and labels:
            masks = resize_images(masks, *AVSS_EVAL_SIZE, nearest=True)
        return annotated, masks

    def read_audio(self, video: Video, count: int) -> torch.Tensor:
        """[count, 96, 64] log-mel examples of the video's audio (cut, or padded by repeating the last one)."""
        use_pickle = self.audio == "pkl" or (self.audio == "auto" and not video.wav.exists()
                                             and video.log_mel.exists())
        examples = read_log_mel_pickle(video.log_mel) if use_pickle else self.cache.examples(video.wav)
        return fit_examples(examples, count)


def _channels_first(images: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] -> [T, 3, H, W] uint8, copied by numpy (torch's multi-threaded copy of such small tensors is
    many times slower on a busy machine)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def build_dataset(subset: str, data: str | os.PathLike, split: str, cfg=None, **options) -> AVSDataset:
    """The dataset of ``split`` shaped for a model config (input size, maskiges iff the Siam encoder, the layout of
    its family: ``layout.form_for``)."""
    if cfg is not None:
        if not subsets_compatible(cfg.subset, subset):
            raise UsageError(f"the model is for {cfg.subset}, the data is {subset}")
        options.setdefault("input_size", cfg.input_size)
        options.setdefault("maskiges", cfg.siam)
        options.setdefault("form", form_for(cfg.family))
    return AVSDataset(data, subset, split, **options)


def collate_clips(items: list[dict]) -> dict:
    """Batch items of equal T: tensors stacked ([B, T, ...]); "video" a list of B names, "mask_paths" a list of B
    lists."""
    batch = {}
    for key, value in items[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([item[key] for item in items])
        else:
            batch[key] = [item[key] for item in items]
    return batch
