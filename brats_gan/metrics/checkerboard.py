"""Checkerboard: the power spectrum's energy at the frequencies that stride-2 upsampling imprints
(the grid a transposed convolution leaves), for the registered ``checkerboard`` metric and the report."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from brats_gan.metrics.common import mean_power_spectrum
from brats_gan.metrics.registry import EvalData, register_metric


def checkerboard_points(size: int) -> list[np.ndarray]:
    """Per upsampling scale k = 1, 2, ...: a boolean (size, size) mask of the frequencies where a pattern of
    period 2^k pixels puts its energy, i.e. a stride-2 layer followed by k-1 more: (u, v) both multiples of
    size / 2^k, not both multiples of size / 2^(k-1). k = 1 is (N/2, 0), (0, N/2), (N/2, N/2).
    Scales stop at a period of size / 4, below which the points sit among the image's own lowest frequencies."""
    scales = max(1, int(math.log2(size)) - 2)
    coarser = np.zeros((size, size), dtype=bool)
    coarser[0, 0] = True
    out = []
    for k in range(1, scales + 1):
        f = np.unique(np.round(np.arange(2**k) * size / 2**k).astype(int) % size)
        lattice = np.zeros((size, size), dtype=bool)
        lattice[np.ix_(f, f)] = True
        out.append(lattice & ~coarser)
        coarser = lattice
    return out


def checkerboard_levels(images: np.ndarray | torch.Tensor) -> list[float]:
    """For each scale of :func:`checkerboard_points`, in dB: the mean power spectrum's energy at those points
    over the energy of their 8 neighbouring frequencies (averaged). A smooth spectrum gives about 0 dB; an
    upsampling layer whose output alternates with its period (a transposed convolution's uneven kernel overlap)
    puts a replica of the image's low frequencies there and gives tens of dB."""
    return spectrum_checkerboard_levels(mean_power_spectrum(images))


def spectrum_checkerboard_levels(spectrum: np.ndarray) -> list[float]:
    """:func:`checkerboard_levels` of a :func:`mean_power_spectrum` already computed."""
    p = spectrum + 1e-12
    neighbours = sum(np.roll(p, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx) / 8
    return [float(10 * np.log10(p[mask].sum() / neighbours[mask].sum())) for mask in checkerboard_points(p.shape[-1])]


def checkerboard_score(images: np.ndarray | torch.Tensor) -> float:
    """The strongest scale of :func:`checkerboard_levels` (dB): each stride-2 layer imprints its own scale, and
    the images show the grid when any one of them stands out."""
    return max(checkerboard_levels(images))


@register_metric
def checkerboard(data: EvalData) -> dict[str, Any]:
    """Grid effect of each set at the evaluation size; the real set's value is the reference."""
    fake, real = (spectrum_checkerboard_levels(s.power_spectrum) for s in (data.fake, data.real))
    return {"checkerboard": max(fake), "checkerboard_real": max(real),
            "checkerboard_levels": fake, "checkerboard_real_levels": real}
