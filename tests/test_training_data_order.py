"""av2ts_cli/training/data_order.py: the clip order is a function of the position only, and splits the global batch
over processes."""

from __future__ import annotations

import pytest

from av2ts_cli.training.data_order import ClipOrder


def test_clip_order_depends_only_on_position_and_splits_the_global_batch():
    one = ClipOrder(num_clips=7, batch=4, seed=3)
    ranks = [ClipOrder(num_clips=7, batch=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for iteration in range(6):
        clips = one.clips(iteration)
        assert ranks[0].clips(iteration) + ranks[1].clips(iteration) == clips  # same global batch, sliced
        assert ClipOrder(7, 4, 3).clips(iteration) == clips  # a fresh order (a resumed run) agrees
    stream = [c for i in range(7) for c in one.clips(i)]  # 28 positions = 4 epochs of 7 clips
    for epoch in range(4):
        part = stream[7 * epoch: 7 * (epoch + 1)]
        assert {e for e, _ in part} == {epoch} and sorted(i for _, i in part) == list(range(7))
    assert [i for _, i in stream[:7]] != [i for _, i in stream[7:14]]  # a new permutation per epoch
    assert ClipOrder(7, 4, 4).clips(0) != one.clips(0)
    with pytest.raises(Exception, match="multiple of the number of processes"):
        ClipOrder(7, 3, 0, rank=0, world_size=2)
