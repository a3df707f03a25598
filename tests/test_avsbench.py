"""The AVSBench contract (``av2ts_cli/avsbench.py``): its values are AVSBench's, and nothing else in the package
writes them again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from av2ts_cli import avsbench
from av2ts_cli.avsbench import (
    EXAMPLE_FRAMES,
    EXAMPLE_SECONDS,
    EXAMPLE_SPAN,
    FRAME_OFFSET,
    IGNORE_INDEX,
    MEL_BANDS,
    SAMPLE_RATE,
    SUBSET_CLASSES,
    SUBSETS,
    frame_time,
    pad_by_repeating_last,
    subsets_compatible,
)
from av2ts_cli.classes import AVSS_CLASSES

PACKAGE = Path(avsbench.__file__).parent
HOP_S, WINDOW_S = 0.010, 0.025  # VGGish: 10 ms hops of a 25 ms window


def test_audio_values_are_vggish_at_16_khz():
    assert SAMPLE_RATE == 16000 and MEL_BANDS == 64 and EXAMPLE_FRAMES == 96
    assert EXAMPLE_SECONDS == pytest.approx(EXAMPLE_FRAMES * HOP_S)  # 0.96 s
    assert EXAMPLE_SPAN == pytest.approx((EXAMPLE_FRAMES - 1) * HOP_S + WINDOW_S)  # 0.975 s: the last window ends


def test_frame_k_is_the_16th_of_16_frames_in_second_k():
    assert FRAME_OFFSET == 15 / 16
    assert frame_time(0) == 0.9375 and frame_time(4) == 4.9375
    assert [frame_time(k) for k in range(3)] == [0.9375, 1.9375, 2.9375]


def test_a_short_clip_is_padded_by_repeating_its_last_item():
    assert pad_by_repeating_last([0, 1, 2, 3], 5) == [0, 1, 2, 3, 3]
    assert pad_by_repeating_last([7], 3) == [7, 7, 7]
    assert pad_by_repeating_last([0, 1, 2], 3) == [0, 1, 2]
    assert pad_by_repeating_last((0, 1, 2, 3), 2) == [0, 1, 2, 3]  # never cut: padding only
    with pytest.raises(ValueError, match="empty"):
        pad_by_repeating_last([], 5)


def test_subset_rules():
    assert SUBSETS == ("s4", "ms3", "avss")
    assert SUBSET_CLASSES == {"s4": 2, "ms3": 2, "avss": len(AVSS_CLASSES)} and len(AVSS_CLASSES) == 71
    assert IGNORE_INDEX == 255
    for subset in SUBSETS:
        assert subsets_compatible(subset, subset)
    assert subsets_compatible("s4", "ms3") and subsets_compatible("ms3", "s4")  # both binary
    assert not subsets_compatible("s4", "avss") and not subsets_compatible("avss", "ms3")


CONTRACT_NAMES = {"SAMPLE_RATE", "MEL_BANDS", "EXAMPLE_FRAMES", "EXAMPLE_SECONDS",
                  "EXAMPLE_SPAN", "FRAME_OFFSET", "IGNORE_INDEX", "SUBSETS", "SUBSET_CLASSES"}


def _redefinitions(path: Path) -> list[str]:
    """Where ``path`` assigns a contract name or writes 16000 or 15 / 16 as a number."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {t.id for t in targets if isinstance(t, ast.Name)}
            if names & CONTRACT_NAMES:
                found.append(f"line {node.lineno}: {', '.join(sorted(names & CONTRACT_NAMES))} =")
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == SAMPLE_RATE:
            found.append(f"line {node.lineno}: {node.value}")
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              and all(isinstance(side, ast.Constant) for side in (node.left, node.right))
              and (node.left.value, node.right.value) == (15, 16)):
            found.append(f"line {node.lineno}: 15 / 16")
    return found


def test_the_contract_is_defined_only_in_avsbench():
    offenders = {str(path.relative_to(PACKAGE.parent)): where for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "avsbench.py" or path.parent != PACKAGE
                 if (where := _redefinitions(path))}
    assert offenders == {}


def test_the_check_sees_a_redefinition(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("SAMPLE_RATE = 16000\nOFFSET = 15 / 16\nrate = len([]) / 16000\n", encoding="utf-8")
    assert _redefinitions(module) == ["line 1: SAMPLE_RATE =", "line 1: 16000", "line 2: 15 / 16", "line 3: 16000"]
