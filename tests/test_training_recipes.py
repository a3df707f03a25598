"""av2ts_cli/training/recipes.py: which recipe a run gets, and the help texts derived from the table."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import invoke_cli

from av2ts_cli.training.recipes import RECIPES, Recipe, recipe_defaults, recipe_for


def test_recipe_for_falls_back_to_the_presets_s4_row_then_the_default():
    assert recipe_for("av2ts-pvt", "ms3") is RECIPES[("av2ts-pvt", "ms3")]
    assert recipe_for("av2ts-r50", "future-subset") is RECIPES[("av2ts-r50", "s4")]
    assert recipe_for("av2ts-huge", "s4") == Recipe(90_000, 8)


def test_recipe_defaults_state_the_table():
    assert recipe_defaults("lr") == "0.0001; av2ts-tiny 0.001"
    assert recipe_defaults("amp") == "off; av2ts-r50 avss on; av2ts-pvt avss on"
    assert recipe_defaults("batch") == "av2ts-r50 8; av2ts-pvt 4; av2ts-tiny 2"  # no value shared by most
    for field in dataclasses.fields(Recipe):
        text = recipe_defaults(field.name)
        for (preset, subset), recipe in RECIPES.items():
            value = getattr(recipe, field.name)
            shown = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"
            assert shown in text, (field.name, preset, subset, text)
    with pytest.raises(ValueError, match="no field"):
        recipe_defaults("momentum")


def test_train_help_shows_the_table_not_a_copy(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    text = " ".join(invoke_cli(["train", "--help"]).output.split())
    for field in ("iters", "batch", "lr", "backbone_lr_mult", "clip_norm", "amp", "augment", "ignore_padding"):
        assert recipe_defaults(field) in text, field
