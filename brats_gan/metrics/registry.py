"""The registry every metric module adds itself to, and the data it hands a metric (StyleGAN2-ADA's
``metric_main``): :func:`calc_metric` runs a metric by name and times it, :func:`report_metric` appends its
result to ``metric-<name>.jsonl``. Kept apart from the metrics so that a metric module imports only this."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_gan.metrics.common import mean_power_spectrum


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
