"""Small helpers more than one metric uses: channel repetition, batching and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
