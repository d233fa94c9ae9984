"""Named training recipes: the optimizer settings and WGAN knobs that go together, chosen by measurement
(``benchmarks/quality.py``, every run recorded in ``benchmarks/README.md``), not by guess.

A recipe sets defaults only: a flag given on the command line (``--n-critic``, ``--augment-p``, ...) or a
``--deepspeed-config`` file wins over it. Each preset names its recipe (``PRESET_RECIPES``); ``--recipe``
picks another. A run records the recipe it used, with every resolved value, in ``training_options.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from brats_gan.models import ModelConfig, get_config


@dataclass(frozen=True)
class Recipe:
    """What a recipe sets: Adam's parameters (DeepSpeed's ``optimizer.params``), ``TrainingConfig`` fields and
    ``ModelConfig`` fields."""

    summary: str
    adam: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


POSTER_ADAM = {"lr": 0.0002, "betas": [0.5, 0.999], "weight_decay": 0.001}
# one critic step per generator step, no DiffAugment: what the one-critic recipes share
ONE_CRITIC_TRAINING = {"n_critic": 1, "gp_lambda": 10.0, "augment": (), "augment_p": 1.0}
# one-critic-noise-resize's networks, which the hardtanh recipe extends
NOISE_RESIZE_MODEL = {"generator_dropout": 0.0, "critic_noise_std": 0.2, "upsample": "resize", "resize_mode": "nearest"}

RECIPES: dict[str, Recipe] = {
    "poster": Recipe(
        summary="the poster's Adam (lr 2e-4, beta1 0.5, L2 weight decay 1e-3) with WGAN-GP's n_critic 5 and "
                "lambda 10, and DiffAugment translation+cutout",
        adam=POSTER_ADAM,
        training={"n_critic": 5, "gp_lambda": 10.0, "augment": ("translation", "cutout"), "augment_p": 1.0},
    ),
    "wgan-gp": Recipe(
        summary="the published WGAN-GP optimizer (Gulrajani et al. 2017: Adam lr 1e-4, betas (0, 0.9), no decay), "
                "n_critic 5, lambda 10, DiffAugment translation+cutout",
        adam={"lr": 0.0001, "betas": [0.0, 0.9], "weight_decay": 0.0},
        training={"n_critic": 5, "gp_lambda": 10.0, "augment": ("translation", "cutout"), "augment_p": 1.0},
    ),
    "one-critic": Recipe(
        summary="the poster's Adam with one critic step per generator step, no DiffAugment and no generator "
                "dropout: the best of 14 variants on the tiny phantoms at equal wall time (3 seeds; "
                "benchmarks/README.md)",
        adam=POSTER_ADAM,
        training=ONE_CRITIC_TRAINING,
        model={"generator_dropout": 0.0},
    ),
    "one-critic-noise": Recipe(
        summary="one-critic with the critic's instance noise at 0.2 instead of 0.1: less grid and a lower SWD at "
                "2000 steps (checkerboard +2.8 dB over the real slices' against +4.6, SWD 2.6x the floor against "
                "3.0x; 3 seeds, benchmarks/README.md, issue 19)",
        adam=POSTER_ADAM,
        training=ONE_CRITIC_TRAINING,
        model={"generator_dropout": 0.0, "critic_noise_std": 0.2},
    ),
    "one-critic-noise-resize": Recipe(
        summary="one-critic-noise with the generator's upsampling by nearest-neighbour resize then 3x3 convolution: "
                "at 2000 steps the grid within 1 dB of the real slices' (median +0.85 dB against one-critic's "
                "+4.6) and SWD 2.4x the floor (3.0x) (3 seeds; benchmarks/README.md, issue 19)",
        adam=POSTER_ADAM,
        training=ONE_CRITIC_TRAINING,
        model=NOISE_RESIZE_MODEL,
    ),
    "one-critic-noise-resize-hardtanh": Recipe(
        summary="one-critic-noise-resize with a hardtanh output in place of tanh, so the generator can draw the real "
                "slices' exactly flat -1 background: SWD 1.62x the floor at 2000 steps against 2.49x (3 seeds; "
                "benchmarks/README.md, issue 19); the tiny presets' default",
        adam=POSTER_ADAM,
        training=ONE_CRITIC_TRAINING,
        model={**NOISE_RESIZE_MODEL, "generator_output": "hardtanh"},
    ),
}

# The recipe each preset trains with unless --recipe says otherwise; `paper` keeps the poster's. A run records the
# recipe it used, so a tiny run started with `one-critic` (the default until issue 19) resumes with its networks.
PRESET_RECIPES = {"paper": "poster", "tiny": "one-critic-noise-resize-hardtanh"}


def preset_family(preset: str) -> str:
    """``tiny`` or ``paper``: the presets a variant (``tiny-resize``, ``paper-faithful``) shares recipes and
    DeepSpeed defaults with."""
    return "tiny" if preset.startswith("tiny") else "paper"


def preset_recipe(preset: str) -> str:
    """The recipe ``preset`` trains with by default (its family's)."""
    return PRESET_RECIPES[preset_family(preset)]


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None


def model_config(preset: str, recipe: str | None = None, **given: Any) -> ModelConfig:
    """The networks a run trains: the preset's, with its recipe's model fields, then ``given`` (the command
    line's ``--upsample`` and the like, None meaning not given)."""
    chosen = get_recipe(recipe or preset_recipe(preset))
    return dataclasses.replace(get_config(preset),
                               **{**chosen.model, **{k: v for k, v in given.items() if v is not None}})
