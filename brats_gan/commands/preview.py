"""`brats-gan preview`: a contact sheet of stored slices, for checking preprocessing by eye."""

from __future__ import annotations

import argparse
import logging

import numpy as np

from brats_gan.errors import UserError
from brats_gan.images import save_grid

log = logging.getLogger(__name__)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a slice store")
    p.add_argument("--out", default="preview.png",
                   help="PNG to write (default preview.png); an existing file is replaced only if brats_gan drew it")
    p.add_argument("--num", type=int, default=64, help="slices to show, spread evenly over the store (default 64)")
    p.add_argument("--channel", default=None, help="channel to show (default: all 3 as RGB if 3, else the first)")
    p.add_argument("--columns", type=int, default=None, help="tiles per row (default: square)")


def run(args: argparse.Namespace) -> int:
    from brats_gan.schema import StoreError, check_png_output, open_store, read_summary

    if args.num < 1:
        raise UserError("--num must be at least 1")
    try:
        summary = read_summary(args.store)
        check_png_output(args.out, "--out")
    except StoreError as err:
        raise UserError(str(err)) from None
    ds = open_store(args.store)
    if args.channel is not None:
        if args.channel not in summary.channels:
            raise UserError(f"--channel {args.channel!r} not in the store's channels {list(summary.channels)}")
        ds = ds.sel(channel=[args.channel])
    picks = np.unique(np.linspace(0, summary.n_samples - 1, min(args.num, summary.n_samples)).round().astype(int))
    images = ds.image.isel(sample=picks).values
    out = save_grid(images, args.out, args.columns)
    subjects = ds.subject.values[picks]
    print(f"{out}: {len(picks)} slices of {summary.n_samples} from {len(set(subjects))} subject(s)"
          f"{'' if summary.complete else ' (store NOT complete: grey tiles were never written)'}")
    return 0
