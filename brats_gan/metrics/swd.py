"""SWD: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018), as ``swd_distance``
for the trainer's per-checkpoint figure and as the registered ``swd`` metric with its real-vs-real floor."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from brats_gan.metrics.common import _batches, expand_channels, progress
from brats_gan.metrics.registry import EvalData, MetricUnavailable, register_metric

SWD_PATCH = 7
SWD_PATCHES_PER_IMAGE = 128
SWD_REPEATS = 4
SWD_DIRECTIONS = 128
SWD_MIN_RESOLUTION = 16
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 binomial filter per channel with mirror padding (cv2.pyrDown's kernel, as progressive GAN uses)."""
    c = x.shape[1]
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(x)[None, None].expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    up = x.new_zeros(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3])
    up[:, :, ::2, ::2] = x
    return (4 * _blur(up))[:, :, : shape[0], : shape[1]]


def swd_resolutions(size: int) -> list[int]:
    """Pyramid levels from full resolution down to 16 px, as progressive GAN's SWD."""
    out = [size]
    while out[-1] // 2 >= SWD_MIN_RESOLUTION:
        out.append(out[-1] // 2)
    return out


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first; the last one is the low-pass residual."""
    pyramid = [x]
    for _ in range(1, levels):
        pyramid.append(_pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1], pyramid[-2].shape[-2:])
    return pyramid


def swd_descriptors(images: np.ndarray | torch.Tensor, rng: np.random.Generator,
                    channels: int | None = None, batch: int = 64) -> list[torch.Tensor]:
    """``SWD_PATCHES_PER_IMAGE`` random 7x7 patches of every image at every pyramid level, fully inside the
    level, as ``(patches, channel, 7, 7)`` float32 (unnormalised), one tensor per level."""
    images = torch.as_tensor(images)
    n, size = images.shape[0], images.shape[-1]
    levels = len(swd_resolutions(size))
    half = SWD_PATCH // 2
    offsets = torch.arange(-half, half + 1)
    out: list[list[torch.Tensor]] = [[] for _ in range(levels)]
    for part in progress(list(_batches(n, batch)), "SWD patches"):
        x = expand_channels(images[part].float(), channels or images.shape[1])
        for level, band in enumerate(laplacian_pyramid(x, levels)):
            b, c, h, w = band.shape
            k = b * SWD_PATCHES_PER_IMAGE
            img = torch.arange(b).repeat_interleave(SWD_PATCHES_PER_IMAGE)
            ys = torch.from_numpy(rng.integers(half, h - half, k))
            xs = torch.from_numpy(rng.integers(half, w - half, k))
            rows = (ys[:, None] + offsets)[:, None, :, None]
            cols = (xs[:, None] + offsets)[:, None, None, :]
            out[level].append(band[img[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols])
    return [torch.cat(parts) for parts in out]


def normalise_descriptors(descriptors: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Patches minus the reference patches' per-channel mean, over their std, flattened to ``(patches, dims)``.

    Progressive GAN normalises each set by its own statistics, which makes SWD blind to a global brightness or
    contrast change; one yardstick (the real set's) keeps such a change visible and figures comparable across
    checkpoints."""
    mean = reference.mean(dim=(0, 2, 3), keepdim=True)
    std = reference.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return ((descriptors - mean) / std).flatten(1).numpy()


def sliced_wasserstein(sets: list[np.ndarray], pairs: list[tuple[int, int]],
                       rng: np.random.Generator) -> list[float]:
    """For each pair of equally big ``(patches, dims)`` sets: the mean over random unit directions of the 1-D
    Wasserstein distance between the projections (sorted, mean absolute difference), as progressive GAN.
    The sets share the directions, so each set's projections are sorted once (numpy's row sort is ~50x
    faster than torch's on CPU)."""
    sizes = {s.shape for s in sets}
    if len(sizes) != 1:
        raise ValueError(f"SWD needs equally many patches of one size in every set, got {sorted(sizes)}")
    totals = np.zeros(len(pairs))
    for _ in range(SWD_REPEATS):
        dirs = rng.standard_normal((SWD_DIRECTIONS, sets[0].shape[1])).astype(np.float32)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        projections = [np.sort(dirs @ s.T, axis=1) for s in sets]
        totals += [np.abs(projections[a] - projections[b]).mean() for a, b in pairs]
    return (totals / SWD_REPEATS).tolist()


def swd_distance(reference: np.ndarray | torch.Tensor, other: np.ndarray | torch.Tensor,
                 seed: int = 0) -> dict[str, Any]:
    """SWD x 1e3 per pyramid level and their mean between two sets of equally many images."""
    rng = np.random.default_rng(seed)
    channels = max(reference.shape[1], other.shape[1])
    levels = []
    for a, b in zip(swd_descriptors(reference, rng, channels), swd_descriptors(other, rng, channels)):
        levels.append(1e3 * sliced_wasserstein([normalise_descriptors(a, a), normalise_descriptors(b, a)],
                                               [(0, 1)], rng)[0])
    return {"levels": levels, "mean": float(np.mean(levels)), "resolutions": swd_resolutions(reference.shape[-1])}


SWD_MIN_IMAGES = 8


def real_halves(subjects: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Two disjoint halves of positions ``0..n-1`` made of whole subjects (each subject, in a random order, goes
    to the side with fewer slices), so that no patient's neighbouring, nearly identical slices sit on both sides
    and flatter the floor; by slice when there is a single subject. Returns (a, b, split_by_subject)."""
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(np.asarray(subjects, dtype=str), return_inverse=True)
    if len(names) < 2:
        order = rng.permutation(len(inverse))
        return np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:]), False
    sides: list[list[np.ndarray]] = [[], []]
    counts = [0, 0]
    for subject in rng.permutation(len(names)):
        members = np.flatnonzero(inverse == subject)
        side = int(counts[1] < counts[0])
        sides[side].append(members)
        counts[side] += len(members)
    return np.sort(np.concatenate(sides[0])), np.sort(np.concatenate(sides[1])), True


def swd_images_per_side(real_subjects: np.ndarray, n_fake: int, seed: int) -> int:
    """Images in every SWD comparison: the smaller real half, capped by the synthetic set. Needs only the
    subjects, so evaluate can refuse too small a set before reading any pixel."""
    a, b, _ = real_halves(real_subjects, seed)
    return min(len(a), len(b), n_fake)


@register_metric
def swd(data: EvalData) -> dict[str, Any]:
    """``swd``: mean SWD of a synthetic subset against each real half; ``swd_floor``: the two real halves against
    each other. Every comparison has the same number of images and patches on each side and one normalisation
    (the real patches'), so the floor is what a generator of new patients would score at this sample size."""
    a, b, by_subject = real_halves(data.real.subjects, data.seed)
    m = swd_images_per_side(data.real.subjects, len(data.fake), data.seed)
    if m < SWD_MIN_IMAGES:
        raise MetricUnavailable(f"SWD and its floor need two real halves and a synthetic set of at least "
                                f"{SWD_MIN_IMAGES} slices each; here {len(a)}, {len(b)} and {len(data.fake)}")
    rng = np.random.default_rng(data.seed)
    half_a = data.real.images[np.sort(rng.permutation(a)[:m])]
    half_b = data.real.images[np.sort(rng.permutation(b)[:m])]
    fake = data.fake.images[np.sort(rng.permutation(len(data.fake))[:m])]
    desc = [swd_descriptors(x, rng, data.channels) for x in (half_a, half_b, fake)]
    fake_levels, floor_levels = [], []
    for patches_a, patches_b, patches_fake in zip(*desc):
        real = torch.cat([patches_a, patches_b])
        sets = [normalise_descriptors(x, real) for x in (patches_a, patches_b, patches_fake)]
        sw = sliced_wasserstein(sets, [(0, 2), (1, 2), (0, 1)], rng)
        fake_levels.append(1e3 * (sw[0] + sw[1]) / 2)
        floor_levels.append(1e3 * sw[2])
    return {
        "swd": float(np.mean(fake_levels)),
        "swd_floor": float(np.mean(floor_levels)),
        "swd_levels": fake_levels,
        "swd_floor_levels": floor_levels,
        "swd_resolutions": swd_resolutions(data.real.size),
        "swd_images_per_side": m,
        "swd_split": "subject" if by_subject else "slice",
    }
