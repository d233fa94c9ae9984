"""`brats-gan preprocess`: a BraTS folder into a slice store, with a Dask cluster, a progress bar and a
per-subject report of what could not be used."""

from __future__ import annotations

import argparse
import sys

from brats_gan.errors import UserError


def configure_parser(p: argparse.ArgumentParser) -> None:
    from brats_gan.transforms import SLICE_POLICIES

    p.add_argument("input", help="BraTS dataset folder (holding subject folders), or the folder above it")
    p.add_argument("--out", required=True, metavar="STORE", help="Zarr store to write, e.g. brats.zarr")
    p.add_argument("--modalities", default="flair",
                   help="comma-separated channels, in order (flair|t2f, t1|t1n, t1ce|t1c, t2|t2w); default flair")
    p.add_argument("--subjects", metavar="SPEC",
                   help="subjects to take: IDs and/or case numbers and ranges, e.g. 001-015 (the poster's)")
    p.add_argument("--slices", type=int, default=48, help="axial slices per subject (default 48, as in the poster)")
    p.add_argument("--slice-policy", choices=SLICE_POLICIES, default="brain",
                   help="brain: centred on the largest brain cross-section (default); tumour: the window "
                        "with the most tumour (needs seg); range: --slice-range")
    p.add_argument("--slice-range", metavar="START:STOP", help="explicit axial index range, e.g. 50:98")
    p.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5), metavar=("LOW", "HIGH"),
                   help="brain intensity percentiles mapped to -1 and 1 (default 0.5 99.5)")
    p.add_argument("--size", type=int, default=256, help="output image size; volumes are centre-padded/cropped")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, help="start a local Dask cluster of N workers (default: one per core)")
    group.add_argument("--scheduler", metavar="ADDRESS", help="use an existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--dashboard-port", type=int, default=8787,
                   help="local cluster dashboard port, 0 for any free one (default 8787)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an incomplete store with the same parameters")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--skip-invalid", action="store_true",
                   help="store the good subjects and list the bad ones, instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace):
    from brats_gan.preprocess import PreprocessConfig

    slice_range = None
    if args.slice_range:
        try:
            start, stop = (int(x) for x in args.slice_range.split(":"))
        except ValueError:
            raise UserError(f"--slice-range: expected START:STOP, got {args.slice_range!r}") from None
        slice_range = (start, stop)
    try:
        return PreprocessConfig(
            modalities=tuple(m.strip() for m in args.modalities.split(",") if m.strip()),
            slices=args.slices,
            slice_policy=args.slice_policy,
            slice_range=slice_range,
            percentiles=tuple(args.percentiles),
            size=args.size,
        )
    except ValueError as err:
        raise UserError(f"bad preprocessing option: {err}") from None


def run(args: argparse.Namespace) -> int:
    from brats_gan.cluster import ClusterError, check_dashboard_port, dask_client
    from brats_gan.discover import DiscoveryError, discover_subjects, select_subjects
    from brats_gan.preprocess import PreprocessError, check_output, run_preprocess

    config = _config(args)
    try:
        check_dashboard_port(args.dashboard_port)
        subjects = select_subjects(discover_subjects(args.input), args.subjects)
        check_output(args.out, subjects, resume=args.resume, overwrite=args.overwrite)
    except (DiscoveryError, PreprocessError, ClusterError) as err:
        raise UserError(str(err)) from None
    print(f"{len(subjects)} subjects, modalities {', '.join(config.modalities)}, "
          f"{config.slices} slices each -> {args.out}")
    try:
        with dask_client(args.workers, args.scheduler, args.dashboard_port) as client:
            report = run_preprocess(subjects, args.out, config, client, resume=args.resume,
                                    overwrite=args.overwrite, skip_invalid=args.skip_invalid,
                                    progress=not args.no_progress)
    except (PreprocessError, ClusterError) as err:
        raise UserError(str(err)) from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM from a scheduler (stopping.Stopped)
        status = getattr(err, "exit_status", 130)
        how = "interrupted" if status == 130 else f"stopped by {err}"
        print(f"brats-gan preprocess: {how}: {_kept(args.out, len(subjects))}", file=sys.stderr)
        return status
    bad = sorted(report.invalid or report.skipped)
    if bad:
        print(f"\n{len(bad)} subject(s) could not be used:", file=sys.stderr)
        for sid, reason in bad:
            print(f"  {sid}: {reason}", file=sys.stderr)
    if report.invalid:
        print(f"\n{args.out} is NOT complete. Fix or remove these subjects and re-run with --resume, "
              "or re-run with --resume --skip-invalid to store the rest without them.", file=sys.stderr)
        return 1
    from brats_gan.schema import read_summary

    summary = read_summary(args.out)
    print(f"{args.out}: complete, {summary.n_subjects} subjects x {config.slices} slices "
          f"({len(report.stored)} this run), {len(summary.attrs.get('skipped', []))} skipped, {report.seconds:.1f} s")
    return 0


def _kept(out: str, planned: int) -> str:
    """What an interrupted run leaves, and how to go on."""
    from brats_gan.preprocess import read_markers
    from brats_gan.schema import written_by_brats_gan

    if written_by_brats_gan(out) is None:
        return "nothing was written"
    try:
        done = len(read_markers(out))
    except Exception:  # noqa: BLE001  (a store cut short while its metadata was written)
        return f"{out} was being created; start again with --overwrite"
    return f"{out} keeps {done} of {planned} subjects; run the same command with --resume to finish it"
