"""av2ts_cli/training/rng.py: the global RNG states survive a save with torch.save and a weights_only load."""

from __future__ import annotations

import random

import numpy as np
import torch

from av2ts_cli.training.rng import preserved_rng, rng_state, set_rng_state


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    state = rng_state()
    torch.save(state, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True))  # plain values only: weights_only loads it
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_preserved_rng_leaves_every_stream_where_it_was():
    torch.manual_seed(4)
    np.random.seed(5)
    random.seed(6)
    with preserved_rng():
        torch.rand(10), np.random.rand(10), random.random()  # the evaluation draws
    after = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(4)
    np.random.seed(5)
    random.seed(6)
    assert torch.equal(after[0], torch.rand(3)) and np.array_equal(after[1], np.random.rand(3))
    assert after[2] == random.random()
