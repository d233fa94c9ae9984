"""Image quality of the tiny generators: transposed vs resize upsampling, with and without DiffAugment.

The evidence issue 4 asks for, on the demo's phantoms (no download), with fixed seeds on the CPU:
each variant is trained for the same number of steps, 256 slices are generated from its last
checkpoint, and `brats-gan evaluate` compares them with held-out phantom subjects. Printed side by
side: SWD beside its real-vs-real floor, the checkerboard score (synthetic, and the real set's),
MS-SSIM diversity, and the memorisation share (training store given).

Baseline: the poster's setting, ``tiny`` (transposed convolutions) without augmentation; ``resize``
is ``tiny-resize`` (nearest), ``resize-bilinear`` the same with ``--resize-mode bilinear``. Runs go two
at a time, one thread each (2-core machine); ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AUGMENTS = ("none", "translation,cutout")
BASELINE = ("transposed", "none")  # the poster's generator and recipe
UPSAMPLES = {"transposed": ("tiny", "nearest"), "resize": ("tiny-resize", "nearest"),
             "resize-bilinear": ("tiny-resize", "bilinear")}


def brats_gan(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "brats_gan", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, proc.args))} failed:\n{out[-3000:]}")
    return out


def make_stores(root: Path, train_subjects: int, heldout_subjects: int) -> tuple[Path, Path]:
    from brats_gan.phantoms import write_phantom_dataset

    data = root / "MICCAI_BraTS2020_TrainingData"
    write_phantom_dataset(data, n_subjects=train_subjects + heldout_subjects, layout="2020", seed=0)
    train, heldout = root / "train.zarr", root / "heldout.zarr"
    common = ["--workers", "2", "--no-progress", "--dashboard-port", "0"]
    finish(brats_gan("preprocess", str(data), "--out", str(train), "--subjects", f"1-{train_subjects}", *common))
    finish(brats_gan("preprocess", str(data), "--out", str(heldout), "--subjects",
                     f"{train_subjects + 1}-{train_subjects + heldout_subjects}", *common))
    return train, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="generator steps per variant (default 400)")
    parser.add_argument("--train-subjects", type=int, default=8, help="phantom subjects trained on (default 8)")
    parser.add_argument("--heldout-subjects", type=int, default=4, help="phantom subjects held out (default 4)")
    parser.add_argument("--images", type=int, default=256, help="slices generated per variant (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at once (default 2)")
    parser.add_argument("--upsample", default="transposed,resize",
                        help=f"generators compared, comma-separated from {','.join(UPSAMPLES)} "
                             "(default transposed,resize)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stores and runs in this folder")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    variants = [(upsample, augment) for augment in AUGMENTS for upsample in args.upsample.split(",")]
    unknown = {u for u, _ in variants} - set(UPSAMPLES)
    if unknown:
        parser.error(f"--upsample: unknown {', '.join(sorted(unknown))}; known: {', '.join(UPSAMPLES)}")

    root = args.keep or Path(tempfile.mkdtemp(prefix="brats-gan-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, heldout = make_stores(root, args.train_subjects, args.heldout_subjects)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for first in range(0, len(variants), args.parallel):
        procs = {}
        for upsample, augment in variants[first:first + args.parallel]:
            preset, mode = UPSAMPLES[upsample]
            run = root / f"{upsample}-{augment.replace(',', '+')}"
            runs[(upsample, augment)] = run
            procs[run] = brats_gan("train", "--store", str(train), "--out", str(run), "--preset", preset,
                                   "--resize-mode", mode,
                                   "--augment", augment, "--steps", str(args.steps), "--seed", str(args.seed),
                                   "--checkpoint-every", str(max(1, args.steps // 4)), "--num-workers", "0",
                                   env=env)
        for proc in procs.values():
            finish(proc)
    rows = []
    for (upsample, augment), run in runs.items():
        fake = run.with_suffix(".zarr")
        finish(brats_gan("generate", "--checkpoint", str(run), "--out", str(fake), "--num", str(args.images),
                         "--seed", str(args.seed), "--grid", str(run.with_suffix(".png")), env=env))
        report = json.loads(finish(brats_gan("evaluate", "--real", str(heldout), "--fake", str(fake), "--train",
                                             str(train), "--json", "--seed", str(args.seed),
                                             "--metrics", "swd,checkerboard,ms_ssim,memorisation", env=env)
                                   ).strip().splitlines()[-1])
        rows.append({"upsample": upsample, "augment": augment, "steps": args.steps,
                     **{k: report.get(k) for k in ("swd", "swd_floor", "checkerboard", "checkerboard_real",
                                                   "checkerboard_levels", "ms_ssim_fake", "ms_ssim_real",
                                                   "memorisation_share")}})
    baseline = next((r["swd"] for r in rows if (r["upsample"], r["augment"]) == BASELINE), None)
    for r in rows:
        r["swd_vs_baseline"] = None if baseline is None else round(r["swd"] / baseline, 3)
    result = {"rows": rows, "seconds": round(time.perf_counter() - started, 1), "folder": str(root)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.steps} steps per variant, {args.images} generated slices vs {args.heldout_subjects} held-out "
          f"subjects; runs in {root}")
    head = f"{'upsample':<16} {'augment':<19} {'SWD':>7} {'/base':>6} {'floor':>7} {'checker':>8} {'real':>6} " \
           f"{'MS-SSIM':>8} {'real':>6} {'memorised':>9}  checkerboard per period 2/4/8/.. px"
    print(head)
    for r in rows:
        ratio = "-" if r["swd_vs_baseline"] is None else f"{r['swd_vs_baseline']:.3f}"
        print(f"{r['upsample']:<16} {r['augment']:<19} {r['swd']:7.1f} {ratio:>6} {r['swd_floor']:7.1f} {r['checkerboard']:8.2f} "
              f"{r['checkerboard_real']:6.2f} {r['ms_ssim_fake']:8.3f} {r['ms_ssim_real']:6.3f} "
              f"{r['memorisation_share']:9.3f}  {' '.join(f'{v:.1f}' for v in r['checkerboard_levels'])}")
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
