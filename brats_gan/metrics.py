"""Metrics that compare a synthetic slice set with a real one, as a registry like StyleGAN2-ADA's ``metric_main``.

Each metric is a function ``EvalData -> dict`` registered under its name; :func:`calc_metric` runs one and times
it, :func:`report_metric` appends its result to ``metric-<name>.jsonl`` in a report folder, so repeated
evaluations of successive checkpoints accumulate one line each. The numerical pieces (:func:`swd_distance`,
:func:`checkerboard_score`, :func:`mean_pairwise_ms_ssim`, :func:`nearest_distances`, :func:`frechet_distance`,
:func:`kernel_distance`) take plain arrays, so tests can feed them cases whose answer is known.

Images are float arrays ``(sample, channel, y, x)`` in [-1, 1], as stored. The README section "Evaluating
synthetic slices" defines every figure; the docstrings here say why each is computed the way it is.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from brats_gan.images import area_downsample

# --------------------------------------------------------------------------------------------
# the data every metric receives


@dataclass
class ImageSet:
    """Slices read from one store, at the evaluation size, in the store's own channels."""

    path: str
    images: np.ndarray
    indices: np.ndarray
    subjects: np.ndarray
    slice_index: np.ndarray
    channels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @functools.cached_property
    def power_spectrum(self) -> np.ndarray:
        """:func:`mean_power_spectrum` of the set, computed once for the checkerboard score and the report."""
        return mean_power_spectrum(self.images)


@dataclass
class EvalData:
    """What :func:`calc_metric` passes to a metric. ``real`` and ``fake`` have the same size; their channel
    counts are equal or one of them is 1 (repeated to match, as the trainer repeats a single modality)."""

    real: ImageSet
    fake: ImageSet
    train: ImageSet | None = None
    seed: int = 0
    inception_weights: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return max(self.real.images.shape[1], self.fake.images.shape[1])


class MetricUnavailable(RuntimeError):
    """A metric that cannot run with what it was given (no training store, no Inception weights); says why."""


# --------------------------------------------------------------------------------------------
# registry (StyleGAN2-ADA metric_main style)

_METRICS: dict[str, Callable[[EvalData], dict[str, Any]]] = {}


def register_metric(fn: Callable[[EvalData], dict[str, Any]]) -> Callable[[EvalData], dict[str, Any]]:
    _METRICS[fn.__name__] = fn
    return fn


def list_metrics() -> list[str]:
    return list(_METRICS)


def is_valid_metric(name: str) -> bool:
    return name in _METRICS


def calc_metric(name: str, data: EvalData) -> dict[str, Any]:
    """Run one registered metric: ``{"metric", "results", "total_time", "total_time_str"}``."""
    start = time.time()
    results = _METRICS[name](data)
    total = time.time() - start
    return {"metric": name, "results": results, "total_time": total, "total_time_str": f"{total:.1f}s"}


def report_metric(result: dict[str, Any], report_dir: str | Path | None, **context: Any) -> None:
    """Append ``result`` (with ``context`` such as the store paths, and a timestamp) to
    ``report_dir/metric-<name>.jsonl``: one line per evaluation, so a folder collects a run's history."""
    if report_dir is None:
        return
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({**result, **context, "timestamp": time.time()}, default=_json_default)
    with open(report_dir / f"metric-{result['metric']}.jsonl", "a") as f:
        f.write(line + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# small image utilities


def expand_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A single channel repeated to ``channels`` (a view); any other count must already match."""
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 and channels > 1 else x


def _batches(n: int, batch: int) -> Iterator[slice]:
    for start in range(0, n, batch):
        yield slice(start, min(n, start + batch))


def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """tqdm on a terminal, silent in logs and tests."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None)


# --------------------------------------------------------------------------------------------
# SWD: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018)

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


# --------------------------------------------------------------------------------------------
# checkerboard: energy at the frequencies that stride-2 upsampling imprints


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


# --------------------------------------------------------------------------------------------
# MS-SSIM between random pairs within a set (diversity; Odena et al. 2017)

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


# --------------------------------------------------------------------------------------------
# memorisation: nearest training slice in pixel space

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


# --------------------------------------------------------------------------------------------
# feature space: Fréchet distance and KID (torchmetrics), precision/recall and Inception-v3 (torch-fidelity)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_HELP = (
    f"pass --inception-weights FILE, the standard FID Inception-v3 weights ({INCEPTION_FILE} from "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE + ", or the same "
    "file as torch-fidelity's weights-inception-2015-12-05-6726825d.pth), copied from a machine with internet "
    "access, and install the [fid] extra (README, 'Evaluating synthetic slices')"
)
FID_EXTRA_HELP = (
    "the Inception metrics need the [fid] extra: pip install torch==2.13.0 -e \".[fid]\" "
    "(with a CPU build of torch, torchvision must be the CPU build too: pip install torchvision==0.28.0 "
    "--index-url https://download.pytorch.org/whl/cpu)"
)


class _GivenFeatures(torch.nn.Module):
    """Lets torchmetrics' FID and KID accumulate features computed elsewhere (their documented custom
    ``feature`` module); ``num_features`` spares them a probe forward pass."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) of the features' Gaussians, by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_GivenFeatures(real_features.shape[1]))
    fid.update(real_features.double(), real=True)
    fid.update(fake_features.double(), real=False)
    return float(fid.compute())


def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018; torchmetrics): unbiased MMD^2 with the cubic polynomial kernel, mean and
    std over random subsets of ``min(subset_size, n)`` features of each set."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real_features), len(fake_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_GivenFeatures(real_features.shape[1]), subsets=subsets,
                                      subset_size=size)
    kid.update(real_features.double(), real=True)
    kid.update(fake_features.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def check_torchvision() -> None:
    """torchmetrics imports torchvision whenever it is installed, so a torchvision built for another torch (PyPI's
    CUDA wheel next to a CPU torch: "operator torchvision::nms does not exist") breaks every metric here, not
    only the Inception ones; raise MetricUnavailable naming the fix instead."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as err:
        raise MetricUnavailable(
            f"torchvision is installed but does not load with torch {torch.__version__} ({type(err).__name__}: "
            f"{err}); install the torchvision built for this torch (CPU torch 2.13: pip install torchvision==0.28.0 "
            "--index-url https://download.pytorch.org/whl/cpu) or pip uninstall torchvision"
        ) from err


def _torch_fidelity() -> Any:
    """torch-fidelity, or MetricUnavailable with the install line. torchvision's CUDA wheel under a CPU torch
    fails at import with a RuntimeError, not an ImportError, hence the broad except."""
    try:
        import torch_fidelity
    except Exception as err:
        raise MetricUnavailable(f"{FID_EXTRA_HELP} ({type(err).__name__}: {err})") from err
    return torch_fidelity


def check_inception_weights(path: str) -> str | None:
    """Raise MetricUnavailable if the Inception metrics cannot run with ``path``; a warning (or None) when
    the file is not the standard one, whose FID values are the only ones comparable with published figures."""
    import hashlib

    if not Path(path).is_file():
        raise MetricUnavailable(f"--inception-weights {path}: no such file; {INCEPTION_HELP}")
    _torch_fidelity()
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        return (f"{path}: sha256 {digest[:8]}... is not the standard FID Inception file ({INCEPTION_SHA256_PREFIX}...); "
                "its FID is not comparable with published values")
    return None


@functools.lru_cache(maxsize=1)
def _inception_extractor(weights: str) -> torch.nn.Module:
    """torch-fidelity's extractor, built once for the real and the synthetic set."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)


def inception_features(images: np.ndarray | torch.Tensor, weights: str, batch: int = 32) -> torch.Tensor:
    """2048-d pool features of torch-fidelity's TF-compatible Inception-v3, loaded from ``weights`` (never
    downloaded). One channel is shown as grey RGB, three as RGB; [-1, 1] maps to uint8 as in a PNG."""
    _torch_fidelity()
    x = torch.as_tensor(images)
    if x.shape[1] not in (1, 3):
        raise MetricUnavailable(f"Inception-v3 takes 1 (grey) or 3 (RGB) channels, not {x.shape[1]}")
    extractor = _inception_extractor(weights)
    out = []
    with torch.no_grad():
        for part in progress(list(_batches(x.shape[0], batch)), "Inception features"):
            rgb = expand_channels(x[part].float(), 3)
            out.append(extractor(((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))[0])
    return torch.cat(out)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019; torch-fidelity): the share of synthetic samples
    inside some real sample's k-NN ball, and of real samples inside some synthetic sample's."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(fake_features.float(), real_features.float(), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return float(out["precision"]), float(out["recall"])


# --------------------------------------------------------------------------------------------
# the registered metrics

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


@register_metric
def checkerboard(data: EvalData) -> dict[str, Any]:
    """Grid effect of each set at the evaluation size; the real set's value is the reference."""
    fake, real = (spectrum_checkerboard_levels(s.power_spectrum) for s in (data.fake, data.real))
    return {"checkerboard": max(fake), "checkerboard_real": max(real),
            "checkerboard_levels": fake, "checkerboard_real_levels": real}


@register_metric
def ms_ssim(data: EvalData) -> dict[str, Any]:
    """Within-set diversity, each set in its own channels (no cross-set comparison, so nothing to align), pairs
    across subjects."""
    fake, scales = mean_pairwise_ms_ssim(data.fake.images, seed=data.seed, subjects=data.fake.subjects)
    real, _ = mean_pairwise_ms_ssim(data.real.images, seed=data.seed + 1, subjects=data.real.subjects)
    return {"ms_ssim_fake": fake, "ms_ssim_real": real, "ms_ssim_scales": scales}


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


@register_metric
def inception(data: EvalData) -> dict[str, Any]:
    """FID, KID, precision and recall in Inception-v3 pool features (needs --inception-weights and [fid])."""
    if data.inception_weights is None:
        raise MetricUnavailable(f"FID, KID, precision and recall not computed: {INCEPTION_HELP}")
    real, fake = (inception_features(s.images, data.inception_weights) for s in (data.real, data.fake))
    kid, kid_std = kernel_distance(real, fake, seed=data.seed)
    precision, recall = precision_recall(real, fake)
    return {"fid": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall}
