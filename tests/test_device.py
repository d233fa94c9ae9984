"""What differs on a GPU, checked where it can be.

On any machine: every batch the loader hands over is a plain dense tensor that ``pin_memory`` accepts
(the first CUDA batch once died there, on a stride-0 ``expand`` view, while every CPU test passed),
and a single stored channel reaches the networks repeated to three only after the copy to the device.

On a GPU (``python -m pytest -m cuda``): the device path itself, through the real commands: training
steps with pinned, non-blocking batches in fp32 and bf16, a checkpoint and ``--resume``, ``generate``
on the device, and ``evaluate`` of what it wrote. Skipped, with the reason shown, where no GPU is.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from training_runs import REPO, launch, metric_steps

from brats_gan.data import SliceStream, iterate_batches, to_model

STORED_CHANNELS = {1: ("flair",), 3: ("flair", "t1ce", "t2")}
LOADERS = {"cached": ("memory", 0), "streamed": ("stream", 0), "streamed-workers": ("stream", 2)}


def assert_pinnable(batch: torch.Tensor) -> None:
    """What ``Tensor.pin_memory`` does, on any machine: allocate a buffer with the batch's own strides
    and copy into it, which torch refuses when elements of the batch share memory (then for real on CUDA)."""
    assert type(batch) is torch.Tensor, f"a plain tensor, not {type(batch).__name__}"
    assert all(stride > 0 for size, stride in zip(batch.shape, batch.stride()) if size > 1), \
        f"stride 0 on an axis of the batch: {tuple(batch.shape)} with strides {batch.stride()}"
    torch.empty_strided(batch.shape, batch.stride(), dtype=batch.dtype).copy_(batch)
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert torch.equal(pinned.to("cuda", non_blocking=True).cpu(), batch)


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("stored", sorted(STORED_CHANNELS))
@pytest.mark.parametrize("size", [64, 256])
def test_every_batch_can_be_pinned_and_keeps_the_stored_channels(store_factory, loader: str, stored: int,
                                                                 size: int) -> None:
    store = store_factory(subjects=2, slices=16, channels=STORED_CHANNELS[stored])
    cache, workers = LOADERS[loader]
    stream = SliceStream(str(store), batch_size=4, image_size=size, seed=1, cache=cache, window_batches=2)
    assert stream.cached == (cache == "memory")
    batches = list(itertools.islice(iterate_batches(stream, num_workers=workers), 9))  # crosses an epoch
    for _, batch in batches:
        # the loader moves what is stored: one channel stays one (repeated on the device), three stay three
        assert batch.shape == (4, stored, size, size)
        assert_pinnable(batch)
    for _, batch in batches[:2]:
        model_input = to_model(batch, "cpu", torch.float32)
        assert model_input.shape == (4, 3, size, size) and model_input.is_contiguous()
        assert torch.equal(model_input, batch.float().expand(-1, 3, -1, -1))


def test_a_batch_of_other_channels_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="2 channels cannot feed a network of 3"):
        to_model(torch.zeros(1, 2, 8, 8), "cpu", torch.float32)
