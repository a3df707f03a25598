"""Per-preset training defaults (``Recipe``): the values a run takes for every option the user leaves out.

The reference recipe (docs/model.md, "Training"; from the reference configs): AdamW, weight decay 0.05, backbone LR
x0.1, the poly schedule without warm-up, gradient clipping of the whole model's L2 norm at 0.01, a batch counted in
clips, fp16 AMP for AVSS. ``av2ts-tiny`` has its own, measured on the synthetic data (see ``_TINY``).

Standard library only: ``cli`` reads this table at import time for its help texts, and ``--help`` must not wait for
torch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Per-preset training defaults: iterations, global batch (clips), base LR, backbone LR factor, gradient clipping,
    AMP (CUDA only), the training augmentation, whether pixels labelled 255 weigh 0 in the losses
    (``ignore_padding``; off: they are negatives, as in the reference; docs/model.md, "Training fidelity"), the
    evaluation period (``eval_every``), AdamW's weight decay (``decay_norms``: on normalisation layers and
    embeddings too), the poly schedule's power (0: a constant LR), the run's length in epochs of the training set
    (``epochs`` > 0 replaces ``iters``) and the epochs the visual backbone stays frozen (``frozen_epochs``). Epochs
    become iterations of the chosen batch and training set when a run starts (``TrainOptions.counted``)."""

    iters: int
    batch: int
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1
    clip_norm: float = 0.01
    amp: bool = False
    augment: bool = True
    ignore_padding: bool = False
    eval_every: int = 100  # evaluate on --eval-split and save every N iterations (0: only at the end)
    weight_decay: float = 0.05
    decay_norms: bool = False
    poly_power: float = 0.9
    epochs: int = 0
    frozen_epochs: int = 0


# r50/pvt: the reference configs (docs/model.md, "Training"). av2ts-tiny trains from random weights (no pretrained
# backbone, a random frozen CED) on the synthetic data in minutes; measured on synthetic S4
# (tests/test_training_trainer.py, assets/README.md), each of these departures made it learn faster:
# - lr 1e-3, backbone x1: the reference's 1e-4 and x0.1 suit pretrained backbones;
# - no gradient clipping: clipping the whole gradient at 0.01 scales every element to ~1e-6 and below, where
#   AdamW's eps (1e-8) damps the updates of the small-gradient parts (the layer-scaled OSA blocks: ~1e-10): 0.80 vs
#   0.59 val mIoU after 500 iterations on the same data and seed;
# - no augmentation: the synthetic clips vary enough; the reference's random resize (0.5-2x) and crop slow the start
#   (0.88 vs 0.84 at 500 iterations, 0.65 vs 0.39 at 100);
# - batch 2: more, cheaper steps for the same CPU time.
_TINY = Recipe(3_000, 2, lr=1e-3, backbone_lr_mult=1.0, clip_norm=0.0, augment=False)
# combo-tiny: av2ts-tiny's departures, for the same reasons (random weights, synthetic data; the bilateral fusion's
# layer scales start at 1e-4 as OSA's). On the CI's synthetic S4 (tests/test_training_recipes.py) it reaches val mIoU
# 0.965 after 300 iterations (0.52 with shuffled audio), once its random frozen VGGish hears the clips apart (He init,
# model/vggish.py; with PyTorch's default init it gave every clip the same embedding and stalled at 0.50).
_COMBO_TINY = Recipe(3_000, 2, lr=1e-3, backbone_lr_mult=1.0, clip_norm=0.0, augment=False)
# AVSegFormer (spec: the reference's configs and scripts/*/train.py): torch's AdamW over model.parameters() at lr
# 2e-5 (betas, eps and weight decay 0.01 torch's defaults, on every parameter), no schedule, no warm-up, no
# clipping, no AMP, no augmentation; batch 2 clips (AVSS 4); 30 epochs (MS3 60) with the backbone frozen for the
# first 5 (MS3 10, AVSS none). The reference validates every epoch (AVSS every second one from epoch 10): eval_every
# is one epoch of the official training sets at the recipe's batch (S4 3,452 / 2, MS3 296 / 2; AVSS two epochs of
# 8,498 / 4, a count the data spec has not confirmed).
_AVSEGFORMER = {"lr": 2e-5, "backbone_lr_mult": 1.0, "clip_norm": 0.0, "augment": False, "weight_decay": 0.01,
                "decay_norms": True, "poly_power": 0.0}
_AVSEGFORMER_S4 = Recipe(0, 2, eval_every=1726, epochs=30, frozen_epochs=5, **_AVSEGFORMER)
_AVSEGFORMER_MS3 = Recipe(0, 2, eval_every=148, epochs=60, frozen_epochs=10, **_AVSEGFORMER)
_AVSEGFORMER_AVSS = Recipe(0, 4, eval_every=4249, epochs=30, frozen_epochs=0, **_AVSEGFORMER)
# avsegformer-tiny: the reference's recipe (constant LR, AdamW on every parameter, its losses) with departures for
# random weights on synthetic data: lr 2e-4, a length in iterations (3,000), no frozen epochs (its backbone is
# random). Not the other tiny presets' 1e-3: their losses have a BCE or cross-entropy term, AVSegFormer's S4/MS3
# loss is Dice on a sigmoid alone, whose gradient vanishes once the sigmoid saturates. Measured on the CI's synthetic
# S4 at 64 px (tests/test_training_recipes.py, seed 0, 2026-12-08): at 1e-3 the logits fall to -20..-240 within 10
# steps (Dice 1.0, gradients ~1e-13 in the head) and the run stalls near val mIoU 0.3 (the denormal gradients also
# make those steps ~10x slower on a CPU); 1e-4 reaches only 0.5 after 100 (both shapes, audio unused: shuffled 0.50);
# 2e-4 gives 0.68 / 0.83 / 0.89 / 0.91 after 100 / 150 / 200 / 300 iterations (shuffled audio 0.39 at 300; seed 1:
# 0.86 after 100), 3e-4 0.52 / 0.69 / 0.87 / 0.91 with a transient collapse (Dice 1.0 at step 30); those curves
# come from a plain loop over the same data. The test itself (`av2ts train`, 150 iterations then --resume to 300,
# `av2ts eval`): 0.903 with the clips' own audio, 0.499 shuffled (0.908 / 0.498 with one thread).
_AVSEGFORMER_TINY = Recipe(3_000, 2, **{**_AVSEGFORMER, "lr": 2e-4})
# VCT (spec vct.md section 11; its configs' SOLVER and TEST blocks): AV2TS's optimiser (AdamW 1e-4, weight decay
# 0.05 but 0 on norms, embeddings and Swin's relative-position tables, backbone x0.1 for both Swins, the whole
# gradient clipped at 0.01, poly 0.9 without warm-up) and augmentation at 384; S4 batch 2 for 45k iterations with
# an evaluation every 1000, MS3 batch 2, 40k, every 500, AVSS batch 8, 45k, every 2500 with fp16 AMP.
# vct-tiny: the other tiny presets' departures for random weights on synthetic data (lr 1e-3, backbone x1, no
# clipping, no augmentation, batch 2). Measured on the CI's synthetic S4 (tests/test_training_recipes.py; seed 0,
# 2026-12-07, the shared 2-core machine under a load of 6-11, one thread): through `av2ts train` 150 iterations then
# --resume to 300, val mIoU 0.956, shuffled audio 0.521 (after the first 150 alone: 0.289); in a loop with the same
# recipe, val 0.30 / 0.54 / 0.77 / 0.96 / 0.97 after 50 / 100 / 150 / 200 / 300 iterations (0.873 for a 200-iteration
# schedule). lr 2e-3 was worse (0.26 after 100, 0.43 after 150). A step runs the labelled frame of each clip only
# (training.optim.supervised_frames): 0.45 s a step there.
_VCT_TINY = Recipe(3_000, 2, lr=1e-3, backbone_lr_mult=1.0, clip_norm=0.0, augment=False)
RECIPES: dict[tuple[str, str], Recipe] = {
    ("av2ts-r50", "s4"): Recipe(90_000, 8),
    ("av2ts-r50", "ms3"): Recipe(20_000, 8),
    ("av2ts-r50", "avss"): Recipe(180_000, 8, amp=True),
    ("av2ts-pvt", "s4"): Recipe(180_000, 4),
    ("av2ts-pvt", "ms3"): Recipe(40_000, 4),
    ("av2ts-pvt", "avss"): Recipe(180_000, 4, amp=True),
    ("av2ts-tiny", "s4"): _TINY,
    ("av2ts-tiny", "ms3"): _TINY,
    ("av2ts-tiny", "avss"): _TINY,
    # COMBO (docs/model.md, 'COMBO', its base yamls): the optimiser, schedule, backbone x0.1 (Siam encoder
    # included), clipping at 0.01 and augmentation of AV2TS; AMP off everywhere; the evaluation period is COMBO's
    # EVAL_PERIOD (5000, MS3 400), on the val split like every av2ts run (--eval-split val; the AV2TS reference
    # evaluated on test). PVT trains with batch 8 for 90k (MS3 20k) iterations, half AV2TS's 180k at batch 4; R50
    # AVSS 90k (AV2TS 180k). Deep supervision covers all 10 outputs of its 9 decoder layers (the learned queries'
    # prediction and one per layer: the network's aux_outputs, LossConfig.deep_supervision), the cosine loss the 9
    # masks that feed the layers.
    ("combo-r50", "s4"): Recipe(90_000, 8, eval_every=5000),
    ("combo-r50", "ms3"): Recipe(20_000, 8, eval_every=400),
    ("combo-r50", "avss"): Recipe(90_000, 8, eval_every=5000),
    ("combo-pvt", "s4"): Recipe(90_000, 8, eval_every=5000),
    ("combo-pvt", "ms3"): Recipe(20_000, 8, eval_every=400),
    ("combo-pvt", "avss"): Recipe(90_000, 8, eval_every=5000),
    ("combo-tiny", "s4"): _COMBO_TINY,
    ("combo-tiny", "ms3"): _COMBO_TINY,
    ("combo-tiny", "avss"): _COMBO_TINY,
    ("vct-swinb", "s4"): Recipe(45_000, 2, eval_every=1000),
    ("vct-swinb", "ms3"): Recipe(40_000, 2, eval_every=500),
    ("vct-swinb", "avss"): Recipe(45_000, 8, amp=True, eval_every=2500),
    ("vct-tiny", "s4"): _VCT_TINY,
    ("vct-tiny", "ms3"): _VCT_TINY,
    ("vct-tiny", "avss"): _VCT_TINY,
    ("avsegformer-r50", "s4"): _AVSEGFORMER_S4,
    ("avsegformer-r50", "ms3"): _AVSEGFORMER_MS3,
    ("avsegformer-r50", "avss"): _AVSEGFORMER_AVSS,
    ("avsegformer-pvt", "s4"): _AVSEGFORMER_S4,
    ("avsegformer-pvt", "ms3"): _AVSEGFORMER_MS3,
    ("avsegformer-pvt", "avss"): _AVSEGFORMER_AVSS,
    ("avsegformer-tiny", "s4"): _AVSEGFORMER_TINY,
    ("avsegformer-tiny", "ms3"): _AVSEGFORMER_TINY,
    ("avsegformer-tiny", "avss"): _AVSEGFORMER_TINY,
}
_FALLBACK = Recipe(90_000, 8)  # a preset without a row of its own (a checkpoint of a newer av2ts): the r50 S4 one


def recipe_for(preset: str, subset: str) -> Recipe:
    """The recipe of (preset, subset); the preset's S4 recipe for a subset without a row; ``_FALLBACK`` else."""
    return RECIPES.get((preset, subset)) or RECIPES.get((preset, "s4")) or _FALLBACK


def _value(recipe: Recipe, field: str):
    """A recipe's value of ``field`` as the help shows it: a length in epochs reads "30 epochs" under ``iters``."""
    if field == "iters" and recipe.epochs:
        return f"{recipe.epochs} epochs"
    return getattr(recipe, field)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipe_defaults(field: str) -> str:
    """``RECIPES``' values of one ``Recipe`` field as help text, e.g. ``"0.0001; av2ts-tiny 0.001"``: the value most
    (preset, subset) pairs share first when more than half share it, then each preset's own values."""
    if field not in {f.name for f in dataclasses.fields(Recipe)}:
        raise ValueError(f"Recipe has no field {field!r}")
    values = {key: _value(recipe, field) for key, recipe in RECIPES.items()}
    common, count = Counter(values.values()).most_common(1)[0]
    if count * 2 <= len(values):
        common = None
    parts = []
    for preset in dict.fromkeys(p for p, _ in values):
        own = {s: v for (p, s), v in values.items() if p == preset}
        differing = {s: v for s, v in own.items() if common is None or v != common}
        if not differing:
            continue
        if len(differing) == len(own) and len(set(own.values())) == 1:
            parts.append(f"{preset} {_shown(next(iter(own.values())))}")
        else:
            parts.append(f"{preset} " + ", ".join(f"{s} {_shown(v)}" for s, v in differing.items()))
    return "; ".join(([_shown(common)] if common is not None else []) + parts)
