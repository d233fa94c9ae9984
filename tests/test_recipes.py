"""Recipes as a user meets them: a preset trains with its own, --recipe picks another, a flag given wins,
a run records what it used, and a bad name is refused by field."""

from __future__ import annotations

from pathlib import Path

import pytest

from brats_gan.recipes import RECIPES, model_config, preset_recipe
from brats_gan.train_config import ConfigError, build_options


def options(tmp_path: Path, **given):
    keyed = {("data", "store"): str(tmp_path / "store.zarr"),
             **{("training", k): v for k, v in given.items()}}
    return build_options(keyed, tmp_path / "run", resume=False, world_size=1)


def test_each_preset_trains_with_its_recipe_unless_told_otherwise(tmp_path: Path) -> None:
    paper = options(tmp_path, preset="paper").training
    assert paper.recipe == "poster" == preset_recipe("paper")
    adam = paper.deepspeed["optimizer"]["params"]
    assert (adam["lr"], adam["betas"], adam["weight_decay"]) == (2e-4, [0.5, 0.999], 1e-3)
    assert (paper.n_critic, paper.gp_lambda) == (5, 10.0)

    tiny = options(tmp_path, preset="tiny-resize").training
    assert tiny.recipe == preset_recipe("tiny")
    recipe = RECIPES[tiny.recipe]
    assert {k: tiny.deepspeed["optimizer"]["params"][k] for k in recipe.adam} == recipe.adam
    assert all(getattr(tiny, k) == v for k, v in recipe.training.items())
    assert tiny.model == model_config("tiny-resize", tiny.recipe)


def test_a_flag_given_wins_over_the_recipe(tmp_path: Path) -> None:
    chosen = options(tmp_path, preset="tiny", recipe="wgan-gp", n_critic=2, critic_mbstd_group=4).training
    adam = chosen.deepspeed["optimizer"]["params"]
    assert (adam["lr"], adam["betas"], adam["weight_decay"]) == (1e-4, [0.0, 0.9], 0.0)
    assert chosen.n_critic == 2 and chosen.gp_lambda == RECIPES["wgan-gp"].training["gp_lambda"]
    assert chosen.model.critic_mbstd_group == 4
    own = options(tmp_path, preset="tiny", recipe="one-critic", generator_dropout=0.1).training
    assert RECIPES["one-critic"].model["generator_dropout"] == 0.0 and own.model.generator_dropout == 0.1


def test_the_generator_output_flag_reaches_the_networks_from_the_command_line(tmp_path: Path) -> None:
    """`--generator-output hardtanh` gives the paper preset the tiny default's flat background; a name argparse does
    not know is refused before anything runs."""
    import argparse

    from brats_gan.commands import train

    parser = argparse.ArgumentParser()
    train.configure_parser(parser)
    args = parser.parse_args(["--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run"),
                              "--preset", "paper", "--generator-output", "hardtanh"])
    given = train.given_options(args)
    paper = build_options(given, tmp_path / "run", resume=False, world_size=1).training
    assert paper.recipe == "poster" and paper.model.generator_output == "hardtanh"
    assert paper.model.upsample == "transposed", "only the output changes"
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s.zarr", "--out", "run", "--generator-output", "sigmoid"])


def test_a_bad_network_flag_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--generator-dropout.*generator_dropout must be a float in \[0, 1\)"):
        options(tmp_path, preset="tiny", generator_dropout=1.5)


def test_an_unknown_recipe_is_refused_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--recipe \(training.recipe\): unknown recipe 'best'.*poster"):
        options(tmp_path, preset="tiny", recipe="best")


def test_tiny_trains_without_the_grid_by_default_and_older_recipes_keep_their_networks(tmp_path: Path) -> None:
    """Issue 19: the tiny presets' recipe resizes then convolves, gives the critic more instance noise and ends in a
    hardtanh; a run recorded with `one-critic` (all tiny runs before) resumes with the networks it was built with."""
    tiny = options(tmp_path, preset="tiny").training
    assert tiny.recipe == "one-critic-noise-resize-hardtanh" and tiny.model.generator_output == "hardtanh"
    assert options(tmp_path, preset="tiny", recipe="one-critic-noise-resize").training.model.generator_output == "tanh"
    assert (tiny.model.upsample, tiny.model.resize_mode, tiny.model.critic_noise_std) == ("resize", "nearest", 0.2)
    assert (tiny.n_critic, tiny.augment, tiny.model.generator_dropout) == (1, (), 0.0)
    before = options(tmp_path, preset="tiny", recipe="one-critic").training
    assert (before.model.upsample, before.model.critic_noise_std) == ("transposed", 0.1)
    flagged = options(tmp_path, preset="tiny", upsample="subpixel").training
    assert flagged.model.upsample == "subpixel" and flagged.model.critic_noise_std == 0.2
    paper = options(tmp_path, preset="paper").training
    assert (paper.model.upsample, paper.model.critic_noise_std, paper.model.generator_output) == (
        "transposed", 0.1, "tanh"), "paper keeps Table I"
