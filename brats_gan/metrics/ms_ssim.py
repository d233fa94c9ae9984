"""MS-SSIM between random pairs within a set (diversity; Odena et al. 2017), the registered ``ms_ssim``
metric; torchmetrics is imported only when it runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from brats_gan.metrics.common import _batches, progress
from brats_gan.metrics.registry import EvalData, MetricUnavailable, register_metric

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11


def ms_ssim_scales(size: int) -> int:
    """Most scales (up to Wang et al.'s 5) whose coarsest image is still at least one 11 px Gaussian window
    wide, within torchmetrics' own size check: 5 at 256 px, 4 at 128, 3 at 64."""
    for n in range(len(MS_SSIM_BETAS), 0, -1):
        if size / 2 ** (n - 1) >= MS_SSIM_KERNEL and size // max(1, n - 1) ** 2 > MS_SSIM_KERNEL - 1:
            return n
    raise MetricUnavailable(f"MS-SSIM not computed: {size} px images are smaller than its {MS_SSIM_KERNEL} px window")


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """Wang et al.'s first ``scales`` exponents renormalised to sum to 1, so fewer scales keep a [0, 1] range."""
    betas = MS_SSIM_BETAS[:scales]
    return tuple(b / sum(betas) for b in betas)


def mean_pairwise_ms_ssim(images: np.ndarray | torch.Tensor, pairs: int = 256, seed: int = 0, batch: int = 32,
                          subjects: np.ndarray | None = None) -> tuple[float, int]:
    """Mean MS-SSIM (torchmetrics) over random pairs of distinct images, and the number of scales used.
    Higher means the set is less diverse (mode collapse pushes it towards 1). With ``subjects`` naming two or
    more, a pair never takes two slices of one subject: a patient's neighbouring slices are near copies and
    would make real data look less diverse than its patients are."""
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
    )

    x = torch.as_tensor(images)
    n = x.shape[0]
    if n < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 images")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, pairs)
    second = (first + rng.integers(1, n, pairs)) % n
    if subjects is not None and len(set(subjects)) > 1:
        subjects = np.asarray(subjects, dtype=str)
        clash = subjects[first] == subjects[second]
        while clash.any():
            first[clash] = rng.integers(0, n, int(clash.sum()))
            second[clash] = (first[clash] + rng.integers(1, n, int(clash.sum()))) % n
            clash = subjects[first] == subjects[second]
    scales = ms_ssim_scales(x.shape[-1])
    values = []
    for part in progress(list(_batches(pairs, batch)), "MS-SSIM"):
        values.append(multiscale_structural_similarity_index_measure(
            x[first[part]].float(), x[second[part]].float(), data_range=2.0, reduction="none",
            kernel_size=MS_SSIM_KERNEL, betas=ms_ssim_betas(scales),
        ))
    return float(torch.cat(values).mean()), scales


@register_metric
def ms_ssim(data: EvalData) -> dict[str, Any]:
    """Within-set diversity, each set in its own channels (no cross-set comparison, so nothing to align), pairs
    across subjects."""
    fake, scales = mean_pairwise_ms_ssim(data.fake.images, seed=data.seed, subjects=data.fake.subjects)
    real, _ = mean_pairwise_ms_ssim(data.real.images, seed=data.seed + 1, subjects=data.real.subjects)
    return {"ms_ssim_fake": fake, "ms_ssim_real": real, "ms_ssim_scales": scales}
