"""`brats-gan demo`: the whole pipeline on brain phantoms written in a BraTS 2020 layout.

It needs no download: it writes phantoms with tumour-like lesions, preprocesses them with Dask into a
training store and a held-out store (other subjects), draws a preview, trains the tiny preset with its
recipe in this process, generates a small synthetic store and its grid from the averaged generator, and
measures the synthetic slices against the held-out ones (SWD beside the real-vs-real floor, the checkerboard
beside the real slices'), in a folder of its own that each run replaces. About two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from brats_gan.errors import UserError

MARKER = ".brats-gan-demo"
DEFAULT_STEPS = 2000
SYNTHETIC = 64
STAGES = 6


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="brats-gan-demo", help="demo folder, replaced on each run (default ./brats-gan-demo)")
    p.add_argument("--subjects", type=int, default=8, help="phantom subjects to train on (default 8)")
    p.add_argument("--heldout", type=int, default=4,
                   help="further phantom subjects, never trained on, to measure the synthetic slices against "
                        "(default 4; at least 2, for the real-vs-real floor)")
    p.add_argument("--slices", type=int, default=48, help="axial slices per subject (default 48, the poster's)")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the training and the noise")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"generator steps of the tiny training run (default {DEFAULT_STEPS})")
    p.add_argument("--dashboard-port", type=int, default=8787,
                   help="Dask dashboard port, 0 for any free one (default 8787)")


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
    import time

    from brats_gan.cluster import ClusterError, check_dashboard_port, dask_client
    from brats_gan.discover import discover_subjects, select_subjects
    from brats_gan.evaluate import evaluate
    from brats_gan.generate import generate
    from brats_gan.images import save_grid
    from brats_gan.phantoms import write_phantom_dataset
    from brats_gan.preprocess import PreprocessConfig, run_preprocess

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.subjects < 1:
        raise UserError(f"--subjects must be at least 1, got {args.subjects}")
    if args.workers is not None and args.workers < 1:  # before the old demo folder is replaced
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.slices < 1:
        raise UserError(f"--slices must be at least 1, got {args.slices}")
    if args.heldout < 2:
        raise UserError(f"--heldout must be at least 2 (two real halves of whole subjects for the SWD floor), "
                        f"got {args.heldout}")
    try:
        check_dashboard_port(args.dashboard_port)
    except ClusterError as err:
        raise UserError(str(err)) from None
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).exists():
            raise UserError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by brats-gan demo; replaced on each run\n")
    data = out / "MICCAI_BraTS2020_TrainingData"
    total = args.subjects + args.heldout
    print(f"[1/{STAGES}] writing {total} brain phantoms (BraTS 2020 layout) to {data}: {args.subjects} to train on, "
          f"{args.heldout} held out")
    write_phantom_dataset(data, n_subjects=total, layout="2020", seed=args.seed)
    store, heldout = out / "store.zarr", out / "heldout.zarr"
    print(f"[2/{STAGES}] preprocessing with Dask into {store} and {heldout}")
    config = PreprocessConfig(slices=args.slices)
    subjects = discover_subjects(data)
    with dask_client(args.workers, None, args.dashboard_port) as client:
        report = run_preprocess(select_subjects(subjects, f"1-{args.subjects}"), store, config, client)
        run_preprocess(select_subjects(subjects, f"{args.subjects + 1}-{total}"), heldout, config, client,
                       progress=False)
    import xarray as xr

    ds = xr.open_zarr(store)
    n = ds.sizes["sample"]
    picks = [round(i * (n - 1) / 15) for i in range(16)]
    preview = save_grid(ds.image.isel(sample=picks).values, out / "preview.png", columns=4)
    print(f"[3/{STAGES}] preview of 16 stored slices: {preview}")
    run_dir = out / "run"
    print(f"[4/{STAGES}] training the tiny preset (64x64) for {args.steps} steps in this process into {run_dir}")
    status = train_tiny(store, run_dir, args.steps, args.seed, bool(getattr(args, "verbose", False)))
    if status != 0:
        print(f"training stopped (exit status {status}); see the messages above")
        return status
    synthetic = out / "synthetic.zarr"
    made = generate(run_dir, synthetic, SYNTHETIC, seed=args.seed, grid=out / "synthetic.png")
    print(f"[5/{STAGES}] {SYNTHETIC} synthetic slices from step {made.checkpoint.step}'s averaged generator: "
          f"{synthetic}, grid {made.grid}")
    figures = evaluate(str(heldout), str(synthetic), metrics="swd,checkerboard", seed=args.seed)
    ratio = figures["swd"] / figures["swd_floor"]
    grid, grid_real = figures["checkerboard"], figures["checkerboard_real"]
    print(f"[6/{STAGES}] against the {args.heldout} held-out phantoms: SWD x1e3 {figures['swd']:.1f}, real-vs-real "
          f"floor {figures['swd_floor']:.1f}: {ratio:.1f}x the floor (1x: as close as real slices are to each other); "
          f"checkerboard {grid:.1f} dB synthetic, {grid_real:.1f} dB real: {grid - grid_real:+.1f} dB "
          f"(the grid of stride-2 upsampling; 0: as in real slices)")
    print(f"\ndone in {time.perf_counter() - started:.0f} s: {len(report.stored)} subjects x {args.slices} slices "
          f"preprocessed in {report.seconds:.1f} s")
    print(f"  real store:        {store}   (preview {preview}; held out: {heldout})")
    print(f"  training run:      {run_dir}   (metrics.csv, samples/, checkpoints/, tensorboard/)")
    print(f"  synthetic store:   {synthetic}   (grid {made.grid})")
    print(f"  SWD:               {ratio:.1f}x its floor against held-out phantoms")
    print(f"  checkerboard:      {grid - grid_real:+.1f} dB from the real slices ({grid:.1f} dB synthetic, "
          f"{grid_real:.1f} dB real)")
    print(f"  inspect a store:   brats-gan info {store}")
    print(f"  open it:           python -c \"from brats_gan import open_store; print(open_store('{synthetic}'))\"")
    print(f"  more images:       brats-gan generate --checkpoint {run_dir} --num 1000 --out more.zarr --grid more.png")
    print(f"  all the figures:   brats-gan evaluate --real {heldout} --fake {synthetic} --train {store}")
    return 0
