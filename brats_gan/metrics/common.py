"""Small helpers more than one metric uses: channel repetition, batching, the progress bar and the mean
power spectrum (the checkerboard score, and every image set's cached ``power_spectrum``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def expand_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A single channel repeated to ``channels`` (a view); any other count must already match."""
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 and channels > 1 else x


def _batches(n: int, batch: int) -> Iterator[slice]:
    for start in range(0, n, batch):
        yield slice(start, min(n, start + batch))


def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """tqdm on a terminal, silent in logs and tests."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None)


def mean_power_spectrum(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """|FFT|^2 of every image and channel minus its mean, as a share of its own total power, averaged over the
    set (unshifted, float64, sums to 1). Normalising each image first makes every slice count alike, so a few
    high-contrast slices do not hide how the rest look."""
    x = torch.as_tensor(images)
    total = torch.zeros(x.shape[-2:], dtype=torch.float64)
    for part in _batches(x.shape[0], 128):
        b = x[part].double()
        power = torch.fft.fft2(b - b.mean(dim=(-2, -1), keepdim=True)).abs().square()
        total += (power / power.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)).sum(dim=(0, 1))
    return (total / (x.shape[0] * x.shape[1])).numpy()
