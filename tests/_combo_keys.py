"""The COMBO reference's state-dict layouts (tests/data/combo-keys-*.tsv, measured by building yannqi/COMBO-AVS
with random weights) and random checkpoints in those layouts, for the COMBO model and converter tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def combo_rows(tsv: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor of the reference's state dict, in file order."""
    rows = []
    for line in (DATA / tsv).read_text().splitlines()[1:]:
        key, _, shape, _ = line.split("\t")
        rows.append((key, tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())))
    return rows


def random_combo_state(tsv: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the layout's shapes, scaled so that a forward pass stays finite: matrices ~ 1/sqrt(fan in),
    norm weights ~ 1, running variances positive, everything else small."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in combo_rows(tsv):
        if key.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight") and "norm" in key:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        state[key] = t
    return state
