"""Where every file of the official AVSBench layouts lives (docs/data-and-metrics.md, 'Dataset layouts').

``resolve_root`` accepts the dataset root of the seed layout (``AVS_dataset/`` with ``AVSBench_object/Single-source``,
``AVSBench_object/Multi-sources`` and ``AVSBench_semantic``) or a subset's own folder. ``list_videos`` reads the
metadata CSV of a subset and returns its videos for one split, in CSV order, as ``Video`` records of paths: nothing
is opened but the CSV (and ``label2idx.json`` for AVSS), so a record list is cheap and picklable.

The CSV columns are read by position where the official code does (S4: name, start, category, split; MS3: name,
split); AVSS ``metadata.csv`` by the names ``uid``, ``split`` and ``label`` when its header has them, otherwise by
COMBO's positions (1, 5, 6).

VCT reads its own 384 px layout beside the official one (``FORMS``, ``form_for``, ``form_384``): its files where they
exist, the standard ones otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from av2ts_cli.avsbench import SUBSETS
from av2ts_cli.classes import AVSS_CLASSES
from av2ts_cli.errors import DataError, UsageError

SPLITS = ("train", "val", "test")

OBJECT_FOLDER = "AVSBench_object"
SUBSET_FOLDERS = {"s4": "Single-source", "ms3": "Multi-sources", "avss": "AVSBench_semantic"}
METADATA = {"s4": "s4_meta_data.csv", "ms3": "ms3_meta_data.csv", "avss": "metadata.csv"}
DATA_FOLDERS = {"s4": "s4_data", "ms3": "ms3_data"}  # S4/MS3 files live under <subset>/<x>_data/
LABEL2IDX = "label2idx.json"
AVSS_SETS = {"v1s": 5, "v1m": 5, "v2": 10}  # AVSS source set -> frames per clip
OBJECT_FRAMES = 5  # S4 and MS3 clips: 5 frames, 5 s
SUBSET_TITLES = {"s4": "S4 (Single-source)", "ms3": "MS3 (Multi-sources)", "avss": "AVSS (AVSBench-semantic)"}

MASK_BINARY, MASK_INDEX, MASK_RGB = "binary", "index", "rgb"  # 0/255 masks, class-index PNGs, palette PNGs

# The layouts a dataset is read in (``list_videos``' ``form``; ``form_for`` says which a model family reads):
# "standard", the official one above, and "384", VCT's: the folders its generate_data_384 tools add beside the
# official ones (spec vct.md sections 1 and 11), read where they exist and derived from the standard files where
# they do not (frames and labels resized by the dataset, maskiges resized nearest):
# - S4/MS3: <x>_data_384/visual_frames_384/ (384 x 384 frames), gt_masks_384/<split>/ (training labels),
#   gt_masks_224/<split>/ (evaluation labels), pre_SAM_mask_384/ (maskiges), each mirroring the official tree (MS3:
#   frames named <video>_<k>.png, without the official ".mp4" infix); the audio stays in <x>_data/;
# - AVSS: <label>/<uid>/processed_frames_384/<i>.jpg (val/test frames; training reads frames/), and maskiges in
#   pre_SAM_mask/AVSBench_semantic/<label>/<uid>/frames/ (source size: VCT's training form) or
#   processed_frames_384/ (384 x 384).
FORM_STANDARD, FORM_384 = "standard", "384"
FORMS = (FORM_STANDARD, FORM_384)
DATA_384 = {"s4": "s4_data_384", "ms3": "ms3_data_384"}
FRAMES_384, MASKIGES_384, AVSS_384 = "visual_frames_384", "pre_SAM_mask_384", "processed_frames_384"
MASKIGE_FOLDER = "pre_SAM_mask"  # the standard layout's maskiges, below the subset's data folder
AVSS_MASKIGES = Path("pre_SAM_mask", "AVSBench_semantic")  # below the AVSS folder: <label>/<uid>/<frames folder>/
AVSS_COMBO_MASKIGES = "processed_frames"  # COMBO's AVSS maskiges: 224 x 224, training ones a centre crop


@dataclass(frozen=True)
class Video:
    """One clip of a split: the paths of its frames, labels, audio and maskiges (none of them opened)."""

    subset: str
    split: str
    name: str  # S4/MS3 video name, AVSS uid
    group: str  # S4 category, AVSS source set (v1s/v1m/v2), "" for MS3
    frames: tuple[Path, ...]
    masks: tuple[Path | None, ...]  # one per frame; None where the frame has no label (S4 and v1s training clips)
    mask_names: tuple[str, ...]  # per frame, the label's path relative to the split (the predictions' layout)
    mask_format: str  # MASK_BINARY | MASK_INDEX | MASK_RGB
    wav: Path
    log_mel: Path  # the precomputed log-mel pickle (official S4/MS3 audio_log_mel, COMBO's AVSS audio.pkl)
    maskiges: tuple[Path, ...]  # one per frame (pre_SAM_mask/.../<frame>_mask_color.png)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def annotated(self) -> list[int]:
        """Indices of the frames that have a label."""
        return [i for i, mask in enumerate(self.masks) if mask is not None]


def check_subset(subset: str) -> str:
    if subset not in SUBSETS:
        raise UsageError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")
    return subset


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    return split


def subset_folder_in(root: str | os.PathLike, subset: str) -> Path:
    """The subset's folder inside a dataset root of the seed layout (where ``av2ts data synth`` writes it)."""
    folder = SUBSET_FOLDERS[check_subset(subset)]
    return Path(root) / (folder if subset == "avss" else Path(OBJECT_FOLDER, folder))


def resolve_root(data: str | os.PathLike, subset: str) -> Path:
    """The subset's own folder (the one holding its metadata CSV), from that folder or from the dataset root."""
    check_subset(subset)
    data = Path(data)
    if not data.is_dir():
        raise DataError(data, "no such dataset folder" if not data.exists() else "is not a folder")
    csv_name = METADATA[subset]
    candidates = [data, subset_folder_in(data, subset), data / SUBSET_FOLDERS[subset]]
    if subset == "avss":
        candidates.append(data / "AVSS")  # AVSegFormer's name for the same folder
    for folder in candidates:
        if (folder / csv_name).is_file():
            return folder
    for folder in candidates:  # a subset folder without its CSV: name the missing file
        if folder.is_dir() and _looks_like_subset(folder, subset):
            raise DataError(folder / csv_name, "missing metadata CSV")
    raise DataError(data, f"no {SUBSET_TITLES[subset]} dataset here: expected {csv_name} in it, in "
                          f"{subset_folder_in('', subset)}/ or in {SUBSET_FOLDERS[subset]}/")


def _looks_like_subset(folder: Path, subset: str) -> bool:
    if subset == "avss":
        return (folder / LABEL2IDX).is_file() or any((folder / s).is_dir() for s in AVSS_SETS)
    return (folder / DATA_FOLDERS[subset]).is_dir() or folder.name == SUBSET_FOLDERS[subset]


def read_rows(path: Path) -> list[list[str]]:
    """The rows of a metadata CSV after its header, cells stripped; empty lines skipped."""
    if not path.is_file():
        raise DataError(path, "missing metadata CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"unreadable CSV: {err}") from None
    rows = [row for row in rows if any(row)]
    if not rows:
        raise DataError(path, "empty CSV (not even a header)")
    return rows


def _columns(path: Path, header: list[str], rows: list[list[str]], subset: str) -> tuple[int, int, int | None]:
    """Column positions (name, split, group) of a metadata CSV: by the header's names where it has them (a CSV
    with its columns in another order is read right), else the official files' positions (docs/data-and-metrics.md:
    the header text of the name column is not known, so the name is the first column of S4 and MS3)."""
    names = [h.lower() for h in header]

    def column(label: str, position: int) -> int:
        return names.index(label) if label in names else position

    if subset == "s4":
        name, split, group = 0, column("split", 3), column("category", 2)
    elif subset == "ms3":
        name, split, group = 0, column("split", 1), None
    else:
        name, split, group = column("uid", 1), column("split", 5), column("label", 6)
    width = max(name, split, group or 0) + 1
    for number, row in enumerate(rows, start=2):
        if len(row) < width:
            raise DataError(path, f"line {number}: {len(row)} columns, expected at least {width}")
    return name, split, group


def read_metadata(root: Path, subset: str) -> list[tuple[str, str, str]]:
    """(name, split, group) for every row of the subset's metadata CSV, in file order."""
    path = root / METADATA[subset]
    header, *rows = read_rows(path)
    name, split, group = _columns(path, header, rows, subset)
    return [(row[name], row[split], row[group] if group is not None else "") for row in rows]


def read_class_names(root: Path) -> tuple[str, ...]:
    """AVSS class names in ``label2idx.json`` key order (index = position; background first). Without the file, the
    official 71 classes."""
    path = root / LABEL2IDX
    if not path.exists():
        return AVSS_CLASSES
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"unreadable label2idx.json: {err}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(path, "expected a JSON object mapping class names to indices")
    return tuple(str(k) for k in mapping)


def form_for(family: str) -> str:
    """THE rule of which layout a model family reads: VCT its 384 one (``FORM_384``), every other family the
    standard one."""
    return FORM_384 if family == "vct" else FORM_STANDARD


def list_videos(root: Path, subset: str, split: str, labels: str = "auto", form: str = FORM_STANDARD
                ) -> list[Video]:
    """The videos of ``split`` in CSV order. ``root``: the subset folder (``resolve_root``). ``labels`` (AVSS):
    "semantic" (class-index PNGs, COMBO), "rgb" (palette PNGs, official) or "auto" (semantic where present).
    ``form``: the layout (``FORMS``; "384": VCT's files where they exist, see ``form_384``)."""
    check_split(split)
    if form not in FORMS:
        raise UsageError(f"unknown dataset layout {form!r}; choose from {', '.join(FORMS)}")
    rows = [(name, group) for name, row_split, group in read_metadata(root, subset) if row_split == split]
    if not rows:
        raise DataError(root / METADATA[subset], f"no videos in split {split!r}")
    if subset == "s4":
        videos = [_s4_video(root, split, name, category) for name, category in rows]
    elif subset == "ms3":
        videos = [_ms3_video(root, split, name) for name, _ in rows]
    else:
        if labels not in ("auto", "semantic", "rgb"):
            raise UsageError(f"unknown AVSS label kind {labels!r}; choose from auto, semantic, rgb")
        videos = [_avss_video(root, split, uid, label_set, labels) for uid, label_set in rows]
    return [form_384(root, video) for video in videos] if form == FORM_384 else videos


def maskige_root(root: Path, subset: str, form: str = FORM_STANDARD) -> Path:
    """The maskige folder of a subset folder (``resolve_root``): ``pre_SAM_mask/``, or for VCT's 384 layout
    ``<x>_data_384/pre_SAM_mask_384/`` (S4, MS3; AVSS keeps its 384 maskiges below ``pre_SAM_mask/``)."""
    if form == FORM_384 and subset != "avss":
        return root / DATA_384[subset] / MASKIGES_384
    return (root if subset == "avss" else root / DATA_FOLDERS[subset]) / MASKIGE_FOLDER


def maskiges_384(root: Path, video: Video) -> tuple[Path, ...]:
    """Where VCT's 384 x 384 maskiges of a (standard-layout) video's frames live: ``<x>_data_384/pre_SAM_mask_384/``
    (S4, MS3) or ``pre_SAM_mask/AVSBench_semantic/<label>/<uid>/processed_frames_384/`` (AVSS)."""
    if video.subset == "avss":
        folder = root / AVSS_MASKIGES / video.group / video.name / AVSS_384
        return tuple(folder / f"{i}_mask_color.png" for i in range(video.num_frames))
    base = root / DATA_384[video.subset] / MASKIGES_384
    key = Path(video.split, video.group, video.name) if video.subset == "s4" else Path(video.name)
    return tuple(base / key / f"{video.name}_{k}_mask_color.png" for k in range(1, video.num_frames + 1))


def form_384(root: Path, video: Video) -> Video:
    """A standard-layout video as VCT's 384 layout has it (see ``FORMS``): each kind of file (frames with their
    labels, maskiges) from the 384 folders when the subset has them, else the standard one, which the dataset
    resizes (frames bilinear, labels and maskiges nearest)."""
    maskiges = maskiges_384(root, video)
    if video.subset == "avss":
        source = root / AVSS_MASKIGES / video.group / video.name / "frames"  # VCT's training maskiges
        if video.split == "train" and source.is_dir():
            maskiges = tuple(source / f"{i}_mask_color.png" for i in range(video.num_frames))
        frames = video.frames[0].parent.parent / AVSS_384
        changes = {"frames": tuple(frames / f"{i}.jpg" for i in range(video.num_frames))} \
            if video.split != "train" and frames.is_dir() else {}
        return dataclasses.replace(video, maskiges=maskiges if maskiges[0].parent.is_dir() else video.maskiges,
                                   **changes)
    data = root / DATA_384[video.subset]
    changes = {}
    if (data / FRAMES_384).is_dir():
        key = Path(video.split, video.group, video.name) if video.subset == "s4" else Path(video.name)
        stems = [f"{video.name}_{k}" for k in range(1, video.num_frames + 1)]
        labels = data / ("gt_masks_384" if video.split == "train" else "gt_masks_224")
        label_key = Path(video.split, video.group, video.name) if video.subset == "s4" else \
            Path(video.split, video.name)
        changes["frames"] = tuple(data / FRAMES_384 / key / f"{stem}.png" for stem in stems)
        changes["masks"] = tuple(None if mask is None else labels / label_key / f"{stem}.png"
                                 for mask, stem in zip(video.masks, stems, strict=True))
    if (data / MASKIGES_384).is_dir():
        changes["maskiges"] = maskiges
    return dataclasses.replace(video, **changes)


def _s4_video(root: Path, split: str, name: str, category: str) -> Video:
    data = root / DATA_FOLDERS["s4"]
    key = Path(split, category, name)
    stems = [f"{name}_{k}" for k in range(1, OBJECT_FRAMES + 1)]
    masks = tuple(data / "gt_masks" / key / f"{stem}.png" if (split != "train" or k == 0) else None
                  for k, stem in enumerate(stems))
    return Video(
        subset="s4", split=split, name=name, group=category,
        frames=tuple(data / "visual_frames" / key / f"{stem}.png" for stem in stems),
        masks=masks,
        mask_names=tuple(f"{category}/{name}/{stem}.png" for stem in stems),
        mask_format=MASK_BINARY,
        wav=data / "audio_wav" / split / category / f"{name}.wav",
        log_mel=data / "audio_log_mel" / split / category / f"{name}.pkl",
        maskiges=tuple(data / "pre_SAM_mask" / key / f"{stem}_mask_color.png" for stem in stems),
    )


def _ms3_video(root: Path, split: str, name: str) -> Video:
    data = root / DATA_FOLDERS["ms3"]
    frame_stems = [f"{name}.mp4_{k}" for k in range(1, OBJECT_FRAMES + 1)]  # the official names keep ".mp4"
    mask_stems = [f"{name}_{k}" for k in range(1, OBJECT_FRAMES + 1)]
    return Video(
        subset="ms3", split=split, name=name, group="",
        frames=tuple(data / "visual_frames" / name / f"{stem}.png" for stem in frame_stems),
        masks=tuple(data / "gt_masks" / split / name / f"{stem}.png" for stem in mask_stems),
        mask_names=tuple(f"{name}/{stem}.png" for stem in mask_stems),
        mask_format=MASK_BINARY,
        wav=data / "audio_wav" / split / f"{name}.wav",
        log_mel=data / "audio_log_mel" / split / f"{name}.pkl",
        maskiges=tuple(data / "pre_SAM_mask" / name / f"{stem}_mask_color.png" for stem in frame_stems),
    )


def _avss_video(root: Path, split: str, uid: str, label_set: str, labels: str) -> Video:
    if label_set not in AVSS_SETS:
        raise DataError(root / METADATA["avss"], f"video {uid}: unknown label {label_set!r} "
                                                 f"(expected one of {', '.join(AVSS_SETS)})")
    folder = root / label_set / uid
    count = AVSS_SETS[label_set]
    if labels == "auto":
        labels = "semantic" if (folder / "labels_semantic").is_dir() or not (folder / "labels_rgb").is_dir() \
            else "rgb"
    label_folder = folder / ("labels_semantic" if labels == "semantic" else "labels_rgb")
    only_first = label_set == "v1s" and split == "train"  # gt_temporal_mask_flag [1, 0, 0, 0, 0]
    return Video(
        subset="avss", split=split, name=uid, group=label_set,
        frames=tuple(folder / "frames" / f"{i}.jpg" for i in range(count)),
        masks=tuple(label_folder / f"{i}.png" if (i == 0 or not only_first) else None for i in range(count)),
        mask_names=tuple(f"{label_set}/{uid}/{i}.png" for i in range(count)),
        mask_format=MASK_INDEX if labels == "semantic" else MASK_RGB,
        wav=folder / "audio.wav",
        log_mel=folder / "audio.pkl",
        maskiges=tuple(root / "pre_SAM_mask" / "AVSBench_semantic" / label_set / uid / "processed_frames"
                       / f"{i}_mask_color.png" for i in range(count)),
    )
