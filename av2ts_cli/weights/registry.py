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
    hub_folder: str | None = None  # "": the repository's root (a model folder anywhere in it)
    hub_match: str | None = None
    hub_file: str | None = None  # when set, only files of this name in the model folder (e.g. model_best.pth)
    convert_preset: str | None = None  # the architecture to convert into (None: the converter's default)
    convert_subset: str | None = None  # the subset to convert for (None: the converter reads it from the file)
    # an upstream file on Google Drive (its file id), fetched with gdown into av2ts's cache and converted on first
    # use (upstream.prepare_registry_checkpoint); source is then the file's page, for people
    gdrive_id: str | None = None
    published: dict | None = None  # the authors' scores, e.g. {"subset": "s4", "J": 81.7, "F": 90.1} (%)
    licence: str | None = None
    authors: str = "upstream authors"  # who trained the weights, for the checkpoint's trained_on

    @property
    def converted_on_use(self) -> bool:
        """A hub or Google Drive file that ``upstream.prepare_registry_checkpoint`` converts once and caches (not a
        ready checkpoint)."""
        return self.hub_folder is not None or self.gdrive_id is not None


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
        convert_kind="combo", hub_folder=COMBO_HUB_FOLDER, hub_match=match, convert_preset=preset,
        published={"subset": subset, "J": j, "F": f}, licence=COMBO_LICENCE,
        authors="COMBO authors")


# VCT (CVPR 2025, spyflying/VCT_AVS README "Model Zoo"; docs/model.md, 'VCT'): one detectron2 Checkpointer file per
# subset, <subset>_swinb_384/model_best.pth in nowherespyfly/VCT_AVS (AVSS's folder says "ss"), all Swin-B-384 with the
# Siam encoder. J = mIoU, F = F-score in %, as the README publishes them. Revision "main", as COMBO's above: the
# converted checkpoint is keyed by the downloaded file's content hash.
VCT_HUB = "hf://nowherespyfly/VCT_AVS@main"
VCT_LICENCE = "apache-2.0"  # spyflying/VCT_AVS LICENSE; the checkpoints are the authors' release of that code
VCT_PUBLISHED = {
    # name: (subset, J, F, the word its hub model folder starts with)
    "vct-s4": ("s4", 86.2, 93.4, "s4"),
    "vct-ms3": ("ms3", 67.6, 81.4, "ms3"),
    "vct-avss": ("avss", 52.5, 56.9, "ss"),
}


def _vct_entry(subset: str, j: float, f: float, match: str) -> RegistryEntry:
    return RegistryEntry(
        VCT_HUB, f"VCT (CVPR'25) two Swin-B-384 trained on AVSBench {subset.upper()} by its authors (published J {j}, "
                 f"F {f}); converted from the VCT code's checkpoint on first use, needs maskiges at 384 px (Siam "
                 "encoder); the heaviest network here",
        convert_kind="vct", hub_folder="", hub_match=match, hub_file="model_best.pth", convert_preset="vct-swinb",
        convert_subset=subset, published={"subset": subset, "J": j, "F": f}, licence=VCT_LICENCE, authors="VCT authors")


# AVSegFormer (AAAI'24, vvvb-github/AVSegFormer at 7083cb6, its README L42-54; av2ts's README, 'Models and weights'):
# one bare state dict per model, each a Google Drive file (the folder 1ZYZOWAfoXcGPDsocswEN7ZYvcAn4H8kY holds them;
# the file names are not published). J = mIoU, F = F-score in %, as that README publishes them, computed by the
# authors' test code, whose protocol `av2ts eval --protocol avsegformer` reproduces (S4/MS3 at 512 x 512 against
# labels upsampled from 224, F per 2 videos; AVSS with the padded frames). The repository states no licence, so av2ts
# does not re-host the files: they are fetched from Google Drive on request only (gdown, upstream.gdrive_file),
# converted once and kept in av2ts's cache, keyed by their sha256.
AVSEGFORMER_LICENCE = "none stated"  # no LICENSE file, no licence in the README (spec: avsegformer.md, section 8)
AVSEGFORMER_PUBLISHED = {
    # name: (preset, subset, J, F, Google Drive file id)
    "avsegformer-r50-s4": ("avsegformer-r50", "s4", 76.38, 86.7, "1nvIfR-1XZ_BgP8ZSUDuAsGhAwDJRxgC3"),
    "avsegformer-pvt-s4": ("avsegformer-pvt", "s4", 83.06, 90.5, "1ZJ55jxoHP1ur-hLBkGcha8sjptE_shfw"),
    "avsegformer-r50-ms3": ("avsegformer-r50", "ms3", 53.81, 65.6, "1MRk5gQnUtiWwYDpPfB20fO07SVLhfuIV"),
    "avsegformer-pvt-ms3": ("avsegformer-pvt", "ms3", 61.33, 73.0, "1iKTxWtehAgCkNVty-4H1zVyAOaNxipHv"),
    "avsegformer-r50-avss": ("avsegformer-r50", "avss", 26.58, 31.5, "1RvL6psDsINuUwd9V1ESgE2Kixh9MXIke"),
    "avsegformer-pvt-avss": ("avsegformer-pvt", "avss", 37.31, 42.8, "1P8a2dJSUoW0EqFyxyP8B1-Rnscxnh0YY"),
}
_AVSEGFORMER_BACKBONES = {"avsegformer-r50": "ResNet-50", "avsegformer-pvt": "PVT-v2-b5"}


def gdrive_page(file_id: str) -> str:
    """The page of a Google Drive file, for people (what a registry entry's source names)."""
    return f"https://drive.google.com/file/d/{file_id}/view"


def _avsegformer_entry(preset: str, subset: str, j: float, f: float, file_id: str) -> RegistryEntry:
    return RegistryEntry(
        gdrive_page(file_id),
        f"AVSegFormer (AAAI'24) {_AVSEGFORMER_BACKBONES[preset]} trained on AVSBench {subset.upper()} by its authors "
        f"(published J {j}, F {f}, protocol avsegformer); downloaded from Google Drive and converted on first use; "
        "needs no maskiges, any clip length",
        convert_kind="avsegformer", convert_preset=preset, convert_subset=subset, gdrive_id=file_id,
        published={"subset": subset, "J": j, "F": f, "protocol": "avsegformer"}, licence=AVSEGFORMER_LICENCE,
        authors="AVSegFormer authors")


REGISTRY: dict[str, RegistryEntry] = {
    "demo": RegistryEntry(
        str(DEMO_MODEL_DIR),
        "av2ts-tiny trained on the synthetic 'sounding shapes' data shipped with av2ts (a demo, not a real model)"),
    **{name: _combo_entry(preset, subset, j, f, match)
       for name, (preset, subset, j, f, match) in COMBO_PUBLISHED.items() if match is not None},
    **{name: _vct_entry(subset, j, f, match) for name, (subset, j, f, match) in VCT_PUBLISHED.items()},
    **{name: _avsegformer_entry(preset, subset, j, f, file_id)
       for name, (preset, subset, j, f, file_id) in AVSEGFORMER_PUBLISHED.items()},
    "ced-mini": RegistryEntry(
        # no revision is pinned: the commit hash of the repository could not be checked from here
        "hf://mispeech/ced-mini",
        "CED-Mini audio encoder (transformers safetensors), the audio part of AV2TS only", convert_kind="ced-hf"),
}
