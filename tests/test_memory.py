"""av2ts_cli/memory.py: ``reused_heap`` seen in the process's resident memory (the kernel's count, not a clock)."""

from __future__ import annotations

import sys

import pytest
import torch

from av2ts_cli.memory import _libc, reused_heap, rss_bytes

SIZE = 256 << 20  # bytes: far above glibc's 32 MB, where each allocation is mapped afresh and unmapped when freed


def _resident_after_a_freed_tensor() -> int:
    """Resident bytes above the start after a SIZE-byte tensor was written and freed."""
    before = rss_bytes()
    tensor = torch.empty(SIZE // 4)
    tensor.fill_(1.0)
    del tensor
    return rss_bytes() - before


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc only")
def test_in_the_block_freed_memory_stays_for_reuse_and_after_it_goes_back():
    """Outside the block a freed large tensor's pages go back to the system at once (so the next one faults them
    in again, 4 KiB at a time); inside, they stay in the heap for the next allocation; leaving the block gives
    them back."""
    assert _resident_after_a_freed_tensor() < SIZE // 8
    start = rss_bytes()
    with reused_heap():
        assert _resident_after_a_freed_tensor() > SIZE * 3 // 4
    assert rss_bytes() - start < SIZE // 8
