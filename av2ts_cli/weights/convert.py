"""``av2ts convert``: one table of the upstream kinds av2ts imports, each family's converter in its own module
(``convert_av2ts.py``, ``convert_combo.py``, ``convert_avsegformer.py``, ``convert_vct.py``), and the import
written as an av2ts checkpoint with its report.

A family that publishes weights adds a ``convert_<family>.py`` with a function of ``convert_av2ts_kind``'s
signature and result, and its kinds to ``CONVERTERS``.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from av2ts_cli.console import console
from av2ts_cli.errors import UsageError
from av2ts_cli.weights.checkpoint import first_keys, part_of, save_checkpoint
from av2ts_cli.weights.convert_av2ts import AV2TS_KINDS, convert_av2ts_kind
from av2ts_cli.weights.convert_avsegformer import convert_avsegformer_kind
from av2ts_cli.weights.convert_combo import COMBO_KINDS, convert_combo_kind
from av2ts_cli.weights.convert_vct import convert_vct_kind

CONVERTERS = {**{kind: convert_av2ts_kind for kind in AV2TS_KINDS},
              **{kind: convert_combo_kind for kind in COMBO_KINDS},
              "avsegformer": convert_avsegformer_kind, "vct": convert_vct_kind}
CONVERT_KINDS = tuple(CONVERTERS)


def convert(source: str, kind: str, *, preset: str | None = None, subset: str | None = None,
            siam: bool | None = None, base: str | None = None):
    """Import an upstream weights file of ``kind``: ``(model, cfg, KeyMapping, meta)`` ready for
    ``save_checkpoint`` (the family's converter does the work: see its module)."""
    if kind not in CONVERTERS:
        raise UsageError(f"unknown --kind {kind!r}; choose from {', '.join(CONVERT_KINDS)}")
    return CONVERTERS[kind](source, kind, preset=preset, subset=subset, siam=siam, base=base)


def convert_to_checkpoint(source: str, kind: str, out: str | os.PathLike, **options) -> dict:
    """``convert`` then ``save_checkpoint`` into ``out``; returns a JSON-ready summary."""
    out = Path(out)
    if options.get("base") and Path(options["base"]).expanduser().resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from --base: inputs are never overwritten")
    source_path = Path(source).expanduser()
    if source_path.exists() and source_path.resolve() == out.expanduser().resolve():
        raise UsageError("--out must differ from the source file")
    model, cfg, mapping, meta = convert(source, kind, **options)
    save_checkpoint(model, cfg, out, meta)
    parts: dict[str, int] = {}
    for key in mapping.tensors:
        parts[part_of(key, cfg.family)] = parts.get(part_of(key, cfg.family), 0) + 1
    reasons: dict[str, int] = {}
    unused: dict[str, list[str]] = {}  # reason -> the source keys it covers
    for key, reason in mapping.dropped.items():
        reasons[reason] = reasons.get(reason, 0) + 1
        unused.setdefault(reason, []).append(key)
    return {"out": str(out), "kind": kind, "source": source, "preset": cfg.preset, "subset": cfg.subset,
            "num_classes": cfg.num_classes, "siam": cfg.siam, "filled_tensors": len(mapping.tensors),
            "source_tensors_used": len(set(mapping.origin.values())), "filled_per_part": parts,
            "dropped": reasons, "unused_keys": {reason: sorted(keys) for reason, keys in unused.items()}}


def print_conversion_report(report: dict) -> None:
    table = Table(title=f"{report['preset']}, {report['subset']}, {report['num_classes']} classes, Siam encoder "
                        f"{'on' if report['siam'] else 'off'}")
    table.add_column(f"part filled from {report['kind']}")
    table.add_column("tensors", justify="right")
    for part, count in report["filled_per_part"].items():
        table.add_row(part, str(count))
    console.print(table)
    for reason, count in report["dropped"].items():
        keys = report.get("unused_keys", {}).get(reason, [])
        console.print(f"dropped {count} source tensors: {reason}" + (f" ({first_keys(keys)})" if keys else ""),
                      markup=False, highlight=False)
    console.print(f"Checkpoint saved to {report['out']}")
