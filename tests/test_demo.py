import re

from conftest import run_cli
from PIL import Image

from brats_gan import open_store


def test_demo_runs_every_stage_and_replaces_only_its_own_folder(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--subjects", "2", "--heldout", "2", "--slices", "8", "--workers", "1",
            "--dashboard-port", "0", "--steps", "2"]
    first = run_cli(*args, ok=True)
    real = open_store(out / "store.zarr")
    assert real.attrs["complete"] and real.sizes["sample"] == 16 and len(set(real.subject.values)) == 2
    assert (out / "preview.png").stat().st_size > 1000 and "brats-gan info" in first.stdout
    heldout = open_store(out / "heldout.zarr")
    assert heldout.attrs["complete"] and heldout.sizes["sample"] == 16
    assert not set(heldout.subject.values) & set(real.subject.values), "held-out phantoms are other subjects"
    measured = re.search(r"against the 2 held-out phantoms: SWD x1e3 ([\d.]+), real-vs-real floor ([\d.]+): "
                         r"([\d.]+)x the floor", first.stdout)
    assert measured, first.stdout
    swd, floor, ratio = map(float, measured.groups())
    assert swd > floor > 0 and abs(ratio - swd / floor) < 0.06, "two steps of training are far from real slices"
    grid = re.search(r"checkerboard (-?[\d.]+) dB synthetic, (-?[\d.]+) dB real: ([+-][\d.]+) dB", first.stdout)
    assert grid, first.stdout
    fake_db, real_db, excess = map(float, grid.groups())
    assert abs(excess - (fake_db - real_db)) < 0.11, "the excess is synthetic minus real"
    assert f"checkerboard:      {excess:+.1f} dB from the real slices" in first.stdout

    run = out / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "2"
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2
    assert (run / "samples" / "step_0000002.png").is_file()

    synthetic = open_store(out / "synthetic.zarr")
    assert synthetic.attrs["synthetic"] is True and synthetic.attrs["complete"] is True
    assert synthetic.attrs["checkpoint"]["weights"] == "ema", "the demo draws from the averaged generator"
    assert synthetic.attrs["checkpoint"]["step"] == 2 and synthetic.attrs["checkpoint"]["preset"] == "tiny"
    assert dict(synthetic.sizes) == {"sample": 64, "channel": 1, "y": 64, "x": 64}
    assert synthetic.channel.values.tolist() == real.channel.values.tolist() == ["flair"]
    assert {k: (v.dims, v.dtype) for k, v in synthetic.coords.items()} == \
           {k: (v.dims, v.dtype) for k, v in real.coords.items() if "source" not in v.dims}  # no source file
    assert synthetic.image.dtype == real.image.dtype and synthetic.image.dims == real.image.dims
    with Image.open(out / "synthetic.png") as grid:
        assert grid.size == (8 * 66 - 2, 8 * 66 - 2)  # 64 tiles of 64 px, 2-pixel gaps
    for where in (out / "store.zarr", run, out / "synthetic.zarr", out / "synthetic.png"):
        assert str(where) in first.stdout

    run_cli(*args, ok=True)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = run_cli("demo", "--out", other)
    assert refused.returncode == 2 and "not a demo folder" in refused.stderr
    assert (other / "keep.txt").read_text() == "mine"
    bad = run_cli("demo", "--out", out, "--workers", "0")
    assert bad.returncode == 2 and "--workers must be at least 1, got 0" in bad.stderr
    assert open_store(out / "synthetic.zarr").attrs["complete"], "a refused demo leaves the last one's results"
