"""Volumes/s of `brats-gan preprocess` against a serial nibabel decode of the same volumes.

Baseline: a plain loop that only decodes each FLAIR volume with nibabel (``nib.load(p).get_fdata``'s
integer twin, ``np.asanyarray(img.dataobj)``), one core: the bound a simple script hits. Contender:
the whole CLI in a subprocess (start-up, LocalCluster of --workers, decode, transform, write,
finalise), wall clock. Target on a 2-core machine: 400 volumes, 2 workers, ratio <= 0.75.

The dataset is N subject folders in the BraTS 2023 layout whose FLAIR is the one real case in
../shared/data (symlinked, so both sides read identical, page-cached bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/brats2023-sample/BraTS-GLI-00001-000"


def make_dataset(root: Path, n: int, sample: Path) -> list[Path]:
    flair = next(sample.glob("*-t2f.nii.gz"))
    paths = []
    for i in range(1, n + 1):
        sid = f"BraTS-GLI-{i:05d}-000"
        (root / sid).mkdir(parents=True)
        link = root / sid / f"{sid}-t2f.nii.gz"
        link.symlink_to(flair)
        paths.append(link)
    return paths


def serial_decode(paths: list[Path]) -> float:
    start = time.perf_counter()
    for p in paths:
        np.asanyarray(nib.load(p).dataobj)
    return time.perf_counter() - start


def run_cli(data: Path, store: Path, workers: int) -> float:
    cmd = [sys.executable, "-m", "brats_gan", "preprocess", str(data), "--out", str(store),
           "--workers", str(workers), "--no-progress", "--overwrite", "--dashboard-port", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="folder of one BraTS 2023 case")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternate baseline and contender this many times; medians are reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    baselines, contenders = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        paths = make_dataset(data, args.volumes, args.sample)
        serial_decode(paths[:5])  # warm the page cache and imports
        for _ in range(args.repeat):  # alternated, so a load change on a shared machine hits both sides
            baselines.append(serial_decode(paths))
            contenders.append(run_cli(data, Path(tmp) / "store.zarr", args.workers))
    baseline, contender = statistics.median(baselines), statistics.median(contenders)
    ratios = [c / b for b, c in zip(baselines, contenders)]
    result = {
        "volumes": args.volumes,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "repeats": args.repeat,
        "serial_nibabel_decode_s": round(baseline, 2),
        "brats_gan_preprocess_s": round(contender, 2),
        "ratio": round(contender / baseline, 3),
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "preprocess_volumes_per_s": round(args.volumes / contender, 1),
        "decode_volumes_per_s": round(args.volumes / baseline, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"serial nibabel decode : {baseline:7.2f} s  ({result['decode_volumes_per_s']} volumes/s)")
        print(f"brats-gan preprocess  : {contender:7.2f} s  ({result['preprocess_volumes_per_s']} volumes/s, "
              f"{args.workers} workers, start-up included)")
        print(f"ratio preprocess/decode: {result['ratio']:.3f}  (medians of {args.repeat}; per repeat "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; target <= 0.75; load average {result['load_average_1min']})")


if __name__ == "__main__":
    main()
