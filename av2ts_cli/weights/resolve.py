"""THE one resolver of ``--model``: ``resolve_model`` (and ``resolve_checkpoint`` / ``load_checkpoint`` below it).

``resolve_model(name)`` accepts, in this order: a preset name (only with ``presets=True``: a randomly initialised
network); a local checkpoint folder (or a ``.safetensors`` file with ``config.json`` beside it);
``hf://owner/repo[@revision][/subfolder]`` (``hub.py``: huggingface_hub's cache, ``HF_HUB_OFFLINE`` /
``HF_HUB_CACHE`` / ``HF_HOME``); a name of ``registry.REGISTRY`` (a ready checkpoint, or an upstream file that
``upstream.py`` converts once on first use).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from av2ts_cli.avsbench import subsets_compatible
from av2ts_cli.config import PRESET_NAMES, get_preset
from av2ts_cli.errors import CheckpointError, UsageError
from av2ts_cli.weights.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResolvedCheckpoint,
    checkpoint_config,
    find_checkpoint,
    first_keys,
    load_checkpoint_files,
    part_of,
    parts_of_family,
    weights_sha256,
)
from av2ts_cli.weights.hub import HF_PREFIX
from av2ts_cli.weights.registry import REGISTRY
from av2ts_cli.weights.upstream import prepare_registry_checkpoint


def resolve_checkpoint(name_or_path: str | os.PathLike) -> ResolvedCheckpoint:
    """The two files of a checkpoint (``checkpoint.find_checkpoint``); a registry model converted on use is
    downloaded and converted first."""
    text = str(name_or_path)
    entry = REGISTRY.get(text)
    if entry is not None and entry.converted_on_use and not Path(text).expanduser().exists():
        folder = prepare_registry_checkpoint(text).folder
        return ResolvedCheckpoint(folder / WEIGHTS_FILE, folder / CONFIG_FILE, text)
    return find_checkpoint(text)


def load_checkpoint(name_or_path: str | os.PathLike):
    """``(model, cfg, config document)`` of any source ``resolve_checkpoint`` accepts, eval mode. The document
    gains ``"weights_sha256"``: the weights file's content hash (``checkpoint.weights_sha256``), what identifies
    the model's content whatever its path."""
    text = str(name_or_path)
    entry = REGISTRY.get(text)
    if entry is not None and entry.converted_on_use and not Path(text).expanduser().exists():
        prepared = prepare_registry_checkpoint(text)
        if prepared.loaded is not None:  # this call converted it: the model is built already
            model, cfg, doc = prepared.loaded
            return model, cfg, {**doc, "weights_sha256": weights_sha256(prepared.folder / WEIGHTS_FILE)}
    resolved = resolve_checkpoint(text)
    model, cfg, doc = load_checkpoint_files(resolved)
    return model, cfg, {**doc, "weights_sha256": weights_sha256(resolved.weights)}


def resolve_model(name: str | os.PathLike, *, subset: str | None = None, presets: bool = False, device="cpu"):
    """THE one resolver of ``--model``: ``(model, cfg, config document)``, eval mode, on ``device``.

    With ``presets=True`` a preset name (``config.PRESET_NAMES``) that is not an existing path builds a randomly
    initialised network for ``subset`` (s4 when None); its document is what ``save_checkpoint`` would write. Any
    other name is a checkpoint: a folder or file, ``hf://owner/repo[@rev][/sub]`` or a ``REGISTRY`` name (those
    converted on use are downloaded and converted the first time). Anything else is a UsageError naming the
    accepted forms. With ``subset``, a checkpoint must fit it (``avsbench.subsets_compatible``) and ``cfg.subset``
    is set to it.
    """
    text = str(name)
    exists = Path(text).expanduser().exists()
    if presets and not exists and text in PRESET_NAMES:
        from av2ts_cli.model import build_model  # local: torch, loaded only when a network is built

        cfg = get_preset(text, subset or "s4")
        return build_model(cfg).to(device).eval(), cfg, checkpoint_config(cfg)
    if not (exists or text.startswith(HF_PREFIX) or text in REGISTRY):
        forms = "a checkpoint folder or .safetensors file, hf://owner/repo[@revision][/subfolder], or a model name " \
                f"({', '.join(sorted(REGISTRY))}; `av2ts models` lists them)"
        if presets:
            raise UsageError(f"--model {text}: no such file or folder, and neither a preset "
                             f"({', '.join(PRESET_NAMES)}) nor a checkpoint ({forms})")
        if text in PRESET_NAMES:
            raise UsageError(f"--model {text}: is a preset (an architecture), not a checkpoint; trained weights "
                             f"exist for the registry names only; pass {forms}")
        raise UsageError(f"--model {text}: no such file or folder, and not a checkpoint ({forms})")
    model, cfg, doc = load_checkpoint(text)
    if subset is not None:
        if not subsets_compatible(cfg.subset, subset):
            raise UsageError(f"{text} is a {cfg.subset} model; --subset is {subset}")
        cfg = dataclasses.replace(cfg, subset=subset)
    return model.to(device), cfg, doc


def check_finite_output(output, model, name: str, where: str = "") -> None:
    """A CheckpointError naming the model ``name`` when the semantic map ``output`` [B, T, K, S, S] (any shape)
    holds NaN or infinite values: such a map gives empty or arbitrary masks, never an answer. The message says
    whether the network's own tensors are the cause (and names the first of them) or its weights are finite (the
    computation overflowed: fp16, an input out of range). ``where``: what the window was (``" at t = 3.0 s"``).

    The test is the sum's: a NaN or infinity anywhere makes the sum NaN or infinite, and a semantic map's values lie
    in [0, 1], so a float32 sum cannot overflow by itself (why the sum and not ``isfinite``: docs/architecture.md,
    "Predict's checks")."""
    import torch  # local: torch takes seconds to import; this module is imported by `info` without a model

    if bool(torch.isfinite(output.sum())):
        return
    bad = [key for key, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        cause = f"{len(bad)} of its weight tensors hold NaN or infinite values ({first_keys(bad)}): a broken checkpoint"
    else:
        cause = "its weights are finite, so the computation overflowed (in fp16 or bf16, fp32 avoids that)"
    raise CheckpointError(name, f"the network's output is NaN or infinite{where}; {cause}")


# ------------------------------------------------------------------------------------------------ describe (info)
def describe_parameters(name_or_path: str, subset: str | None = None) -> dict:
    """Parameter counts per part (trainable and frozen; the parts of the network's family) of a preset (built for
    ``subset``, s4 if None, random init) or any checkpoint (``resolve_model``); for a family whose reference builds
    modules it never runs (VCT) also the reference's count (``"reference"``: parameters, and what av2ts leaves out);
    for a registry name also its published scores and licence (``"registry"``)."""
    text = str(name_or_path)
    if text in PRESET_NAMES and not Path(text).expanduser().exists():
        import torch  # local: torch takes seconds to import; this module is imported by `info` without a model

        from av2ts_cli.model import build_model  # local: the network, only when one is described

        cfg = get_preset(text, subset or "s4")
        with torch.device("meta"):  # counting needs no values: no memory, no initialisation (vct-swinb: 20 s)
            model = build_model(cfg)
    else:
        model, cfg, _ = resolve_model(text, subset=subset, presets=True)
    labels = parts_of_family(cfg.family)
    counts: dict[str, dict[str, int]] = {}
    for part in dict.fromkeys(labels.values()):
        counts[part] = {"parameters": 0, "trainable": 0, "frozen": 0}
    for key, param in model.named_parameters():
        entry = counts.setdefault(part_of(key, cfg.family), {"parameters": 0, "trainable": 0, "frozen": 0})
        entry["parameters"] += param.numel()
        entry["trainable" if param.requires_grad else "frozen"] += param.numel()
    parts = [{"part": part, **c} for part, c in counts.items() if c["parameters"] or part in labels.values()]
    total = {k: sum(p[k] for p in parts) for k in ("parameters", "trainable", "frozen")}
    report = {"name": text, "preset": cfg.preset, "family": cfg.family, "subset": cfg.subset,
              "num_classes": cfg.num_classes, "siam": cfg.siam, "parts": parts, "total": total}
    # modules the family's reference code builds and loads but never runs, left out here (VCT: VGGish's linear
    # layers): the reference's own count is the total plus these
    left_out = model.reference_only_parameters() if hasattr(model, "reference_only_parameters") else {}
    if left_out:
        report["reference"] = {"parameters": total["parameters"] + sum(left_out.values()), "left_out": left_out}
    entry = REGISTRY.get(text)
    if entry is not None and not Path(text).expanduser().exists():
        report["registry"] = {"description": entry.description, "source": entry.source,
                              "published": entry.published, "licence": entry.licence}
    return report
