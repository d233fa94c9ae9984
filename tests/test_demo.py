import subprocess

import xarray as xr

from tests.conftest import cli


def test_demo_writes_phantoms_store_and_preview_and_replaces_only_its_own_folder(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--subjects", "2", "--slices", "8", "--workers", "1", "--dashboard-port", "0"]
    first = subprocess.run(cli(*args), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    ds = xr.open_zarr(out / "store.zarr")
    assert ds.attrs["complete"] and ds.sizes["sample"] == 16 and len(set(ds.subject.values)) == 2
    assert (out / "preview.png").stat().st_size > 1000 and "brats-gan info" in first.stdout
    again = subprocess.run(cli(*args), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = subprocess.run(cli("demo", "--out", str(other)), capture_output=True, text=True)
    assert refused.returncode == 2 and "not a demo folder" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"
