"""Metrics that compare a synthetic slice set with a real one, as a registry like StyleGAN2-ADA's ``metric_main``.

Each metric is a function ``EvalData -> dict`` registered under its name (:mod:`.registry`), one module per
metric: :mod:`.swd`, :mod:`.checkerboard`, :mod:`.ms_ssim`, :mod:`.memorisation`, :mod:`.inception`.
:func:`calc_metric` runs one and times it, :func:`report_metric` appends its result to ``metric-<name>.jsonl``
in a report folder, so repeated evaluations of successive checkpoints accumulate one line each. The numerical
pieces (:func:`swd_distance`, :func:`checkerboard_score`, :func:`mean_pairwise_ms_ssim`,
:func:`nearest_distances`, :func:`frechet_distance`, :func:`kernel_distance`) take plain arrays, so tests can
feed them cases whose answer is known. This package re-exports them all, so callers import from
``brats_gan.metrics`` alone.

Images are float arrays ``(sample, channel, y, x)`` in [-1, 1], as stored. The README section "Evaluating
synthetic slices" defines every figure; the docstrings say why each is computed the way it is.
"""

# Importing a metric module registers its metric: this order is list_metrics()'s, which the command line's
# --metrics help and default follow.
from brats_gan.metrics import swd, checkerboard, ms_ssim, memorisation, inception  # noqa: F401, I001
from brats_gan.metrics.checkerboard import (
    checkerboard_levels,
    checkerboard_points,
    checkerboard_score,
    spectrum_checkerboard_levels,
)
from brats_gan.metrics.common import expand_channels, mean_power_spectrum, progress
from brats_gan.metrics.inception import (
    FID_EXTRA_HELP,
    INCEPTION_FILE,
    INCEPTION_HELP,
    INCEPTION_SHA256_PREFIX,
    check_inception_weights,
    check_torchvision,
    frechet_distance,
    inception_features,
    kernel_distance,
    precision_recall,
)
from brats_gan.metrics.inception import _torch_fidelity as _torch_fidelity
from brats_gan.metrics.memorisation import MEMORISATION_SIZE, memorisation_figures, nearest_distances
from brats_gan.metrics.ms_ssim import (
    MS_SSIM_BETAS,
    MS_SSIM_KERNEL,
    mean_pairwise_ms_ssim,
    ms_ssim_betas,
    ms_ssim_scales,
)
from brats_gan.metrics.registry import (
    EvalData,
    ImageSet,
    MetricUnavailable,
    calc_metric,
    is_valid_metric,
    list_metrics,
    register_metric,
    report_metric,
)
from brats_gan.metrics.swd import (
    SWD_DIRECTIONS,
    SWD_MIN_IMAGES,
    SWD_MIN_RESOLUTION,
    SWD_PATCH,
    SWD_PATCHES_PER_IMAGE,
    SWD_REPEATS,
    laplacian_pyramid,
    normalise_descriptors,
    real_halves,
    sliced_wasserstein,
    swd_descriptors,
    swd_distance,
    swd_images_per_side,
    swd_resolutions,
)
from brats_gan.metrics.swd import _pyr_up as _pyr_up

__all__ = [
    "FID_EXTRA_HELP",
    "INCEPTION_FILE",
    "INCEPTION_HELP",
    "INCEPTION_SHA256_PREFIX",
    "MEMORISATION_SIZE",
    "MS_SSIM_BETAS",
    "MS_SSIM_KERNEL",
    "SWD_DIRECTIONS",
    "SWD_MIN_IMAGES",
    "SWD_MIN_RESOLUTION",
    "SWD_PATCH",
    "SWD_PATCHES_PER_IMAGE",
    "SWD_REPEATS",
    "EvalData",
    "ImageSet",
    "MetricUnavailable",
    "calc_metric",
    "check_inception_weights",
    "check_torchvision",
    "checkerboard_levels",
    "checkerboard_points",
    "checkerboard_score",
    "expand_channels",
    "frechet_distance",
    "inception_features",
    "is_valid_metric",
    "kernel_distance",
    "laplacian_pyramid",
    "list_metrics",
    "mean_pairwise_ms_ssim",
    "mean_power_spectrum",
    "memorisation_figures",
    "ms_ssim_betas",
    "ms_ssim_scales",
    "nearest_distances",
    "normalise_descriptors",
    "precision_recall",
    "progress",
    "real_halves",
    "register_metric",
    "report_metric",
    "sliced_wasserstein",
    "spectrum_checkerboard_levels",
    "swd_descriptors",
    "swd_distance",
    "swd_images_per_side",
    "swd_resolutions",
]
