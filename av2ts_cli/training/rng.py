"""The global random streams of a training process: seeding, and their state as plain values for ``trainer.pt``.

Bit-for-bit resume needs nothing but the training step to draw from these streams (the data order and the
augmentation are functions of the seed and the clip's position, see ``data_order``), and their states saved with the
checkpoint and restored last.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                    "pos": int(pos), "has_gauss": int(has_gauss),
                                                    "cached_gaussian": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (the evaluation) without moving any global RNG: the training continues as if it had not run."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
