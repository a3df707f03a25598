"""Rename rules, the one way every converter maps a foreign key onto an av2ts key, and the rule sets more than one
family shares (the Mask2Former-style decoder and the deformable-attention pixel decoder that AV2TS, COMBO and VCT
all inherit from detectron2's MaskFormer code, under the same reference names).

Pure: the standard library only, so a family's key mapping stays importable (and testable) without torch's file
readers or the network.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """Source keys matching ``pattern`` (a regex anchored at the start) are renamed by replacing the matched prefix
    with ``target`` (a ``re`` template, or a function of the match); ``target=None`` drops them for ``reason``."""

    pattern: str
    target: str | Callable[[re.Match], str] | None
    reason: str = ""


def stage(offset: int, template: str) -> Callable[[re.Match], str]:
    """A target that renumbers the first group: ``stage(-1, "layer{}.")`` turns res2 into layer1."""
    return lambda m: template.format(int(m[1]) + offset, *m.groups()[1:])


def apply_rules(key: str, rules: list[Rule]) -> tuple[str | None, Rule | None]:
    """(new key, the rule that matched) by the first matching rule; (None, rule) when that rule drops the key;
    (``key``, None) when no rule matches (the caller decides what an unmatched key means)."""
    for rule in rules:
        match = re.match(rule.pattern, key)
        if match:
            if rule.target is None:
                return None, rule
            new = rule.target(match) if callable(rule.target) else match.expand(rule.target)
            return new + key[match.end():], rule
    return key, None


_PIXEL = r"sem_seg_head\.pixel_decoder\."
_PRED = r"sem_seg_head\.predictor\."

# the multi-scale deformable-attention pixel decoder (MSDeformAttnPixelDecoder) -> model/pixel_decoder.py, without
# its input projections (AV2TS never runs them, COMBO and VCT do: each family says what it does with them)
PIXEL_DECODER_RULES = [
    Rule(_PIXEL + r"transformer\.level_embed$", "pixel_decoder.level_embed"),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"pixel_decoder.layers.\1.attn."),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.linear([12])\.", r"pixel_decoder.layers.\1.fc\2."),
    Rule(_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.(norm[12])\.", r"pixel_decoder.layers.\1.\2."),
    Rule(_PIXEL + r"mask_features\.", "pixel_decoder.mask_projection."),
    Rule(_PIXEL + r"adapter_1\.norm\.", "pixel_decoder.lateral.norm."),
    Rule(_PIXEL + r"adapter_1\.", "pixel_decoder.lateral.conv."),
    Rule(_PIXEL + r"layer_1\.norm\.", "pixel_decoder.output.norm."),
    Rule(_PIXEL + r"layer_1\.", "pixel_decoder.output.conv."),
]
PIXEL_INPUT_PROJ_RULE = Rule(_PIXEL + r"input_proj\.(\d+)\.", r"pixel_decoder.input_proj.\1.")

# the Mask2Former transformer decoder (MultiScaleMaskedTransformerDecoder) -> model/decoder.py
DECODER_RULES = [
    Rule(_PRED + r"transformer_self_attention_layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.self_attn."),
    Rule(_PRED + r"transformer_self_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.self_norm."),
    Rule(_PRED + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.cross_attn."),
    Rule(_PRED + r"transformer_cross_attention_layers\.(\d+)\.norm\.", r"decoder.layers.\1.cross_norm."),
    Rule(_PRED + r"transformer_ffn_layers\.(\d+)\.linear([12])\.", r"decoder.layers.\1.fc\2."),
    Rule(_PRED + r"transformer_ffn_layers\.(\d+)\.norm\.", r"decoder.layers.\1.ffn_norm."),
    Rule(_PRED + r"decoder_norm\.", "decoder.norm."),
    Rule(_PRED + r"(query_feat|query_embed|level_embed|class_embed|mask_embed)\.", r"decoder.\1."),
]
