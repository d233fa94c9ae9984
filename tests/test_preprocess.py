"""The preprocessing stage end to end: real LocalCluster, real Zarr stores, the CLI as users run it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from conftest import cli, kill_group, run_cli
from store_factory import read_without_brats_gan

from brats_gan import schema
from brats_gan.discover import discover_subjects
from brats_gan.preprocess import PreprocessConfig, run_preprocess


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def wait_for(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def markers(store: Path) -> list[str]:
    return sorted(p.parent.name for p in (store / "progress").glob("*/zarr.json"))


def test_real_case_store_is_readable_by_xarray_and_zarr_alone(tmp_path, real_case, dask_client):
    store = tmp_path / "real.zarr"
    subjects = discover_subjects(real_case)
    report = run_preprocess(subjects, store, PreprocessConfig(modalities=("flair", "t1c", "t2")), dask_client,
                            progress=False)
    assert report.complete and report.stored == ["BraTS-GLI-00001-000"]
    (seen,) = read_without_brats_gan(store)
    assert not seen["brats_gan_imported"]
    assert seen["dims"] == ["sample", "channel", "y", "x"] and seen["shape"] == [48, 3, 256, 256]
    assert seen["min"] == -1.0 and seen["max"] == 1.0 and seen["nan"] == 0
    assert 0.5 < seen["background"] < 0.9
    assert seen["channels"] == ["flair", "t1ce", "t2"] and seen["attrs"]["complete"] is True
    dtypes = seen["zarr_types"].values()
    assert not any("UTF" in d or "String" in d for d in dtypes), "core Zarr v3 data types only (names in attributes)"
    assert seen["subjects"] == ["BraTS-GLI-00001-000"]
    # 48 contiguous slices centred on the largest brain cross-section of the real volume
    vol = np.asanyarray(nib.as_closest_canonical(nib.load(subjects[0].files["flair"])).dataobj)
    area = (vol != 0).sum(axis=(0, 1))
    assert seen["slice_index"] == list(range(seen["slice_index"][0], seen["slice_index"][0] + 48))
    assert abs(np.mean(seen["slice_index"]) - np.argmax(area)) <= 1
    # the sharding contract: one shard per subject, 8-sample chunks
    image = zarr.open_group(store, mode="r")["image"]
    assert image.shards == (48, 3, 256, 256) and image.chunks == (8, 3, 256, 256)


def test_bad_inputs_are_named_then_skipped_and_nothing_is_lost(tmp_path, phantoms_2020, dask_client):
    data = copy_dataset(phantoms_2020, tmp_path / "data")
    ids = sorted(p.name for p in data.iterdir())
    flair = lambda sid: data / sid / f"{sid}_flair.nii.gz"
    raw = flair(ids[1]).read_bytes()
    flair(ids[1]).write_bytes(raw[: len(raw) // 3])  # truncated
    (data / ids[2] / f"{ids[2]}_t1ce.nii.gz").unlink()  # missing requested modality
    affine = nib.load(flair(ids[0])).affine
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 40), np.int16), affine), flair(ids[3]))  # empty
    t1ce = data / ids[4] / f"{ids[4]}_t1ce.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(t1ce).dataobj)[:, :, :32].copy(), affine), t1ce)
    cases = {ids[1]: "truncated", ids[2]: "missing modality t1ce", ids[3]: "empty", ids[4]: "differs from"}
    store = tmp_path / "s.zarr"
    args = ["preprocess", str(data), "--out", str(store), "--modalities", "flair,t1ce", "--slices", "8",
            "--scheduler", dask_client.scheduler.address, "--no-progress"]

    strict = run_cli(*args)
    assert strict.returncode == 1, strict.output
    for sid, reason in cases.items():
        assert any(sid in line and reason in line for line in strict.stderr.splitlines()), (sid, strict.stderr)
    assert "NOT complete" in strict.stderr
    assert zarr.open_group(store, mode="r").attrs["complete"] is False

    run_cli(*args, "--resume", "--skip-invalid", ok=True)
    attrs = dict(zarr.open_group(store, mode="r").attrs)
    assert attrs["complete"] is True
    assert {s["subject"] for s in attrs["skipped"]} == set(cases)
    (seen,) = read_without_brats_gan(store)
    assert seen["subjects"] == [ids[0], ids[5]] and seen["shape"] == [16, 2, 256, 256] and seen["nan"] == 0

    info = run_cli("info", store, ok=True).stdout
    assert "complete: True" in info and "skipped: 4" in info and ids[1] in info


def test_existing_store_is_never_overwritten_and_other_parameters_are_refused(tmp_path, phantoms_2020):
    store = tmp_path / "s.zarr"
    base = ["preprocess", str(phantoms_2020), "--out", str(store), "--slices", "8", "--workers", "1",
            "--dashboard-port", "0", "--no-progress"]
    first = run_cli(*base, watch_imports=True)
    assert first.returncode == 0, first.stderr
    assert first.imported == set(), "preprocessing must not import torch or deepspeed"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    again = run_cli(*base)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    other = ["preprocess", str(phantoms_2020), "--out", str(store), "--slices", "4", "--workers", "1", "--resume"]
    mismatch = run_cli(*other)
    assert mismatch.returncode == 2 and "other parameters" in mismatch.stderr and "slices" in mismatch.stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before

    run_cli(*base, "--overwrite", ok=True)
    assert zarr.open_group(store, mode="r").attrs["complete"] is True


def test_overwrite_and_resume_never_touch_what_brats_gan_did_not_write(tmp_path, phantoms_2020, capsys):
    from brats_gan.commands import main as cli_main

    data = copy_dataset(phantoms_2020, tmp_path / "data" / phantoms_2020.name)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("four years of work\n")
    (tmp_path / "notes.txt").write_text("a file\n")

    def snapshot() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    before = snapshot()
    for out, flags, message in [
        (thesis, ["--overwrite"], "is not a store brats_gan wrote; --overwrite only replaces"),
        (thesis, ["--resume"], "--resume continues only a store that `brats-gan preprocess` started"),
        (data, ["--overwrite"], "holds the input"),  # the dataset itself
        (data.parent, ["--overwrite"], "holds the input"),  # a folder above it
        (tmp_path / "notes.txt", [], "is a file, not a store folder"),
        (tmp_path / "notes.txt", ["--overwrite"], "is a file, not a store folder"),
    ]:
        argv = ["preprocess", str(data), "--out", str(out), "--workers", "1", "--dashboard-port", "0", *flags]
        assert cli_main(argv) == 2, argv
        captured = capsys.readouterr()
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
        assert "dashboard" not in captured.out, "refused before any cluster starts"
    assert snapshot() == before, "nothing a user owns is deleted or changed"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_prints_one_line_keeps_what_was_stored_and_resume_finishes(tmp_path, signum):
    from brats_gan.phantoms import write_phantom_dataset

    (one,) = write_phantom_dataset(tmp_path / "one", n_subjects=1, shape=(64, 64, 40), modalities=("flair",),
                                   with_seg=False)
    flair = next(one.glob("*_flair.nii.gz"))
    data = tmp_path / "data"
    for i in range(1, 301):
        sid = f"BraTS20_Training_{i:03d}"
        (data / sid).mkdir(parents=True)
        (data / sid / f"{sid}_flair.nii.gz").symlink_to(flair)
    store = tmp_path / "s.zarr"
    argv = ["preprocess", str(data), "--out", str(store), "--slices", "8", "--workers", "2", "--dashboard-port", "0",
            "--no-progress"]
    proc = subprocess.Popen(cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # signalled as a terminal or a scheduler does: the whole group
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: len(markers(store)) >= 5, what="five subjects stored")
        os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
    assert proc.returncode == 128 + signum, err
    said = [line for line in err.splitlines() if line.startswith("brats-gan preprocess: ")]
    assert len(said) == 1 and "of 300 subjects; run the same command with --resume" in said[0], err
    assert ("interrupted" if signum == signal.SIGINT else "stopped by SIGTERM") in said[0]
    if signum == signal.SIGINT:  # the workers ignore Ctrl-C: this process alone stops them, quietly
        assert [line for line in err.splitlines() if " INFO " not in line] == said, err
    # (SIGTERM reaches the workers too: Dask may log their lost connections before this process stops)
    run_cli(*argv, "--resume", ok=True)
    assert zarr.open_group(store, mode="r")["image"].shape[0] == 300 * 8


@pytest.fixture(scope="module", params=["phantom", "real"])
def many_real(request, tmp_path_factory, dask_client) -> tuple[Path, Path]:
    """60 subjects sharing one full-size FLAIR (symlinks) and a store written from them in one run. The FLAIR
    is a phantom the test writes, so a plain clone runs these tests too, and also the real BraTS case where
    ``../shared`` has it."""
    root = tmp_path_factory.mktemp(f"many-{request.param}") / "data"
    if request.param == "real":
        flair = next(request.getfixturevalue("real_case").glob("*/*-t2f.nii.gz"))
    else:
        from brats_gan.phantoms import write_phantom_dataset

        (one,) = write_phantom_dataset(root.parent / "one", n_subjects=1, modalities=("flair",), with_seg=False)
        flair = next(one.glob("*_flair.nii.gz"))
    for i in range(1, 61):
        sid = f"BraTS-GLI-{i:05d}-000"
        (root / sid).mkdir(parents=True)
        (root / sid / f"{sid}-t2f.nii.gz").symlink_to(flair)
    reference = root.parent / "reference.zarr"
    run_preprocess(discover_subjects(root), reference, PreprocessConfig(slices=8), dask_client, progress=False)
    return root, reference


def assert_same_store(got: Path, reference: Path) -> None:
    ref, new = zarr.open_group(reference, mode="r"), zarr.open_group(got, mode="r")
    assert new.attrs["complete"] is True
    for name in ("image", *schema.SAMPLE_COORDS, *schema.SOURCE_ARRAYS):
        np.testing.assert_array_equal(new[name][:], ref[name][:], err_msg=name)
    for name in ("subject_names", "channel_names", "sources", "input_folder"):
        assert new.attrs[name] == ref.attrs[name], name


def test_kill_9_mid_run_then_resume_equals_a_single_run(tmp_path, many_real, env_unbuffered):
    data, reference = many_real
    store = tmp_path / "s.zarr"
    args = ["preprocess", str(data), "--out", str(store), "--slices", "8", "--workers", "1",
            "--dashboard-port", "0", "--no-progress"]
    proc = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_unbuffered, start_new_session=True)
    try:
        link = ""
        while "dashboard:" not in link:
            link = proc.stdout.readline()
            assert link or proc.poll() is None, "preprocess exited before printing its dashboard link"
        url = link.split("dashboard:")[1].strip()
        assert url.startswith("http://127.0.0.1:"), "the dashboard must listen on loopback only"
        with urllib.request.urlopen(url, timeout=10) as page:
            assert page.status == 200 and b"Dask" in page.read()
        wait_for(lambda: len(markers(store)) >= 3, what="three stored subjects")
        kill_group(proc.pid)  # the CLI, its Dask workers and its resource tracker, mid-run
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            kill_group(proc.pid)
    assert zarr.open_group(store, mode="r").attrs["complete"] is False, "the run finished before the kill"
    done = markers(store)
    slots = {sid: zarr.open_group(store / "progress" / sid, mode="r").attrs["slot"] for sid in done}
    shards_before = {p: p.stat().st_mtime_ns for slot in slots.values()
                     for p in (store / "image" / "c" / str(slot)).rglob("*") if p.is_file()}
    assert len(shards_before) == len(done)

    resumed = run_cli(*args, "--resume", ok=True)
    assert f"{len(done)} of 60 subjects already done" in resumed.stderr
    assert {p: p.stat().st_mtime_ns for p in shards_before} == shards_before, "finished subjects were redone"
    assert_same_store(store, reference)
    assert not (store / "progress").exists()


def test_worker_killed_mid_run_is_retried(tmp_path, many_real):
    from distributed import Client, LocalCluster

    data, reference = many_real
    store = tmp_path / "s.zarr"
    result: dict = {}
    # a cluster of its own: the session's must not lose a worker to this test
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:

        def run():
            try:
                result["report"] = run_preprocess(discover_subjects(data), store, PreprocessConfig(slices=8),
                                                  client, progress=False)
            except Exception as err:  # noqa: BLE001  (surfaced by the assertion below)
                result["error"] = err

        runner = threading.Thread(target=run)
        runner.start()
        wait_for(lambda: len(markers(store)) >= 3, what="three stored subjects")
        _, pid = next(iter(client.run(os.getpid).items()))
        os.kill(pid, signal.SIGKILL)
        runner.join(timeout=180)
    assert "error" not in result, result.get("error")
    assert len(markers(store)) == 0 and len(result["report"].stored) == 60 - result["report"].already_done
    assert_same_store(store, reference)


def test_preview_draws_a_contact_sheet(tmp_path, phantoms_2020, dask_client):
    from PIL import Image

    store = tmp_path / "s.zarr"
    run_preprocess(discover_subjects(phantoms_2020), store, PreprocessConfig(slices=8, size=64), dask_client,
                   progress=False)
    out = tmp_path / "grid.png"
    run_cli("preview", store, "--out", out, "--num", "16", ok=True)
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (4 * 64 + 3 * 2, 4 * 64 + 3 * 2)
    assert sheet.max() > 200 and (sheet == 0).mean() > 0.3, "bright brains on a black background"
    bad = run_cli("preview", tmp_path / "nothing.zarr")
    assert bad.returncode == 2 and "no Zarr store" in bad.stderr


def test_an_unforeseen_error_is_one_line_and_its_traceback_comes_with_v(store_factory) -> None:
    store = store_factory(subjects=2, slices=4, size=64)
    plain = run_cli("preview", store, "--out", "/proc/grid.png")  # a place no check foresaw: not writable
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    (line,) = plain.stderr.strip().splitlines()
    assert line.startswith("brats-gan preview: error: ") and line.endswith("(run with -v for the traceback)")
    verbose = run_cli("-v", "preview", store, "--out", "/proc/grid.png")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


@pytest.mark.parametrize("command", ["preprocess", "demo"])
@pytest.mark.parametrize("port", ["70000", "-5", "65536"])
def test_a_dashboard_port_out_of_range_is_refused_by_name_before_any_work(tmp_path, phantoms_2020, command, port):
    out = tmp_path / "out"
    argv = (["preprocess", phantoms_2020, "--out", out, "--workers", "1"] if command == "preprocess"
            else ["demo", "--out", out, "--steps", "1"])
    proc = run_cli(*argv, "--dashboard-port", port)
    assert proc.returncode == 2, proc.output
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"brats-gan {command}: error: --dashboard-port {port} is not a port: give 1-65535, or 0 for any free port"
    assert "dashboard:" not in proc.stdout and not out.exists(), "refused before any cluster starts or file is written"


def test_overwrite_through_a_link_to_a_store_is_refused_by_name_and_nothing_is_deleted(tmp_path, phantoms_2020):
    from store_factory import write_store

    store = write_store(tmp_path / "real.zarr", subjects=2, slices=4, size=32)
    link = tmp_path / "link.zarr"
    link.symlink_to(store.name)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    proc = run_cli("preprocess", phantoms_2020, "--out", link, "--overwrite", "--workers", "1",
                   "--dashboard-port", "0")
    assert proc.returncode == 2, proc.output
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"brats-gan preprocess: error: --out {link} is a symbolic link (to real.zarr); --overwrite "
                    f"replaces only a store named by its own path: give --out {store} or remove the link")
    assert "dashboard" not in proc.stdout, "refused before any cluster starts"
    assert link.is_symlink() and {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_overwrite_refuses_a_store_holding_what_its_writer_did_not_write_and_names_it(tmp_path, phantoms_2020):
    """A run folder or a synthetic store put inside a store would be deleted with it by --overwrite."""
    from brats_gan.preprocess import create_store, mark_skipped
    from store_factory import write_store

    store = write_store(tmp_path / "s.zarr", subjects=2, slices=4, size=32)
    (store / "run" / "checkpoints").mkdir(parents=True)
    (store / "run" / "checkpoints" / "step_000100.pt").write_bytes(b"weeks of training")
    write_store(store / "synthetic.zarr", subjects=1, slices=4, size=32)
    (store / "image" / "README.txt").write_text("notes")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    args = ["preprocess", phantoms_2020, "--out", store, "--slices", "4", "--size", "32", "--workers", "1",
            "--dashboard-port", "0", "--no-progress", "--overwrite"]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.output
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"brats-gan preprocess: error: --out {store} holds what brats-gan did not write there "
                    f"({store}/image/README.txt, {store}/run, {store}/synthetic.zarr); --overwrite would delete it "
                    "with the store: move it out of the store first, or choose another --out")
    assert "dashboard" not in proc.stdout, "refused before any cluster starts"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "nothing is deleted"

    # a store holding only its writer's own files is replaced, an interrupted one too (its completion
    # markers, and a temporary file zarr was writing when the process died)
    shutil.rmtree(store)
    create_store(str(store), PreprocessConfig(slices=4, size=32), ["BraTS20_Training_001"], overwrite=False)
    mark_skipped(str(store), "BraTS20_Training_001", "a reason")
    (store / "image" / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"cut short")
    run_cli(*args, ok=True)
    assert zarr.open_group(store, mode="r").attrs["complete"] is True
    assert sorted(p.name for p in store.iterdir()) == sorted(["image", *schema.SAMPLE_COORDS, *schema.SOURCE_ARRAYS,
                                                             "zarr.json"])


@pytest.mark.parametrize("limit_kib, stage", [(16, "write"), (4, "create")])
def test_a_full_disk_is_one_line_without_a_worker_traceback_and_resume_finishes(tmp_path, phantoms_2020, limit_kib,
                                                                                 stage):
    """Every file the command and its Dask workers write stops at the limit, as on a nearly full disk: 16 KiB
    lets the store be created and no subject's shard be written; 4 KiB stops the store's creation."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_kib * 1024, limit_kib * 1024))

    store = tmp_path / "s.zarr"
    argv = ["preprocess", phantoms_2020, "--out", store, "--slices", "8", "--workers", "1", "--dashboard-port", "0",
            "--no-progress"]
    proc = subprocess.run(cli(*argv), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    if stage == "write":
        assert errors == [f"brats-gan preprocess: error: cannot write {store} (OSError: [Errno 27] File too large); "
                          "free space (or raise the quota or file-size limit), then run the same command with "
                          "--resume (the subjects already stored are kept)"], proc.stderr
        again = "--resume"
    else:
        assert errors == [f"brats-gan preprocess: error: cannot create {store} (OSError: [Errno 27] File too "
                          "large); free space, then run the same command again"], proc.stderr
        assert not store.exists(), "a store cut short at its creation is removed"
        again = "--no-progress"
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr
    run_cli(*argv, again, ok=True)
    assert zarr.open_group(store, mode="r").attrs["complete"] is True
