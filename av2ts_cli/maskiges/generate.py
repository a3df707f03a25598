"""Automatic class-agnostic masks from a SAM-family model of ``transformers`` (a dependency of av2ts).

COMBO made its maskiges with Semantic-SAM (Swin-L, granularity level 3), which is not pip-installable; the
``transformers`` models are the nearest ones a user can install: SAM (``SamModel``, default
``hf://facebook/sam-vit-base`` at a pinned commit; SAM-architecture checkpoints such as SlimSAM too), SAM-HQ
(``SamHQModel``), SAM 2 (``Sam2Model``: facebook/sam2.1-hiera-tiny, -small, -base-plus, -large) and EdgeTAM
(``EdgeTamModel``: SAM 2's decoder on a RepViT encoder), chosen by the
folder's ``config.json`` (``model_type``). The settings default to COMBO's Semantic-SAM run, not to the
``transformers`` pipeline's (stability 0.95, no small-region clean-up).

One frame: the image encoder runs once; a grid of ``points_per_side`` x ``points_per_side`` single-point prompts
goes through the prompt encoder and mask decoder ``points_per_batch`` at a time, three masks per point. Masks whose
predicted IoU passes ``pred_iou_thresh`` are upscaled to the frame (the processor's ``post_process_masks``), then
filtered on stability and deduplicated by box NMS: the masks and the order of the processor's ``filter_masks`` and
``post_process_for_mask_generation``, without their overhead (see "the masks kept" below). Last, as SAM's
automatic generator with ``min_mask_region_area``, holes and islands under ``min_region`` pixels are removed, and a
second box NMS prefers the masks that clean-up left as they were. Filtering on IoU before upscaling gives the same
masks (the IoU test does not depend on the resolution) and upscales only the survivors: at 1920 x 1080 a batch of
64 points is 1.6 GB of float masks.

Weights come only through huggingface_hub and its cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), as
safetensors; a local folder written by ``save_pretrained`` (the model, and its image processor or, in
``transformers`` 5, its whole processor: ``processor_config.json``) is accepted too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from av2ts_cli.errors import Av2tsError, CheckpointError, UsageError
from av2ts_cli.memory import reused_heap
from av2ts_cli.processes import resolve_device, resolve_precision
from av2ts_cli.weights.hub import hub_snapshot, parse_hub_ref

if TYPE_CHECKING:
    import torch

DEFAULT_REPO = "facebook/sam-vit-base"
DEFAULT_REVISION = "70c1a07f894ebb5b307fd9eaaee97b9dfc16068f"  # main on 2026-08-10 (Apache-2.0, 375 MB)
DEFAULT_GENERATOR = f"hf://{DEFAULT_REPO}@{DEFAULT_REVISION}"
INSTALL_HINT = "pip install 'transformers>=5.0'"
# config.json's model_type -> the transformers class; SAM-architecture checkpoints (SlimSAM) are "sam"
MODEL_CLASSES = {"sam": "SamModel", "sam_hq": "SamHQModel", "sam2": "Sam2Model", "edgetam": "EdgeTamModel"}
SQUARE_INPUT_TYPES = ("sam2", "edgetam")  # their processor squashes the frame to the model's square input
SUPPORTED_TYPES = tuple(MODEL_CLASSES)
MODEL_FILES = ["*.json", "*.safetensors"]  # config, image processor, weights (never pickled .bin weights)
# the image processor's settings: save_pretrained of an image processor, or (transformers 5) of a whole processor
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch's names
# the image encoder's working memory per 1024 px frame in fp32, an upper bound: ViT-B's and ViT-H's global-attention
# blocks hold 12 or 16 heads of 4096 x 4096 scores (0.8 or 1.1 GB) with their softmax and relative-position terms
ENCODER_BYTES_PER_FRAME = 3 << 30
MAX_FRAMES_PER_BATCH = 8  # beyond this a GPU is busy already; more only delays the first maskige


@dataclass(frozen=True)
class GeneratorSettings:
    """Automatic-mask settings; the defaults are COMBO's Semantic-SAM run (``points_per_batch`` only trades speed
    for memory: the masks do not depend on it)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_region: int = 10  # pixels; holes and islands smaller than this are removed (0: off)
    mask_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise UsageError("--points-per-side and --points-per-batch must be at least 1")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.min_region < 0:
            raise UsageError(f"--min-region must be >= 0, got {self.min_region}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def import_transformers():
    """The ``transformers`` module, or one line saying how to install it (an install that left it out)."""
    try:
        import transformers  # local: ~8 s to import, only when maskiges are made
    except ImportError:
        raise Av2tsError(f"automatic maskiges need the transformers package: {INSTALL_HINT}") from None
    return transformers


@dataclass(frozen=True)
class ResolvedGenerator:
    folder: Path  # holds config.json, preprocessor_config.json or processor_config.json, the safetensors weights
    source: str  # what the user gave
    repo: str | None  # owner/name for hub models
    revision: str | None  # the commit the cache resolved (hub), None for a local folder


def resolve_generator(spec: str | os.PathLike | None) -> ResolvedGenerator:
    """``hf://owner/repo[@revision][/subfolder]`` through the huggingface_hub cache, or a local folder."""
    spec = str(spec) if spec is not None else DEFAULT_GENERATOR
    if not spec.startswith("hf://"):
        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(folder, "no such generator folder (expected hf://owner/repo[@revision] or a folder "
                                          "written by transformers' save_pretrained)")
        return ResolvedGenerator(folder, spec, None, None)
    ref = parse_hub_ref(spec)
    patterns = [f"{ref.subfolder}/{p}" for p in MODEL_FILES] if ref.subfolder else MODEL_FILES
    folder = hub_snapshot(ref, patterns, spec)
    commit = folder.name if len(folder.name) == 40 else None
    if ref.subfolder:
        folder = folder / ref.subfolder
    return ResolvedGenerator(folder, spec, ref.repo_id, commit)


class MaskGenerator:
    """A loaded SAM-family model and its image processor; ``generate`` gives a frame's masks."""

    def __init__(self, spec: str | os.PathLike | None = None, settings: GeneratorSettings | None = None,
                 device: str | torch.device = "auto", precision: str | None = None):
        """``precision``: fp32, bf16 or fp16, or None for the network's choice on this device (on a CPU the
        measured faster of fp32 and bf16, ``processes.resolve_precision``); the model's weights are cast once."""
        import torch  # local: see generate

        from av2ts_cli.maskiges.sam_decoder import PointDecoder  # local: it imports torch (see generate)

        transformers = import_transformers()

        self.settings = settings or GeneratorSettings()
        self.resolved = resolve_generator(spec)
        self.device = resolve_device(device)
        self.precision, self.precision_basis = resolve_precision(precision, self.device)
        folder = self.resolved.folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(folder / "config.json", "missing: a generator folder needs the model and its "
                                                          "image processor (save_pretrained of both)")
        if not any((folder / name).is_file() for name in PROCESSOR_FILES):
            raise CheckpointError(folder / PROCESSOR_FILES[0], "missing (nor processor_config.json): a generator "
                                                               "folder needs the model and its image processor "
                                                               "(save_pretrained of both)")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its load reports would break the CLI's output
        transformers.logging.disable_progress_bar()
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
            if config.model_type not in SUPPORTED_TYPES:
                raise UsageError(f"{self.resolved.source}: a {config.model_type!r} model; automatic maskiges support "
                                 f"{', '.join(SUPPORTED_TYPES)} ({', '.join(MODEL_CLASSES.values())})")
            model_class = getattr(transformers, MODEL_CLASSES[config.model_type])
            self.model = model_class.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
            self.model.to(getattr(torch, PRECISION_DTYPES[self.precision]))
            self.processor = transformers.AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise CheckpointError(self.resolved.source, f"cannot load the model: {str(err).splitlines()[0]}") \
                from None
        finally:
            transformers.logging.set_verbosity(verbosity)
            transformers.logging.enable_progress_bar()
        self.model_type = config.model_type
        # SAM's decoder recomputed without the stock path's per-point copies (sam_decoder.py); SAM-HQ and SAM 2
        # have decoders of their own and keep the stock forward
        self.point_decoder = PointDecoder(self.model) if self.model_type == "sam" else None
        # SAM: {"longest_edge": 1024}, the frame resized on its long side and padded; SAM 2: {"height": 1024,
        # "width": 1024}, the frame squashed to the square (the point grid follows, see _points)
        size = self.processor.size
        self.target_size = int(size.get("longest_edge") or size.get("height"))
        self.frames_per_batch = frames_per_batch(self.device, self.precision)

    def describe(self) -> dict:
        """What made the masks (the provenance record)."""
        return {"generator": self.resolved.source, "repo": self.resolved.repo, "revision": self.resolved.revision,
                "model_type": self.model_type, "precision": self.precision, "settings": self.settings.to_dict()}

    def generate(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] RGB -> bool (N, H, W) masks, N >= 0, in the order the last NMS kept them."""
        return self.generate_many([image])[0]

    def generate_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Frames (uint8 [H, W, 3] RGB, sizes may differ) -> each one's masks as ``generate`` gives them; the image
        encoder sees them as one batch (pass at most ``frames_per_batch``), the prompts go frame by frame."""
        import torch  # local: --masks-from runs import this module for its settings and need no torch

        # PIL's np.asarray is read-only, and torch.from_numpy inside transformers warns
        images = [image if image.flags.writeable else image.copy() for image in images]
        with torch.inference_mode(), reused_heap(), self._failures():  # 0.65x the time on a CPU (reused_heap)
            inputs = self.processor(images=images, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
            embeddings = self.model.get_image_embeddings(pixel_values)
            reshaped = inputs["reshaped_input_sizes"].tolist() if "reshaped_input_sizes" in inputs else None
            return [self._frame_masks(image, _frame_of(embeddings, i), reshaped[i] if reshaped else None)
                    for i, image in enumerate(images)]

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """A model that loads but cannot run (a folder whose config does not fit its own layers: one channel count
        for another) is the generator's problem, said in one line naming it; running out of memory stays what it
        is (``errors.describe`` says it with the options that lower the need)."""
        try:
            yield
        except RuntimeError as err:
            text = " ".join(str(err).split())
            if type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
                raise
            raise CheckpointError(self.resolved.source, f"the model cannot run on a frame: {text}") from err

    def _frame_masks(self, image: np.ndarray, embeddings, reshaped: list[int] | None) -> np.ndarray:
        """One frame's masks from its image embeddings ([1, C, h, w], or SAM-HQ's pair with the intermediate ViT
        features); ``reshaped``: the frame's size inside SAM's padded input (None: SAM 2's squashed square)."""
        s = self.settings
        h, w = image.shape[:2]
        prompt = {"image_embeddings": embeddings}
        if isinstance(embeddings, tuple):  # SAM-HQ: (embeddings, intermediate ViT features)
            prompt = {"image_embeddings": embeddings[0], "intermediate_embeddings": embeddings[1]}
        points, labels = self._points(image, s.points_per_side)
        upscale = Upscaler(self.processor, (h, w), reshaped)
        kept = KeptMasks((h, w))
        for start in range(0, points.shape[1], s.points_per_batch):
            batch = points[:, start:start + s.points_per_batch], labels[:, start:start + s.points_per_batch]
            if self.point_decoder is not None:
                logits, iou = self.point_decoder.decode(prompt["image_embeddings"], *batch)
            else:
                out = self.model(input_points=batch[0], input_labels=batch[1], multimask_output=True, **prompt)
                logits, iou = out.pred_masks, out.iou_scores
            # thresholds and upscaling in fp32, whatever the precision of the network
            kept.add(*select_masks(logits[0].flatten(0, 1).float(), iou[0].flatten(0, 1).float(), upscale, s))
        return remove_small_regions(kept.after_nms(s.box_nms_thresh), s.min_region, s.box_nms_thresh)

    def _points(self, image: np.ndarray, per_side: int):
        """The grid of single-point prompts in the model's input coordinates: ([1, n*n, 1, 2] points, [1, n*n, 1]
        labels). SAM: the processor's own grid (its coordinates follow the long-side resize); SAM 2: the same grid
        of the frame scaled to the squashed square (its processor's grid assumes the long-side resize)."""
        import torch  # local: see generate

        if self.model_type not in SQUARE_INPUT_TYPES:
            _, points, _, labels = self.processor.generate_crop_boxes(
                image, self.target_size, crop_n_layers=0, points_per_crop=per_side, device=self.device)
            return points, labels
        offset = 1 / (2 * per_side)
        side = torch.linspace(offset, 1 - offset, per_side)
        grid = torch.stack([side[None, :].expand(per_side, -1), side[:, None].expand(-1, per_side)], -1)
        points = (grid.reshape(1, -1, 1, 2) * self.target_size).to(self.device)
        return points, torch.ones(points.shape[:3], dtype=torch.int64, device=self.device)


def _frame_of(embeddings, index: int):
    """Frame ``index``'s slice of a batch's image embeddings, kept in their structure: SAM's tensor [B, ...], SAM 2's
    list of one tensor [B, ...] per feature level, SAM-HQ's (tensor, [one per intermediate layer])."""
    if isinstance(embeddings, (tuple, list)):
        return type(embeddings)(_frame_of(part, index) for part in embeddings)
    return embeddings[index:index + 1]


def frames_per_batch(device: torch.device, precision: str, free_bytes: int | None = None) -> int:
    """How many frames the image encoder takes at once: 1 on a CPU (two 1024 px frames as one ViT-B batch took
    1.12-1.20x the time of two single ones on 2 threads, 2026-12-08), on CUDA as many as half the free
    memory holds at ``ENCODER_BYTES_PER_FRAME`` (halved for 16-bit precisions), at most ``MAX_FRAMES_PER_BATCH``.
    ``free_bytes``: the device's free memory (None: asked of CUDA)."""
    if device.type != "cuda":
        return 1
    if free_bytes is None:
        import torch  # local: see generate

        free_bytes, _ = torch.cuda.mem_get_info(device)
    per_frame = ENCODER_BYTES_PER_FRAME // (1 if precision == "fp32" else 2)
    return max(1, min(MAX_FRAMES_PER_BATCH, free_bytes // 2 // per_frame))


# ------------------------------------------------------------------------------------------- the masks kept
# The processor's own post-processing (post_process_masks, filter_masks, post_process_for_mask_generation) gives
# these masks too, but at a cost far above the arithmetic: it upscales every mask, encodes each kept one as an RLE
# in a Python loop that scans every other mask's changes (quadratic in the masks of a batch), and decodes each NMS
# survivor run by run. Here the IoU test runs on the decoder's output (its result does not depend on the
# resolution), only the survivors are upscaled (in chunks of bounded memory), the stability score and the boxes
# are whole-tensor operations, the kept masks are stored bit-packed, and only NMS survivors are unpacked. The
# order and the masks are the processor's (tests/test_maskiges_generate.py compares them on random logits).
UPSCALE_CHUNK_PIXELS = 1 << 25  # float pixels upscaled at once (128 MB), whatever the frame's size


class Upscaler:
    """The processor's ``post_process_masks`` (SAM: logits at the decoder's size -> the model's padded input ->
    crop -> the frame's size, bilinear; SAM 2, ``reshaped_size`` None: straight to the frame's size), in chunks of
    at most ``UPSCALE_CHUNK_PIXELS``."""

    def __init__(self, processor, frame_size: tuple[int, int], reshaped_size: list[int] | None):
        self.processor, self.frame_size, self.reshaped_size = processor, frame_size, reshaped_size
        pad = getattr(processor, "pad_size", None) if reshaped_size is not None else None
        largest = max(pad["height"] * pad["width"] if pad else 0, frame_size[0] * frame_size[1])
        self.chunk = max(1, UPSCALE_CHUNK_PIXELS // largest)

    def chunks(self, low):
        """low: float [N, h', w'] logits -> float [n, H, W] logits, chunk by chunk."""
        extra = {} if self.reshaped_size is None else {"reshaped_input_sizes": [self.reshaped_size]}
        for start in range(0, len(low), self.chunk):
            yield self.processor.post_process_masks([low[start:start + self.chunk, None]], [list(self.frame_size)],
                                                    binarize=False, **extra)[0][:, 0]


def stability_scores(logits, mask_threshold: float, offset: float):
    """SAM's stability score of each mask (float [N, H, W] logits): the area above ``mask_threshold + offset`` over
    the area above ``mask_threshold - offset``, counted as the processor counts them."""
    import torch  # local: see generate

    high = (logits > mask_threshold + offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    low = (logits > mask_threshold - offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return high / low


def mask_boxes(masks):
    """bool [N, H, W] -> int64 [N, 4] XYXY boxes (inclusive), [0, 0, 0, 0] for an empty mask."""
    import torch  # local: see generate

    rows, cols = masks.any(-1), masks.any(-2)  # [N, H], [N, W]
    height, width = masks.shape[-2:]
    top, left = rows.int().argmax(-1), cols.int().argmax(-1)
    bottom = height - 1 - rows.flip(-1).int().argmax(-1)
    right = width - 1 - cols.flip(-1).int().argmax(-1)
    boxes = torch.stack([left, top, right, bottom], -1).long()
    return boxes * rows.any(-1, keepdim=True)


def select_masks(low_logits, iou, upscale: Upscaler, settings: GeneratorSettings):
    """One decoder batch: low_logits [N, h', w'] and iou [N] -> (bool [k, H, W] masks, float [k] scores, int64
    [k, 4] boxes) of the masks that pass the IoU test (on the decoder's output), then the stability test (on the
    upscaled logits), in their order: what the processor's ``filter_masks`` keeps (one crop, the whole frame)."""
    import torch  # local: see generate

    s = settings
    iou = iou.float()
    keep = iou > s.pred_iou_thresh if s.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
    low_logits, iou = low_logits[keep].float(), iou[keep]
    masks, scores = [], []
    for start, logits in zip(range(0, len(low_logits), upscale.chunk), upscale.chunks(low_logits), strict=True):
        chunk_iou = iou[start:start + len(logits)]
        if s.stability_score_thresh > 0:
            stable = stability_scores(logits, s.mask_threshold, s.stability_score_offset) > s.stability_score_thresh
            logits, chunk_iou = logits[stable], chunk_iou[stable]
        masks.append(logits > s.mask_threshold)
        scores.append(chunk_iou)
    if not masks:
        h, w = upscale.frame_size
        return torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(0), torch.zeros(0, 4, dtype=torch.int64)
    masks = torch.cat(masks)
    return masks, torch.cat(scores), mask_boxes(masks)


class KeptMasks:
    """The masks every batch kept, bit-packed (1/8 of a bool mask), with their scores and boxes; ``after_nms``: the
    box NMS of the processor's ``post_process_for_mask_generation`` and the survivors unpacked, in its order."""

    def __init__(self, frame_size: tuple[int, int]):
        self.frame_size = frame_size
        self.packed: list[np.ndarray] = []
        self.scores, self.boxes = [], []

    def add(self, masks, scores, boxes) -> None:
        if len(masks):
            self.packed.append(np.packbits(masks.cpu().numpy().reshape(len(masks), -1), axis=1))
            self.scores.append(scores.cpu())
            self.boxes.append(boxes.cpu())

    def after_nms(self, nms_thresh: float) -> np.ndarray:
        import torch  # local: see generate
        from torchvision.ops import batched_nms  # local: as torch

        h, w = self.frame_size
        if not self.packed:
            return np.zeros((0, h, w), dtype=bool)
        boxes, scores = torch.cat(self.boxes), torch.cat(self.scores)
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes)), nms_thresh).numpy()
        packed = np.concatenate(self.packed)[keep]
        return np.unpackbits(packed, axis=1, count=h * w).reshape(len(keep), h, w).astype(bool)


def _clean(mask: np.ndarray, min_area: int) -> np.ndarray:
    """One bool [H, W] mask without holes and islands under ``min_area`` pixels (8-connectivity); if every island
    is small, the largest stays. The components are picked by a lookup table over their labels (one gather per
    pass, whatever their number)."""
    import cv2  # local: OpenCV takes ~0.2 s to import; only generated masks are cleaned

    out = mask.copy()
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=8)
    holes = stats[:, cv2.CC_STAT_AREA] < min_area
    holes[0] = False  # label 0: the mask itself
    if holes.any():
        out |= holes[labels]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(out.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if (areas < min_area).any():
        keep = np.zeros(count, dtype=bool)
        keep[1:] = areas >= min_area
        if not keep.any():
            keep[int(np.argmax(areas)) + 1] = True
        out = keep[labels]
    return out


def remove_small_regions(masks: np.ndarray, min_area: int, nms_thresh: float) -> np.ndarray:
    """bool (N, H, W) -> each mask cleaned (``_clean``), then box NMS at ``nms_thresh`` scoring unchanged masks 1
    and changed ones 0 (as SAM's automatic generator), empty masks dropped. ``min_area`` 0: unchanged."""
    if min_area <= 0 or len(masks) == 0:
        return masks
    # local: --masks-from runs need no torch (torchvision's NMS and boxes match SAM's)
    import torch
    from torchvision.ops import batched_nms, masks_to_boxes

    cleaned = [_clean(mask, min_area) for mask in masks]
    unchanged = [float(np.array_equal(c, m)) for c, m in zip(cleaned, masks, strict=True)]
    kept = [i for i, c in enumerate(cleaned) if c.any()]
    if not kept:
        return np.zeros((0, *masks.shape[1:]), dtype=bool)
    stacked = np.stack([cleaned[i] for i in kept])
    boxes = masks_to_boxes(torch.from_numpy(stacked)).float()
    scores = torch.tensor([unchanged[i] for i in kept])
    keep = batched_nms(boxes, scores, torch.zeros(len(kept), dtype=torch.int64), nms_thresh)
    return stacked[keep.numpy()]
