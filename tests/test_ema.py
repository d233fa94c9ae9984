"""The averaged generator's arithmetic: what `--ema-images` and `--ema-rampup` promise a user."""

from __future__ import annotations

import pytest
import torch

from brats_gan.ema import AveragedGenerator
from brats_gan.models import Generator, get_config


def constant(module: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


def test_after_one_half_life_of_images_the_average_is_halfway_to_the_trained_weights() -> None:
    live = constant(Generator(get_config("tiny")), 0.0)
    average = AveragedGenerator(live, half_life_images=64, rampup=None)
    constant(live, 1.0)
    for step in range(1, 9):  # 8 steps of 8 images = one half-life
        average.update(live, images_seen=step * 8, batch=8)
    weights = torch.cat([p.flatten() for p in average.module.parameters()])
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5), rtol=0, atol=1e-6)
    for _ in range(8):  # another half-life: three quarters of the way
        average.update(live, images_seen=128, batch=8)
    torch.testing.assert_close(next(average.module.parameters()).flatten()[0], torch.tensor(0.75), rtol=0, atol=1e-6)


def test_the_ramp_up_lets_a_short_run_forget_its_first_random_weights() -> None:
    live = constant(Generator(get_config("tiny")), 0.0)
    ramped = AveragedGenerator(live, half_life_images=10_000, rampup=0.05)
    plain = AveragedGenerator(live, half_life_images=10_000, rampup=None)
    constant(live, 1.0)
    for step in range(1, 101):  # 400 images: a ramped half-life of at most 20
        ramped.update(live, images_seen=step * 4, batch=4)
        plain.update(live, images_seen=step * 4, batch=4)
    assert next(ramped.module.parameters()).flatten()[0] > 0.99
    assert next(plain.module.parameters()).flatten()[0] < 0.03  # 400 of 10,000 images: barely moved
    assert ramped.beta(images_seen=1_000_000, batch=4) == pytest.approx(0.5 ** (4 / 10_000))


def test_the_average_is_kept_in_float32_and_never_trained() -> None:
    live = Generator(get_config("tiny")).to(torch.bfloat16)
    average = AveragedGenerator(live, half_life_images=100)
    assert {p.dtype for p in average.module.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in average.module.parameters())
    assert all(p.requires_grad for p in live.parameters()), "the trained generator is left as it was"
    average.update(live, images_seen=4, batch=4)
    assert {p.dtype for p in average.module.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="half_life_images"):
        AveragedGenerator(live, half_life_images=0)
