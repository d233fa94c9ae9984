"""`brats-gan demo`: the whole pipeline on brain phantoms written in a BraTS 2020 layout.

It needs no download: it writes phantoms with tumour-like lesions, preprocesses them with Dask into
a store, and draws a preview, in a folder of its own that each run replaces.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from brats_gan.cli import CommandError

MARKER = ".brats-gan-demo"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="brats-gan-demo", help="demo folder, replaced on each run (default ./brats-gan-demo)")
    p.add_argument("--subjects", type=int, default=8, help="phantom subjects to write (default 8)")
    p.add_argument("--slices", type=int, default=48, help="axial slices per subject (default 48, the poster's)")
    p.add_argument("--workers", type=int, default=None, help="Dask workers (default: one per core)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--dashboard-port", type=int, default=8787)


def run(args: argparse.Namespace) -> int:
    from brats_gan.cluster import dask_client
    from brats_gan.discover import discover_subjects
    from brats_gan.phantoms import write_phantom_dataset
    from brats_gan.preprocess import PreprocessConfig, run_preprocess
    from brats_gan.preview import save_grid

    out = Path(args.out)
    if out.exists():
        if not (out / MARKER).exists():
            raise CommandError(f"{out} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by brats-gan demo; replaced on each run\n")
    data = out / "MICCAI_BraTS2020_TrainingData"
    print(f"[1/3] writing {args.subjects} brain phantoms (BraTS 2020 layout) to {data}")
    write_phantom_dataset(data, n_subjects=args.subjects, layout="2020", seed=args.seed)
    store = out / "store.zarr"
    print(f"[2/3] preprocessing with Dask into {store}")
    config = PreprocessConfig(slices=args.slices)
    with dask_client(args.workers, None, args.dashboard_port) as client:
        report = run_preprocess(discover_subjects(data), store, config, client)
    import xarray as xr

    ds = xr.open_zarr(store)
    n = ds.sizes["sample"]
    picks = [round(i * (n - 1) / 15) for i in range(16)]
    grid = save_grid(ds.image.isel(sample=picks).values, out / "preview.png", columns=4)
    print(f"[3/3] preview of 16 stored slices: {grid}")
    print(f"\ndone in {report.seconds:.1f} s: {len(report.stored)} subjects x {args.slices} slices in {store}")
    print(f"  inspect it:   brats-gan info {store}")
    print(f"  open it:      python -c \"import xarray as xr; print(xr.open_zarr('{store}'))\"")
    return 0
