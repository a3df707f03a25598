"""``av2ts predict``'s options: parsed and checked once, before any model loads (``PredictOptions.check``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from av2ts_cli.errors import UsageError
from av2ts_cli.predict.maskiges import AUTO, auto_settings, parse_maskiges
from av2ts_cli.predict.outputs import is_video_name
from av2ts_cli.render import check_overlay_path
from av2ts_cli.runs import FORMATS

DEFAULT_RUNS = Path("runs/predict")


@dataclass
class PredictOptions:
    """Everything ``av2ts predict`` accepts besides the sources (see the CLI help for each)."""

    model: str | None = None  # None: the bundled demo model
    out: Path | None = None  # None: runs/predict/exp, exp2, ...
    fps: int = 1
    window: int | None = None  # None: the model's num_frames
    device: str = "auto"
    half: bool = False  # the fast path: --precision fp16 on CUDA, bf16 on a CPU with native bf16
    precision: str | None = None  # fp32, bf16 or fp16; None: model.inference.default_precision
    batch: int = 1
    recursive: bool = False
    threshold: float = 0.5
    formats: tuple[str, ...] = FORMATS
    maskiges: str | Path | None = None  # Siam models: None or "auto" (made and cached per video) or a folder
    generator: str | None = None  # --maskiges auto: hf://owner/repo[@rev] or a folder (None: the pinned SAM)
    generator_settings: dict = field(default_factory=dict)  # GeneratorSettings fields (None: COMBO's run)
    overlay: str | None = None  # None: no overlay; "": OUT/<video>/overlay.mp4; else a file or folder
    force: bool = False
    require_audio: bool = False
    progress: bool = True
    # --maskiges and the generator's settings, parsed once (here) for the whole run: AUTO or a folder, and what
    # --maskiges auto makes its maskiges with (a video's settings in summary.json)
    maskige_source: str | Path = field(init=False)
    auto_maskiges: dict = field(init=False)

    def __post_init__(self) -> None:
        self.maskige_source = parse_maskiges(self.maskiges)
        self.auto_maskiges = auto_settings(self.generator, self.generator_settings)  # UsageError: out of range

    def check(self) -> None:
        """A UsageError for any option out of range or contradicting another: all of them before any work."""
        if self.fps < 1:
            raise UsageError(f"--fps {self.fps} must be at least 1")
        if self.window is not None and self.window < 1:
            raise UsageError(f"--window {self.window} must be at least 1")
        if self.batch < 1:
            raise UsageError(f"--batch {self.batch} must be at least 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold} must be between 0 and 1")
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UsageError(f"--format {','.join(self.formats)}: choose from {', '.join(FORMATS)}")
        if self.overlay is not None and "png" not in self.formats:
            raise UsageError("--overlay paints the PNG masks: add png to --format")
        if self.overlay and is_video_name(self.overlay):
            check_overlay_path(Path(self.overlay))  # the container and the name's length, before any work
        for option, target in (("--out", self.out), ("--overlay", self.overlay or None)):
            _check_writable(option, Path(target) if target else None)

    @property
    def makes_maskiges(self) -> bool:
        """Whether a Siam model's maskiges are made by a generator (``--maskiges auto``), not read from a folder."""
        return self.maskige_source == AUTO


def _check_writable(option: str, target: Path | None) -> None:
    """A UsageError naming ``target`` when its nearest existing folder cannot be written: checked before the
    model loads, not after a video was segmented."""
    if target is None:
        return
    existing = target if target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {target}: {existing} cannot be written (permission denied)")


def parse_formats(text: str) -> tuple[str, ...]:
    """'png,json' -> ("png", "json") in canonical order; UsageError for unknown names."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(FORMATS))
    if unknown or not names:
        raise UsageError(f"--format {text!r}: choose one or more of {', '.join(FORMATS)} (comma-separated)")
    return tuple(f for f in FORMATS if f in names)
