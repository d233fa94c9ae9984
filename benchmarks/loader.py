"""Images/s of the training loader against a raw sequential read of the same store.

Contender: the training data exactly as ``Trainer.fit`` gets it: ``SliceStream`` (shuffled runs and
windows, ``cache="stream"``: read from the store, never cached in memory), micro-batch of the preset's
DeepSpeed recipe, through ``iterate_batches`` with the trainer's loader settings (persistent workers,
``default_num_workers`` of one rank, no pinned memory on CPU). Each repeat starts a fresh loader,
drains its first window (worker start-up, store opening) and then times ``--batches`` micro-batches
delivered to the consuming process, which does nothing else with them. They arrive as the trainer
gets them: float16 as stored at 256x256, float32 area averages at 64x64 (``brats_gan.data``); the
trainer converts where the batch lands, which this benchmark, like the ceiling, leaves out.

Baseline (the ceiling): the same number of images read with plain Zarr, one process, sequentially,
one whole shard (one subject, 48 slices) per read, decoded to float16 numpy arrays and nothing else.

The two alternate (ceiling, loader, ceiling, loader, ...) so that both see the same background load;
the figures are medians over ``--repeats``. Target: loader >= 0.8 x ceiling.

Without ``--store``, a realistic store is built once and kept in ``--cache-dir``: ``brats-gan
preprocess`` of ``--subjects`` subject folders whose FLAIR is the one real BraTS 2023 case in
../shared/data (symlinked, as in ``benchmarks/preprocess.py``), 48 slices of 256x256 each (15 subjects:
the poster's 720 images). ``--image-size 64`` is the tiny preset's size: the loader area-downsamples
in its workers, while the ceiling still reads the stored 256x256 slices.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brats_gan import schema
from brats_gan.data import (
    DEFAULT_RUN_LENGTH,
    DEFAULT_WINDOW_BATCHES,
    SliceStream,
    default_num_workers,
    iterate_batches,
)
from brats_gan.train_config import DEFAULT_DEEPSPEED

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import SAMPLE, make_dataset

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brats_gan" / "benchmarks"
MICRO_BATCH = {256: DEFAULT_DEEPSPEED["paper"]["train_micro_batch_size_per_gpu"],
               64: DEFAULT_DEEPSPEED["tiny"]["train_micro_batch_size_per_gpu"]}


def build_store(cache_dir: Path, subjects: int, sample: Path) -> Path:
    """``brats-gan preprocess`` of ``subjects`` copies of the real case, once; later calls reuse it."""
    store = cache_dir / f"brats2023-x{subjects}.zarr"
    try:
        if schema.read_summary(str(store)).complete:
            return store
    except schema.StoreError:
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        make_dataset(Path(tmp) / "data", subjects, sample)
        cmd = [sys.executable, "-m", "brats_gan", "preprocess", str(Path(tmp) / "data"), "--out", str(store),
               "--no-progress", "--overwrite", "--dashboard-port", "0"]
        print(f"building {store} ({subjects} subjects, once)", file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return store


def ceiling(store: str, images: int) -> float:
    """Seconds to read ``images`` stored slices shard by shard, in order (wrapping round the store)."""
    import zarr

    with schema.quiet_consolidated_warning():
        array = zarr.open_group(store, mode="r")[schema.IMAGE]
    n, shard = array.shape[0], (array.shards or array.chunks)[0]
    starts = itertools.cycle(range(0, n, shard))
    start_time = time.perf_counter()
    done = 0
    while done < images:
        a = next(starts)
        rows = array[a : min(a + shard, n, a + images - done)]
        done += rows.shape[0]
    return time.perf_counter() - start_time


def loader(stream: SliceStream, batches: int, num_workers: int) -> float:
    """Seconds for a fresh trainer loader to deliver ``batches`` micro-batches after its first window."""
    it = iterate_batches(stream, num_workers=num_workers, pin_memory=False)
    try:
        for _ in range(stream.window_batches):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            _, batch = next(it)
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    assert batch.dtype.is_floating_point and batch.shape[0] == stream.batch_size
    return elapsed


def in_process(stream: SliceStream, images: int, transform: bool) -> float:
    """Seconds for this process to read (and, with ``transform``, build) whole windows of ``images`` samples,
    without a loader: the work one loader worker does, on one torch thread as a worker has, minus handing
    the windows over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    done, window = 0, 0
    while done < images:
        key = (window // stream.windows_per_epoch, window % stream.windows_per_epoch)
        indices = stream.window_indices(*key)
        if transform:
            stream[key]
        else:
            stream.read(indices)
        done += len(indices)
        window += 1
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return elapsed * images / done


def measure(store: str, image_size: int, batch_size: int, batches: int | None, num_workers: int, repeats: int,
            run_length: int, window_batches: int, breakdown: bool) -> dict[str, Any]:
    stream = SliceStream(store, batch_size=batch_size, image_size=image_size, cache="stream",
                         run_length=run_length, window_batches=window_batches)
    batches = batches or stream.batches_per_epoch
    images = batches * batch_size
    sides = {"ceiling": lambda: ceiling(store, images), "loader": lambda: loader(stream, batches, num_workers)}
    if breakdown:
        sides["read_runs"] = lambda: in_process(stream, images, transform=False)
        sides["read_and_transform"] = lambda: in_process(stream, images, transform=True)
    ceiling(store, images)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            times[name].append(side())
    rates = {name: images / statistics.median(t) for name, t in times.items()}
    result: dict[str, Any] = {
        "image_size": image_size,
        "batch_size": batch_size,
        "run_length": run_length,
        "window_batches": window_batches,
        "batches": batches,
        "images": images,
        "loader_images_per_s": round(rates["loader"], 1),
        "ceiling_images_per_s": round(rates["ceiling"], 1),
        "ratio": round(rates["loader"] / rates["ceiling"], 3),
    }
    for name in sides:
        if name not in ("loader", "ceiling"):
            result[f"{name}_images_per_s"] = round(rates[name], 1)
    for name, t in times.items():
        result[f"{name}_images_per_s_each"] = [round(images / x, 1) for x in t]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--store", help="slice store to read (default: build one in --cache-dir)")
    parser.add_argument("--image-size", type=int, nargs="+", choices=sorted(MICRO_BATCH), default=[256, 64],
                        help="model image size(s): 256 paper (no downsampling), 64 tiny (area downsampling)")
    parser.add_argument("--batches", type=int, default=None,
                        help="micro-batches timed per repeat (default: one epoch of the store)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch (default: the preset's DeepSpeed recipe: 8 at 256, 4 at 64)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers (default: the trainer's, default_num_workers() of one rank)")
    parser.add_argument("--run-length", type=int, default=DEFAULT_RUN_LENGTH,
                        help="samples per contiguous read (the trainer's --run-length)")
    parser.add_argument("--window-batches", type=int, default=DEFAULT_WINDOW_BATCHES,
                        help="micro-batches per shuffle window (the trainer's --window-batches)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time, in this process, the run reads alone and the reads plus transform")
    parser.add_argument("--repeats", type=int, default=5, help="alternating ceiling/loader pairs")
    parser.add_argument("--subjects", type=int, default=15, help="subjects of the built store (48 slices each)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where the built store is kept")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="folder of one BraTS 2023 case")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    store = args.store or str(build_store(args.cache_dir, args.subjects, args.sample))
    num_workers = default_num_workers(1) if args.num_workers is None else args.num_workers
    load_start = os.getloadavg()
    results = [measure(store, size, args.batch_size or MICRO_BATCH[size], args.batches, num_workers, args.repeats,
                       args.run_length, args.window_batches, args.breakdown)
               for size in args.image_size]
    summary = {
        "store": store,
        "samples": schema.read_summary(store).n_samples,
        "cores": len(os.sched_getaffinity(0)),
        "num_workers": num_workers,
        "repeats": args.repeats,
        "numpy": np.__version__,
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{store}: {summary['samples']} samples, {summary['cores']} cores, {num_workers} loader worker(s), "
          f"run length {args.run_length}, window {args.window_batches} micro-batches, "
          f"median of {args.repeats}, load average {summary['load_avg_start'][0]:.2f} -> "
          f"{summary['load_avg_end'][0]:.2f}")
    for r in results:
        print(f"[{r['image_size']}] ceiling (whole-shard zarr reads): {r['ceiling_images_per_s']:8.1f} images/s")
        print(f"[{r['image_size']}] trainer loader (micro-batch {r['batch_size']}): {r['loader_images_per_s']:8.1f} images/s")
        if "read_runs_images_per_s" in r:
            print(f"[{r['image_size']}]   in this process: run reads {r['read_runs_images_per_s']:8.1f} images/s, "
                  f"reads + transform {r['read_and_transform_images_per_s']:8.1f} images/s")
        print(f"[{r['image_size']}] ratio loader/ceiling: {r['ratio']:.3f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
