"""Feature-space metrics, the registered ``inception``: Fréchet distance and KID (torchmetrics), precision/recall
and Inception-v3 features (torch-fidelity), plus the checks evaluate runs before reading any pixel (torchvision
loads, the weights file). torchmetrics, torchvision and torch-fidelity are imported only when needed."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_gan.metrics.common import _batches, expand_channels, progress
from brats_gan.metrics.registry import EvalData, MetricUnavailable, register_metric

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
