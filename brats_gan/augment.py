"""Differentiable augmentation of the critic's inputs for limited data (DiffAugment, Zhao et al. 2020).

720 slices are very little for a GAN: the critic memorises them and its gradients stop teaching the
generator. DiffAugment applies the *same kind* of random transform to real and to generated images
just before the critic, differentiably, so the generator is trained through it and never learns to
produce the transforms themselves (augmenting only the real images would leak them into the
samples).

Policies, applied in this order, each drawing fresh parameters per image from torch's RNG on the
images' device (so checkpoints that save the RNG resume exactly):

- ``translation``: shift by up to 1/8 of the side in x and y, filling with the background (-1);
- ``cutout``: one square of half the side, at a random place, set to the background (-1);
- ``brightness``: add U(-0.5, 0.5);
- ``contrast``: scale each image's deviation from its mean by U(0.5, 1.5).

``probability`` (``--augment-p``) below 1 applies each policy to each image only with that
probability, as adaptive augmentation (ADA, Karras et al. 2020) does: on the phantoms, translation
and cutout applied always leave a faint 4 px grid in the generators, and 0.5 kept their SWD gain
with less of it (``benchmarks/README.md``).

DiffAugment's colour *saturation* is left out: on grey slices, or one modality repeated to three
channels, it changes nothing. Translation and cutout fill with -1 rather than DiffAugment's 0
because -1 is this schema's background, and a 0 frame would be an easy tell for the critic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POLICIES = ("translation", "cutout", "brightness", "contrast")
BACKGROUND = -1.0


def parse_policy(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"translation,cutout"`` / ``"all"`` / ``"none"`` -> the policy tuple, unknown names refused."""
    if text is None:
        return ()
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names in (["none"], []):
        return ()
    if names == ["all"]:
        return POLICIES
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(POLICIES)}, all or none")
    return tuple(n for n in POLICIES if n in names)


def diff_augment(x: torch.Tensor, policy: Sequence[str], probability: float = 1.0) -> torch.Tensor:
    """Images ``(B, C, H, W)`` -> augmented images, differentiable with respect to ``x``; each policy
    reaches each image with ``probability`` (1: always, drawing nothing more, as DiffAugment)."""
    for name in POLICIES:
        if name in policy:
            augmented = _AUGMENTS[name](x)
            if probability < 1:
                chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < probability
                augmented = torch.where(chosen, augmented, x)
            x = augmented
    return x


def translate(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sx, sx + 1, (b, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row of each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    moved = x.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1), cols.clamp(0, w - 1)].permute(0, 3, 1, 2)
    return torch.where(inside, moved, torch.full_like(moved, BACKGROUND))


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + 1 - ch % 2, (b, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + 1 - cw % 2, (b, 1, 1), device=x.device) - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    cut = ((rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)).unsqueeze(1)
    return torch.where(cut, torch.full_like(x, BACKGROUND), x)


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


_AUGMENTS = {"translation": translate, "cutout": cutout, "brightness": brightness, "contrast": contrast}
