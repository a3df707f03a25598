"""AVSegFormer checkpoints in the reference's layout, for the converter, registry and download tests.

- ``layout(tsv)``: the measured state-dict layouts of vvvb-github/AVSegFormer at 7083cb6 (``avsegformer-keys-*.tsv``,
  from tests/data, else the spec folder; the test skips without them);
- ``random_state(tsv)``: random tensors of those shapes; ``pool_state(tsv)`` the same quickly, in float16 by default
  (half a full-size file: 300 MB for R50 MS3);
- ``tiny_reference_state(subset)``: ``avsegformer-tiny``'s tensors under the reference's names, with the modules
  the reference saves but never runs: a checkpoint the reference's code would write for that small network, which
  ``av2ts convert --kind avsegformer --preset avsegformer-tiny`` imports in a second.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

LAYOUT_DIRS = (Path(__file__).parent / "data", Path("/work/shared/spec"))
# what the reference saves but never runs (spec section 3.10), as the converter reports them
UNBUILT = ("head.fpn.", "head.attn_fc.", "backbone.layer3_2.", "backbone.layer4_2.")


def layout(name: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(key, dtype, shape) of every tensor of a measured layout, in file order."""
    for folder in LAYOUT_DIRS:
        if (folder / name).is_file():
            rows = []
            for line in (folder / name).read_text().splitlines()[1:]:
                key, dtype, shape, _ = line.split("\t")
                rows.append((key, getattr(torch, dtype), tuple(int(x) for x in shape.strip("[]").split(",") if x)))
            return rows
    pytest.skip(f"{name} is not in tests/data or the spec folder")


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """The layout as meta tensors: keys, shapes and dtypes without memory (the rename table never reads values)."""
    return {key: torch.empty(shape, dtype=dtype, device="meta") for key, dtype, shape in layout(name)}


def _random(key: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.randint(0, 1000, shape, generator=g)
    if key.endswith("running_var"):
        return (torch.rand(shape, generator=g) + 0.5).to(dtype)
    return (torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]) or 1)).to(dtype)


def random_state(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors of a layout's shapes; floating tensors in ``dtype`` (int64 counters stay int64)."""
    g = torch.Generator().manual_seed(seed)
    return {key: _random(key, shape, dtype if kind.is_floating_point else kind, g)
            for key, kind, shape in layout(name)}


def pool_state(name: str, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random tensors of a layout's shapes, quick enough for a full-size file (1 s for R50 MS3, not 7): each floating
    tensor is a copy of a slice of one random pool at its own random offset, so no two tensors hold the same values."""
    rows = layout(name)
    g = torch.Generator().manual_seed(seed)
    spread = 1 << 20
    pool = torch.empty(max(math.prod(shape) for _, _, shape in rows) + spread, dtype=dtype).uniform_(-1, 1, generator=g)
    offsets = torch.randint(0, spread, (len(rows),), generator=g).tolist()
    state = {}
    for (key, kind, shape), offset in zip(rows, offsets, strict=True):
        if not kind.is_floating_point:
            state[key] = torch.randint(0, 1000, shape, generator=g, dtype=kind)
            continue
        tensor = pool[offset:offset + math.prod(shape)].reshape(shape).clone()
        state[key] = tensor.abs() + 0.5 if key.endswith("running_var") else tensor
    return state


# av2ts's name -> the reference's, the inverse of convert_avsegformer.RULES for the modules avsegformer-tiny has
_TO_REFERENCE = [
    (r"backbone\.layer([34])\.", r"backbone.layer\1_1."),
    (r"audio_encoder\.", "vggish."),
    (r"head\.encoder\.(\d+)\.attn\.", r"head.transformer.encoder.layers.\1.self_attn."),
    (r"head\.(encoder|decoder)\.(\d+)\.fc([12])\.", r"head.transformer.\1.layers.\2.linear\3."),
    (r"head\.(encoder|decoder)\.(\d+)\.", r"head.transformer.\1.layers.\2."),
    (r"head\.mixer\.", "head.fusion_block."),
    (r"head\.mlp\.(\d+)\.", r"head.mlp.layers.\1."),
]


def reference_key(key: str) -> str:
    """The name the reference's code gives av2ts's tensor ``key``."""
    for pattern, target in _TO_REFERENCE:
        match = re.match(pattern, key)
        if match:
            return match.expand(target) + key[match.end():]
    return key


def tiny_reference_state(subset: str = "s4", seed: int = 0) -> dict[str, torch.Tensor]:
    """avsegformer-tiny's tensors (random, the shapes of the preset for ``subset``) under the reference's names,
    plus one tensor of each never-run module (``UNBUILT``), as the reference saves them."""
    from av2ts_cli.config import get_preset
    from av2ts_cli.weights.convert_avsegformer import target_layout

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in target_layout(get_preset("avsegformer-tiny", subset)).items():
        kind = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        state[reference_key(key)] = _random(key, tuple(shape), kind, g)
    for key, shape in [("head.fpn.up1.1.weight", (8, 8, 3, 3)), ("head.attn_fc.4.weight", (1, 32, 1, 1)),
                       ("backbone.layer3_2.0.conv1.weight", (8, 8, 1, 1)),
                       ("backbone.layer4_2.0.bn1.running_mean", (8,))]:
        state[key] = _random(key, shape, torch.float32, g)
    return state
