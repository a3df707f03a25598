"""VCT's 384 px layout of a synthetic S4 or MS3 tree, for the tests of the layout and of ``data check``."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from av2ts_cli.data import list_videos


def write_384_layout(root: Path, subset: str) -> None:
    """What VCT's generate_data_384 tools write beside the official files (spec vct.md sections 1 and 11), made
    from the standard ones here: 384 px frames (bilinear), 384 px training labels, 224 px evaluation labels
    (nearest) and 384 px maskiges (nearest)."""
    for split in ("train", "val", "test"):
        for video in list_videos(root, subset, split):
            data = root / f"{subset}_data_384"
            key = Path(split, video.group, video.name) if subset == "s4" else Path(video.name)
            label_key = key if subset == "s4" else Path(split, video.name)
            for k in range(video.num_frames):
                stem = f"{video.name}_{k + 1}"
                outputs = [(video.frames[k], data / "visual_frames_384" / key / f"{stem}.png", 384, Image.BILINEAR),
                           (video.maskiges[k], data / "pre_SAM_mask_384" / key / f"{stem}_mask_color.png", 384,
                            Image.NEAREST)]
                if video.masks[k] is not None:
                    side = 384 if split == "train" else 224
                    folder = "gt_masks_384" if split == "train" else "gt_masks_224"
                    outputs.append((video.masks[k], data / folder / label_key / f"{stem}.png", side, Image.NEAREST))
                for source, target, side, rule in outputs:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.open(source).resize((side, side), rule).save(target)
