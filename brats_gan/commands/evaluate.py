"""`brats-gan evaluate`: the figures of :func:`brats_gan.evaluate.evaluate` as a table a person reads, or one
JSON object (``--json``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from brats_gan.evaluate import DEFAULT_MAX_IMAGES, evaluate


def configure_parser(p: argparse.ArgumentParser) -> None:
    from brats_gan.metrics import list_metrics

    p.add_argument("--real", required=True, metavar="REAL.zarr",
                   help="real slices; with --train they must be held out (subjects not in the training store)")
    p.add_argument("--fake", required=True, metavar="FAKE.zarr", help="synthetic slices (e.g. from `brats-gan generate`)")
    p.add_argument("--train", metavar="TRAIN.zarr", help="the generator's training store: enables the memorisation figures")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--report", metavar="DIR", help="write metrics.json, metric-<name>.jsonl and PNGs here")
    p.add_argument("--inception-weights", metavar="FILE",
                   help="the FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth): enables FID, KID, "
                        "precision and recall; never downloaded")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help=f"slices drawn at random from --real and from --fake (default {DEFAULT_MAX_IMAGES}); "
                        "the training store is always read in full")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (subsets, patches, pairs)")
    p.add_argument("--metrics", default=",".join(list_metrics()),
                   help=f"comma-separated subset of {','.join(list_metrics())} (default: all)")


# --------------------------------------------------------------------------------------------
# checks before any pixel is read


def run(args: argparse.Namespace) -> int:
    out = evaluate(args.real, args.fake, args.train, metrics=args.metrics, max_images=args.max_images,
                   seed=args.seed, inception_weights=args.inception_weights, report=args.report)
    print(json.dumps(out) if args.json else format_table(out))
    return 0


def format_table(out: dict[str, Any]) -> str:
    """The figures as lines a person reads; rows of metrics that did not run are left out (their notes say why)."""
    lines = [
        f"real  {out['real']}: {out['n_real']} slices",
        f"fake  {out['fake']}: {out['n_fake']} slices",
        *([f"train {out['train']}: {out['n_train']} slices"] if out["train"] else []),
        f"compared at {out['image_size']} px, {out['channels']} channel(s)",
        "",
    ]
    if out["swd"] is not None:
        levels = " ".join(f"{v:.1f}" for v in out["swd_levels"])
        lines.append(f"SWD x1e3        {out['swd']:.2f}   floor (real half vs real half) {out['swd_floor']:.2f}"
                     f"   per level {out['swd_resolutions']} px: {levels}")
    if out["checkerboard"] is not None:
        lines.append(f"checkerboard    {out['checkerboard']:.2f} dB synthetic, {out['checkerboard_real']:.2f} dB real"
                     "   (0 dB = no grid)")
    if out["ms_ssim_fake"] is not None:
        lines.append(f"MS-SSIM pairs   {out['ms_ssim_fake']:.3f} synthetic, {out['ms_ssim_real']:.3f} real"
                     "   (lower = more diverse)")
    if out["memorisation_share"] is not None:
        lines.append(
            f"memorisation    {100 * out['memorisation_share']:.1f}% of synthetic slices closer to a training slice "
            f"than any held-out slice (RMS {out['memorisation_threshold']:.4f}); median nearest-training RMS "
            f"{out['nearest_train_fake_median']:.4f} synthetic, {out['nearest_train_real_median']:.4f} held-out")
    if out["fid"] is not None:
        lines.append(f"Inception-v3    FID {out['fid']:.2f}   KID {out['kid']:.4f} ± {out['kid_std']:.4f}   "
                     f"precision {out['precision']:.3f}   recall {out['recall']:.3f}")
    lines += [f"note: {n}" for n in out["notes"]]
    return "\n".join(lines)


