"""Memorisation: each synthetic slice's nearest training slice in pixel space, against how near held-out real
slices come, the registered ``memorisation`` metric (needs the training store)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from brats_gan.images import area_downsample
from brats_gan.metrics.common import _batches, expand_channels, progress
from brats_gan.metrics.registry import (
    EvalData,
    ImageSet,
    MetricUnavailable,
    register_metric,
)

MEMORISATION_SIZE = 64


def nearest_distances(queries: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor,
                      batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, the RMS pixel difference to its nearest reference image, and that image's index.

    The nearest is found with float32 matrix products (a training store of thousands of slices stays small);
    its distance is then recomputed directly in float64, so an exact copy scores exactly 0."""
    q = torch.as_tensor(queries).float().flatten(1)
    r = torch.as_tensor(references).float().flatten(1)
    dist, index = [], []
    for part in progress(list(_batches(q.shape[0], batch)), "nearest training slices"):
        best = torch.cdist(q[part], r).argmin(dim=1)
        dist.append((q[part].double() - r[best].double()).square().mean(dim=1).sqrt())
        index.append(best)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()


def memorisation_figures(fake: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor) -> dict[str, Any]:
    """Nearest-training distances of synthetic and held-out real slices, and ``memorisation_share``: the share
    of synthetic slices closer to a training slice than the closest held-out real slice is."""
    d_fake, i_fake = nearest_distances(fake, train)
    d_real, _ = nearest_distances(heldout, train)
    threshold = float(d_real.min())
    return {
        "memorisation_share": float(np.mean(d_fake < threshold)),
        "memorisation_threshold": threshold,
        "nearest_train_fake_median": float(np.median(d_fake)),
        "nearest_train_real_median": float(np.median(d_real)),
        "nearest_train_fake": d_fake,
        "nearest_train_fake_index": i_fake,
    }


@register_metric
def memorisation(data: EvalData) -> dict[str, Any]:
    """Synthetic and held-out real slices against the training store, at most 64 px (see README)."""
    if data.train is None:
        raise MetricUnavailable("memorisation needs --train TRAIN.zarr (the generator's training store)")
    size = min(MEMORISATION_SIZE, data.fake.size, data.real.size, data.train.size)
    channels = max(data.channels, data.train.images.shape[1])

    def prepared(s: ImageSet) -> torch.Tensor:
        return expand_channels(area_downsample(s.images, size), channels)

    fake, train = prepared(data.fake), prepared(data.train)
    out = memorisation_figures(fake, train, prepared(data.real))
    d_fake, i_fake = out.pop("nearest_train_fake"), out.pop("nearest_train_fake_index")
    closest = np.argsort(d_fake, kind="stable")[:8]
    out["memorisation_size"] = size
    out["closest_pairs"] = [{
        "fake_sample": int(data.fake.indices[i]),
        "train_sample": int(data.train.indices[i_fake[i]]),
        "train_subject": str(data.train.subjects[i_fake[i]]),
        "train_slice_index": int(data.train.slice_index[i_fake[i]]),
        "distance": float(d_fake[i]),
    } for i in closest]
    return out
