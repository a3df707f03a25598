"""Every model name a user can ask for (``--model NAME``, ``av2ts download NAME``): one table, ``REGISTRY``.

A family that publishes weights adds its entries here and a converter module beside this one (``convert_*.py``);
nothing else changes. An entry's source is a ready av2ts checkpoint (a folder, ``hf://``) or an upstream file that
``upstream.py`` converts once on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _find_demo_model_dir() -> Path:
    """``assets/demo-model`` of a source checkout, or its copy inside the installed package (wheel)."""
    package_dir = Path(__file__).resolve().parents[1]  # av2ts_cli/
    for candidate in (package_dir / "assets" / "demo-model", package_dir.parent / "assets" / "demo-model"):
        if candidate.is_dir():
            return candidate
    return package_dir.parent / "assets" / "demo-model"  # not built yet: the source-checkout location


DEMO_MODEL_DIR = _find_demo_model_dir()


# ------------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class RegistryEntry:
    """A short model name: where its weights are, or why there are none to load."""

    source: str | None  # a local folder or an hf:// id; None: nothing loadable exists
    description: str
    convert_kind: str | None = None  # set when the source is an upstream file that `av2ts convert` imports
    # trained upstream checkpoints converted on first use (upstream.prepare_registry_checkpoint): the one .pth file
    # under hub_folder/<model folder>/ of the source repository, the model folder's name containing hub_match
    hub_folder: str | None = None
    hub_match: str | None = None
    published: dict | None = None  # the authors' scores, e.g. {"subset": "s4", "J": 81.7, "F": 90.1} (%)
    licence: str | None = None
    authors: str = "upstream authors"  # who trained the weights, for the checkpoint's trained_on

    @property
    def converted_on_use(self) -> bool:
        """A hub file that ``upstream.prepare_registry_checkpoint`` converts once and caches (not a ready
        checkpoint)."""
        return self.hub_folder is not None


# The COMBO authors' release (yannqi/COMBO-AVS README, "Checkpoints"; docs/model.md, 'COMBO'). J = mIoU, F =
# F-score, in %, as published (the README's table lists S4; MS3 and AVSS are the paper's). Trained checkpoints exist
# for S4 only, one detectron2 Checkpointer .pth per model folder under checkpoints/avs_s4/ (the folder names say the
# backbone; expected COMBO_R50_bs8_80k and COMBO_PVTV2B5_bs8_80k from the code's OUTPUT_DIR). No commit of the
# repository could be checked from here, so the revision is pinned to "main" (a commit hash belongs here once one is
# verified); the converted checkpoint is keyed by the downloaded file's content hash, so a changed upstream file is
# converted anew, never mixed up with the old one.
COMBO_HUB_REPO = "YannQi/COMBO-AVS-checkpoints"
COMBO_HUB = f"hf://{COMBO_HUB_REPO}@main"
COMBO_HUB_FOLDER = "checkpoints/avs_s4"
COMBO_LICENCE = "apache-2.0"  # yannqi/COMBO-AVS LICENSE; the checkpoints are the authors' release of that code
COMBO_PUBLISHED = {
    # name: (preset, subset, J, F, the word in its hub model folder's name; None: no trained weights published)
    "combo-r50-s4": ("combo-r50", "s4", 81.7, 90.1, "R50"),
    "combo-pvt-s4": ("combo-pvt", "s4", 84.7, 91.9, "PVT"),
    "combo-r50-ms3": ("combo-r50", "ms3", 54.5, 66.6, None),
    "combo-pvt-ms3": ("combo-pvt", "ms3", 59.2, 71.2, None),
    "combo-r50-avss": ("combo-r50", "avss", 33.3, 37.3, None),
    "combo-pvt-avss": ("combo-pvt", "avss", 42.1, 46.1, None),
}
_BACKBONE_NAMES = {"combo-r50": "ResNet-50", "combo-pvt": "PVT-v2-b5"}


def _combo_entry(preset: str, subset: str, j: float, f: float, match: str) -> RegistryEntry:
    return RegistryEntry(
        COMBO_HUB, f"COMBO (CVPR'24) {_BACKBONE_NAMES[preset]} trained on AVSBench {subset.upper()} by its authors "
                   f"(published J {j}, F {f}); converted from the COMBO code's checkpoint on first use, needs "
                   "maskiges (Siam encoder)",
        convert_kind="combo", hub_folder=COMBO_HUB_FOLDER, hub_match=match,
        published={"subset": subset, "J": j, "F": f}, licence=COMBO_LICENCE,
        authors="COMBO authors")


REGISTRY: dict[str, RegistryEntry] = {
    "demo": RegistryEntry(
        str(DEMO_MODEL_DIR),
        "av2ts-tiny trained on the synthetic 'sounding shapes' data shipped with av2ts (a demo, not a real model)"),
    **{name: _combo_entry(preset, subset, j, f, match)
       for name, (preset, subset, j, f, match) in COMBO_PUBLISHED.items() if match is not None},
    "ced-mini": RegistryEntry(
        # no revision is pinned: the commit hash of the repository could not be checked from here
        "hf://mispeech/ced-mini",
        "CED-Mini audio encoder (transformers safetensors), the audio part of AV2TS only", convert_kind="ced-hf"),
}
