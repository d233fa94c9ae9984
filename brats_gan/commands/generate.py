"""`brats-gan generate`: a synthetic store (and grid) from a run's checkpoint (:mod:`brats_gan.generate`)."""

from __future__ import annotations

import argparse
import sys

from brats_gan.checkpoints import WEIGHTS
from brats_gan.commands import EXIT_UNSAVED
from brats_gan.generate import DEFAULT_BATCH, GRID_MAX, OutputNotWritten, generate


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="training run folder (brats-gan train --out)")
    p.add_argument("--out", required=True, metavar="STORE", help="synthetic store to write, e.g. synthetic.zarr")
    p.add_argument("--num", type=int, default=100, help="images to generate (default 100)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0); same seed, same images")
    p.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint: the newest complete one (latest, default) or the one with the lowest SWD "
                        "measured during training (best)")
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="the averaged generator (ema: default when the checkpoint has one; cleaner images) or the "
                        "trained weights of that step (raw)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (overrides --which)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"images per forward pass (default {DEFAULT_BATCH}); changes speed and memory, not images")
    p.add_argument("--grid", metavar="PNG", default=None,
                   help=f"also draw the first {GRID_MAX} images as a PNG grid (a .png name; an existing file is "
                        "replaced only if brats_gan drew it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic store")
    p.add_argument("--channels", nargs="+", metavar="NAME", default=None,
                   help="modality names of the training data, when its store is gone and the run did not "
                        "name them (default: from the run)")


def run(args: argparse.Namespace) -> int:
    try:
        report = generate(args.checkpoint, args.out, args.num, seed=args.seed, step=args.step, which=args.which,
                          weights=args.weights, batch_size=args.batch_size, grid=args.grid, overwrite=args.overwrite,
                          channels=args.channels)
    except OutputNotWritten as err:
        print(f"brats-gan generate: error: {err}", file=sys.stderr)
        return EXIT_UNSAVED
    ck = report.checkpoint
    print(f"{report.out}: {report.num} synthetic slices {'x'.join(map(str, report.shape[1:]))} "
          f"({', '.join(ck.channels)}) from {ck.run} step {ck.step} ({ck.preset}, "
          f"{'averaged' if ck.weights_kind == 'ema' else 'trained'} generator), seed {report.seed}, "
          f"on {report.device}, {report.seconds:.1f} s")
    if report.grid is not None:
        print(f"grid of the first {min(report.num, GRID_MAX)}: {report.grid}")
    return 0
