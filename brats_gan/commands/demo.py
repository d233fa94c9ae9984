"""`brats-gan demo`: the whole pipeline on brain phantoms written in a BraTS 2020 layout.

It needs no download: it writes phantoms with tumour-like lesions, preprocesses them with Dask into
a store, draws a preview, trains the tiny preset for a short run in this process, and generates a
small synthetic store and its grid from the result, in a folder of its own that each run replaces.
The run is far too short to learn brains; it shows every stage working together in about a minute.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from brats_gan.errors import UserError

MARKER = ".brats-gan-demo"
DEFAULT_STEPS = 150
SYNTHETIC = 64


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="brats-gan-demo", help="demo folder, replaced on each run (default ./brats-gan-demo)")
    p.add_argument("--subjects", type=int, default=8, help="phantom subjects to write (default 8)")
    p.add_argument("--slices", type=int, default=48, help="axial slices per subject (default 48, the poster's)")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the training and the noise")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"generator steps of the tiny training run (default {DEFAULT_STEPS})")
    p.add_argument("--dashboard-port", type=int, default=8787)


def train_tiny(store: Path, run: Path, steps: int, seed: int, verbose: bool) -> int:
    """`brats-gan train` on the demo store, in this process, with one torch thread.

    One thread: OpenMP threads that wait on each other stall when anything else uses the cores, and
    the tiny networks at a micro-batch of 4 have little work to split (measured on 2 shared cores:
    30 steps in 8 s with one thread, 27 s with two, up to 4 s per step). OMP_NUM_THREADS, if set, wins.
    """
    import torch

    from brats_gan.commands import train

    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    train.configure_parser(parser)
    args = parser.parse_args(["--store", str(store), "--out", str(run), "--preset", "tiny", "--steps", str(steps),
                              "--checkpoint-every", str(steps), "--seed", str(seed)])
    args.verbose = verbose
    return train.run(args)


def run(args: argparse.Namespace) -> int:
    from brats_gan.cluster import dask_client
    from brats_gan.discover import discover_subjects
    from brats_gan.generate import generate
    from brats_gan.images import save_grid
    from brats_gan.phantoms import write_phantom_dataset
    from brats_gan.preprocess import PreprocessConfig, run_preprocess

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by brats-gan demo; replaced on each run\n")
    data = out / "MICCAI_BraTS2020_TrainingData"
    print(f"[1/5] writing {args.subjects} brain phantoms (BraTS 2020 layout) to {data}")
    write_phantom_dataset(data, n_subjects=args.subjects, layout="2020", seed=args.seed)
    store = out / "store.zarr"
    print(f"[2/5] preprocessing with Dask into {store}")
    config = PreprocessConfig(slices=args.slices)
    with dask_client(args.workers, None, args.dashboard_port) as client:
        report = run_preprocess(discover_subjects(data), store, config, client)
    import xarray as xr

    ds = xr.open_zarr(store)
    n = ds.sizes["sample"]
    picks = [round(i * (n - 1) / 15) for i in range(16)]
    preview = save_grid(ds.image.isel(sample=picks).values, out / "preview.png", columns=4)
    print(f"[3/5] preview of 16 stored slices: {preview}")
    run_dir = out / "run"
    print(f"[4/5] training the tiny preset (64x64) for {args.steps} steps in this process into {run_dir}")
    status = train_tiny(store, run_dir, args.steps, args.seed, bool(getattr(args, "verbose", False)))
    if status != 0:
        print(f"training stopped (exit status {status}); see the messages above")
        return status
    synthetic = out / "synthetic.zarr"
    made = generate(run_dir, synthetic, SYNTHETIC, seed=args.seed, grid=out / "synthetic.png")
    print(f"[5/5] {SYNTHETIC} synthetic slices from step {made.checkpoint.step}: {synthetic}, grid {made.grid}")
    print(f"\ndone: {len(report.stored)} subjects x {args.slices} slices preprocessed in {report.seconds:.1f} s")
    print(f"  real store:        {store}   (preview {preview})")
    print(f"  training run:      {run_dir}   (metrics.csv, samples/, checkpoints/, tensorboard/)")
    print(f"  synthetic store:   {synthetic}   (grid {made.grid})")
    print(f"  inspect a store:   brats-gan info {store}")
    print(f"  open it:           python -c \"import xarray as xr; print(xr.open_zarr('{synthetic}'))\"")
    print(f"  more images:       brats-gan generate --checkpoint {run_dir} --num 1000 --out more.zarr --grid more.png")
    return 0
