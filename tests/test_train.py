"""The trainer for real: two CPU ranks under the DeepSpeed launcher, checkpoints that survive ``kill -9``,
exact resumption, refusals before any rank starts, and the data sharding underneath.

The first DeepSpeed start on a machine builds a shared-memory op (~30 s, cached under
TORCH_EXTENSIONS_DIR); after that each two-rank launch of a few tiny steps takes ~10 s.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, shm_buffers
from store_factory import sample_id
from training_runs import (
    LAUNCH_TIMEOUT,
    REPO,
    TINY,
    Listeners,
    assert_same_weights,
    launch,
    launcher,
    master_port,
    metric_rows,
    metric_steps,
    model_states,
    signal_after_steps,
)

from brats_gan import schema
from brats_gan.checkpoints import read_latest
from brats_gan.commands import main as cli_main
from brats_gan.data import Position, SliceStream, iterate_batches
from brats_gan.train_config import (
    DEFAULT_DEEPSPEED,
    ConfigError,
    autocast_dtype,
    build_options,
    load_deepspeed_config,
    precision_supported,
)

# ------------------------------------------------------------------------------------------ data


def test_ranks_share_each_epoch_without_overlap_or_duplicates(store_factory) -> None:
    store = store_factory(subjects=5, slices=12)  # 60 samples: remainders for every world size below
    for world, batch in itertools.product((1, 2, 3, 4), (2, 4, 8)):
        streams = [SliceStream(str(store), batch_size=batch, image_size=64, rank=r, world_size=world, seed=7)
                   for r in range(world)]
        per_rank = 60 // (world * batch) * batch
        for epoch in range(3):
            shares = [s.rank_share(epoch) for s in streams]
            assert all(share.shape == (per_rank // batch, batch) for share in shares)
            together = np.concatenate([share.ravel() for share in shares])
            assert len(np.unique(together)) == len(together) == world * per_rank
        assert not np.array_equal(streams[0].rank_share(0), streams[0].rank_share(1)), "no reshuffle per epoch"


def test_loader_delivers_the_planned_samples_from_any_position(store_factory) -> None:
    store = store_factory(subjects=5, slices=12)
    stream = SliceStream(str(store), batch_size=4, image_size=256, rank=1, world_size=2, seed=3, cache="stream")
    rng_before = torch.get_rng_state()
    delivered = list(itertools.islice(iterate_batches(stream, num_workers=2), 20))
    assert torch.equal(rng_before, torch.get_rng_state()), "the loader must not draw from the global RNG"
    assert stream.__getstate__()["_array"] is None, "workers open the store themselves"
    pickle.dumps(stream)
    import zarr

    stored = torch.from_numpy(zarr.open_group(str(store), mode="r")["image"][:])
    for position, batch in delivered:
        # at store size the loader hands over the stored float16 values exactly (the trainer converts)
        assert batch.shape == (4, 1, 256, 256) and batch.dtype == torch.float16
        ids = [sample_id(v) for v in batch[:, 0, 0, 0]]
        assert ids == stream.rank_share(position.epoch)[position.batch].tolist()
        assert torch.equal(batch, stored[ids])
    assert delivered[7][0] == Position(1, 0), "7 micro-batches per rank per epoch"
    restarted = list(itertools.islice(iterate_batches(stream, delivered[9][0]), 11))
    for (pa, a), (pb, b) in zip(delivered[9:], restarted):
        assert pa == pb and torch.equal(a, b)


def test_channels_downsampling_and_cache_agree(store_factory) -> None:
    store = store_factory(subjects=2, slices=8, channels=("flair", "t1", "t2"))
    kwargs = {"batch_size": 4, "image_size": 64, "seed": 1}
    three = SliceStream(str(store), **kwargs)
    assert three.channels == ("flair", "t1", "t2") and three.cached
    one = SliceStream(str(store), channels=["t1"], cache="stream", **kwargs)
    cached = SliceStream(str(store), channels=["t1"], cache="memory", **kwargs)
    a, b = one[(0, 0)], cached[(0, 0)]
    assert a.shape == (16, 1, 64, 64) and a.dtype == torch.float32 and torch.equal(a, b)
    rows = torch.from_numpy(one.read(one.window_indices(0, 0))).float()
    assert torch.equal(a, F.avg_pool2d(rows, 4)), "area means of the stored values"
    assert torch.equal(three[(0, 0)][:, 1], SliceStream(str(store), channels=["t1"], **kwargs)[(0, 0)][:, 0])
    assert a.min() >= -1 and a.max() <= 1
    with pytest.raises(schema.StoreError, match="one or three"):
        SliceStream(str(store), channels=["flair", "t1"], **kwargs)
    with pytest.raises(schema.StoreError, match="too few"):
        SliceStream(str(store), batch_size=8, image_size=64, world_size=3)


def test_window_reads_match_zarr_with_channels_and_missing_shards_and_are_shared(store_factory, tmp_path: Path) -> None:
    import zarr

    store = tmp_path / "holes.zarr"
    shutil.copytree(store_factory(subjects=3, slices=12, channels=("flair", "t1", "t2")), store)
    shutil.rmtree(store / "image" / "c" / "1")  # shard 1 (samples 12-23) never written: the fill value
    expected = zarr.open_group(str(store), mode="r")["image"][:][:, [2, 0]]
    stream = SliceStream(str(store), channels=["t2", "flair", "flair"], batch_size=4, image_size=256,
                         cache="stream")
    picks = np.random.default_rng(0).permutation(36)[:29]  # runs of every length, across chunks and shards
    got = stream.read(picks)
    assert np.array_equal(got, expected[picks][:, [0, 1, 1]], equal_nan=True)

    async def from_a_running_event_loop() -> np.ndarray:  # as in a notebook
        return stream.read(picks)

    assert np.array_equal(asyncio.run(from_a_running_event_loop()), got, equal_nan=True)
    assert np.isnan(got[(picks >= 12) & (picks < 24)]).all() and not np.isnan(got[picks < 12]).any()
    window = stream[(0, 0)]
    assert window.dtype == torch.float16
    assert np.array_equal(stream.read(stream.window_indices(0, 0)), window.numpy(), equal_nan=True)
    # in a loader worker each window (256 and 64) is built in shared memory, so handing it over copies nothing
    for size in (256, 64):
        probe = _SharedProbe(SliceStream(str(store), batch_size=4, image_size=size, cache="stream"))
        assert list(torch.utils.data.DataLoader(probe, batch_size=None, num_workers=1)) == [True]


class _SharedProbe(torch.utils.data.Dataset):
    def __init__(self, stream: SliceStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> bool:
        return self.stream[(0, i)].untyped_storage().is_shared()


# ------------------------------------------------------------------------------------------ configs


def test_deepspeed_configs_hold_the_papers_recipe_and_validate() -> None:
    for name in ("paper", "paper_bf16", "paper_bf16_autocast", "tiny") + (("paper_fp16",) if precision_supported("fp16") else ()):
        load_deepspeed_config(str(REPO / "deepspeed_configs" / f"{name}.json"), "paper", world_size=2)
    for name in ("paper", "tiny"):
        on_disk = json.loads((REPO / "deepspeed_configs" / f"{name}.json").read_text())
        assert {k: v for k, v in on_disk.items() if not k.startswith("_")} == DEFAULT_DEEPSPEED[name]
    paper = DEFAULT_DEEPSPEED["paper"]
    params = paper["optimizer"]["params"]
    assert paper["train_micro_batch_size_per_gpu"] == 8 and paper["optimizer"]["type"] == "Adam"
    assert (params["lr"], tuple(params["betas"]), params["weight_decay"]) == (2e-4, (0.5, 0.999), 1e-3)
    assert params["torch_adam"] and params["adam_w_mode"] is False, "L2 weight decay (Chainer's hook), not AdamW"
    assert params["fused"], "torch's fused Adam: one kernel per step, not one per tensor (issue 18)"


def test_zero_stage_1_is_bf16s_optimizer_and_refused_elsewhere(tmp_path: Path) -> None:
    """paper_bf16.json steps through DeepSpeed's bf16 optimizer (ZeRO 1, fp32 gradients), not the per-tensor
    overflow checks of FP16_UnfusedOptimizer; in fp32 a stage 1 would only partition: refused by name."""
    bf16 = load_deepspeed_config(str(REPO / "deepspeed_configs" / "paper_bf16.json"), "paper", world_size=2)
    assert bf16["zero_optimization"]["stage"] == 1 and bf16["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = {**DEFAULT_DEEPSPEED["paper"], "zero_optimization": {"stage": 1}}
    (tmp_path / "ds.json").write_text(json.dumps(fp32))
    with pytest.raises(ConfigError, match="'zero_optimization.stage' 1 is for bf16 only"):
        load_deepspeed_config(str(tmp_path / "ds.json"), "paper", world_size=1)


def test_autocast_is_bf16_alone_and_keeps_the_fp32_recipe(tmp_path: Path) -> None:
    """paper_bf16_autocast.json is paper.json plus bf16 ``torch_autocast``; an fp16 autocast (a loss scaler that
    reads the host every step), an autocast with no dtype (the device's default) and one on top of bf16 or fp16
    weights are refused by field."""
    autocast = load_deepspeed_config(str(REPO / "deepspeed_configs" / "paper_bf16_autocast.json"), "paper", 2)
    assert {k: v for k, v in autocast.items() if k != "torch_autocast"} == DEFAULT_DEEPSPEED["paper"]
    assert autocast_dtype(autocast) == torch.bfloat16 and autocast_dtype(DEFAULT_DEEPSPEED["paper"]) is None
    for section, more, message in (
            ({"enabled": True, "dtype": "fp16"}, {}, "'torch_autocast.dtype' must be \"bf16\""),
            ({"enabled": True}, {}, "'torch_autocast.dtype' must be \"bf16\""),
            ({"enabled": True, "dtype": "bf16"}, {"bf16": {"enabled": True}}, "'torch_autocast' and 'bf16'")):
        (tmp_path / "ds.json").write_text(json.dumps({**DEFAULT_DEEPSPEED["paper"], "torch_autocast": section, **more}))
        with pytest.raises(ConfigError, match=message):
            load_deepspeed_config(str(tmp_path / "ds.json"), "paper", world_size=1)


# ------------------------------------------------------------------------------------------ refusals


def _refused(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert cli_main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(store: Path, store_factory, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    common = ["--out", str(out), "--preset", "tiny", "--steps", "2"]
    incomplete = store_factory(subjects=2, slices=4, complete=False)
    _refused(capsys, ["--store", str(incomplete), *common], "not marked complete")
    small = store_factory(subjects=1, slices=3)
    _refused(capsys, ["--store", str(small), *common], "3 samples are too few for one micro-batch of 4")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "optimiser": {"type": "Adam"}}))
    _refused(capsys, ["--store", str(store), *common, "--deepspeed-config", str(bad)],
             "unknown field 'optimiser' (did you mean 'optimizer'?)")
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                               "optimizer": {"type": "Adam", "params": {"weight_decy": 0.1}}}))
    _refused(capsys, ["--store", str(store), *common, "--deepspeed-config", str(bad)], "weight_decy")
    _refused(capsys, ["--store", str(store), *common, "--deepspeed-config", str(tmp_path)], "is a directory")
    _refused(capsys, ["--store", str(store), *common, "--n-critic", "0"], "--n-critic (training.n_critic)")
    _refused(capsys, ["--store", str(store), *common, "--log-every", "0"], "--log-every (checkpoint.log_every) must be")
    _refused(capsys, ["--store", str(store), *common, "--gp-every", "0"], "--gp-every (training.gp_every) must be")
    _refused(capsys, ["--out", str(out), "--resume"], "not a training run")
    assert not out.exists(), "nothing may be written for a refused run"
    finished = tmp_path / "finished"  # one rank, one step: the cheapest run with a complete checkpoint
    run_cli("train", "--store", store, "--out", finished, "--preset", "tiny", "--seed", "0", "--steps", "1",
            "--checkpoint-every", "1", "--sample-every", "0", "--num-workers", "0", env={"OMP_NUM_THREADS": "1"},
            ok=True)
    out.mkdir()
    shutil.copy(finished / "training_options.json", out)  # a run killed before its first checkpoint
    _refused(capsys, ["--store", str(store), *common], "already exists")
    _refused(capsys, ["--out", str(out), "--resume"], "names no complete checkpoint")
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
    _refused(capsys, ["--out", str(finished), "--resume", "--seed", "1"], "--seed 1 differs from the run's 0")
    _refused(capsys, ["--out", str(finished), "--resume", "--upsample", "transposed"],
             "--upsample 'transposed' differs from the run's 'resize'")  # the tiny recipe's, not given at the start
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == before
    assert sorted(p.name for p in out.iterdir()) == ["training_options.json"]


@pytest.mark.slow
def test_two_ranks_refuse_an_existing_run_and_leave_it_alone(store: Path, uninterrupted: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")}
    proc = launch("--store", store, "--out", uninterrupted, "--steps", "12", *TINY)
    assert proc.returncode != 0
    assert "already exists; pass --resume" in proc.output
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")} == before


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_two_ranks_train_checkpoint_and_watch(uninterrupted: Path) -> None:
    run = uninterrupted
    assert read_latest(run) == 12
    with open(run / "metrics.csv", newline="") as f:
        swd = {int(r["step"]): float(r["swd"]) for r in csv.DictReader(f) if r["swd"]}
    assert sorted(swd) == [3, 6, 9, 12] and all(np.isfinite(v) and v > 0 for v in swd.values())
    best = read_latest(run, "best")
    assert best == min(swd, key=swd.get), "`best` names the checkpoint with the lowest SWD"
    assert json.loads((run / "checkpoints" / str(best) / "trainer_state.json").read_text())["swd"] == swd[best]
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({9, 12, best}), "the two newest checkpoints and the best are kept"
    folder = run / "checkpoints" / "12"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 12
    # 12 steps x 5 critic micro-batches = 60 micro-batches at 6 per epoch: the start of epoch 10
    assert (state["epoch"], state["batch"]) == (10, 0)
    for rank in (0, 1):
        rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
        assert {"torch", "numpy", "python"} <= rng.keys()
    assert not torch.equal(torch.load(folder / "rng_rank0.pt", weights_only=True)["torch"],
                           torch.load(folder / "rng_rank1.pt", weights_only=True)["torch"])
    states = model_states(run, 12)
    assert states["generator"]["global_steps"] == 12 and states["critic"]["global_steps"] == 60
    group = states["critic"]["optimizer"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (2e-4, (0.5, 0.999), 1e-3)
    assert not group.get("decoupled_weight_decay", False)
    assert metric_steps(run) == list(range(1, 13))
    with open(run / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert all(np.isfinite(float(last[k])) for k in ("critic_loss", "generator_loss", "wasserstein"))
    assert float(last["images_per_s"]) > 0
    assert [p.name for p in sorted((run / "samples").iterdir())] == [f"step_{s:07d}.png" for s in (3, 6, 9, 12)]
    assert any((run / "tensorboard").iterdir())
    options = json.loads((run / "training_options.json").read_text())
    assert options["world_size"] == 2 and options["training"]["preset"] == "tiny"
    assert options["training"]["ema_images"] > 0 and state["ema"], "the averaged generator is on by default"
    raw, averaged = states["generator"]["module"], states["generator_ema"]["module"]
    assert raw.keys() == averaged.keys()
    assert {v.dtype for v in averaged.values() if v.is_floating_point()} == {torch.float32}
    assert any(not torch.equal(raw[k].float(), averaged[k]) for k in raw), "the average is not the trained weights"


@pytest.mark.slow
def test_kill_9_keeps_a_loadable_latest_and_resuming_matches_the_uninterrupted_run(
        store: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(launcher("--store", store, "--out", run, "--steps", "1000", *TINY),
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            while read_latest(run) is None:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step or mid-save
            proc.wait()
    step = read_latest(run)
    assert step is not None and step % 3 == 0
    if step >= 12:
        pytest.skip(f"the killed run was already at step {step} when the kill landed")
    folder = run / "checkpoints" / str(step)
    model_states(run, step)
    for rank in (0, 1):
        torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)

    proc = launch("--out", run, "--resume", "--steps", "12")
    assert proc.returncode == 0, proc.output
    assert f"resumed from step {step}" in proc.output
    assert metric_steps(run) == list(range(1, 13)), "the log continues where the checkpoint was taken"
    assert_same_weights(run, uninterrupted, 12)


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_one_step_checkpoints_it_and_resuming_matches(
        store: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """What SLURM's scancel or time limit does first: SIGTERM to every process of the job."""
    run = tmp_path / "terminated"
    command = launcher("--store", store, "--out", run, "--steps", "1000", "--checkpoint-on-signal", *TINY)
    signal_after_steps(command, run, tmp_path / "terminated.log", 4, signal.SIGTERM)
    output = (tmp_path / "terminated.log").read_text()
    step = read_latest(run)
    assert step is not None and step == metric_steps(run)[-1], "the step at which it stopped is checkpointed"
    assert output.count(f"stopped by SIGTERM after step {step}: checkpoint {step} holds it; continue with --resume") == 1
    assert "Traceback" not in output, output
    assert not shm_buffers(master_port(command)), "every rank left the process group and freed DeepSpeed's buffer"
    if step >= 12:
        pytest.skip(f"the run was already at step {step} when SIGTERM landed")
    proc = launch("--out", run, "--resume", "--steps", "12")
    assert proc.returncode == 0, proc.output
    assert metric_steps(run) == list(range(1, 13))
    assert_same_weights(run, uninterrupted, 12)


def test_a_full_disk_at_a_checkpoint_stops_with_one_line_not_a_traceback(store: Path, deepspeed_op: Path,
                                                                          tmp_path: Path) -> None:
    import resource

    def small_files() -> None:  # every file this process writes stops at 1 MiB, as on a nearly full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    run = tmp_path / "full"
    proc = subprocess.run([sys.executable, "-m", "brats_gan", "train", "--store", str(store), "--out", str(run),
                           "--preset", "tiny", "--steps", "3", "--checkpoint-every", "1", "--sample-every", "0"],
                          check=False, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, preexec_fn=small_files,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # deepspeed_op: built outside the limit
    assert proc.returncode == 5, proc.stderr
    assert "cannot write checkpoint 1 to" in proc.stderr and "GiB free there): training stopped" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_latest(run) is None


def test_resume_auto_starts_continues_or_moves_a_run_without_checkpoint_aside(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["train", "--store", store, "--out", run, "--preset", "tiny", "--seed", "0", "--checkpoint-every", "1",
              "--sample-every", "0", "--swd-images", "0", "--resume", "auto"]
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli(*common, "--steps", "1", env=env, ok=True)  # nothing there yet: a new run
    assert "resumed" not in first.stderr and read_latest(run) == 1
    again = run_cli(*common, "--steps", "2", env=env, ok=True)  # a checkpoint: continue it
    assert "resumed from step 1" in again.stderr and metric_steps(run) == [1, 2]

    shutil.rmtree(run / "checkpoints")  # a run killed before its first checkpoint
    started = run_cli(*common, "--steps", "1", env=env, ok=True)
    (aside,) = tmp_path.glob("run.no-checkpoint-*")
    assert f"moved to {aside}" in started.stderr and (aside / "training_options.json").exists()
    assert metric_steps(run) == [1] and read_latest(run) == 1

    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("not a run\n")
    refused = run_cli(*common[:3], "--out", other, *common[5:], "--steps", "1", env=env)
    assert refused.returncode == 2 and "exists and is not a training run folder" in refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["chapter1.tex"]


def test_one_process_listens_on_loopback_only_and_sigterm_exits_143(store: Path, deepspeed_op: Path,
                                                                    tmp_path: Path) -> None:
    run = tmp_path / "one"
    with open(tmp_path / "one.log", "w") as log:  # streamed: the loader workers get SIGTERM too and must not die of it
        proc = subprocess.Popen([sys.executable, "-m", "brats_gan", "train", "--store", str(store), "--out", str(run),
                                 "--preset", "tiny", "--steps", "1000", "--checkpoint-every", "1000",
                                 "--cache", "stream", "--num-workers", "2"], start_new_session=True,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            with Listeners(proc.pid) as listeners:  # from start-up to the third step, the loader workers included
                deadline = time.monotonic() + LAUNCH_TIMEOUT
                while not (run / "metrics.csv").exists() or len(metric_steps(run)) < 3:
                    assert proc.poll() is None, (tmp_path / "one.log").read_text()
                    assert time.monotonic() < deadline, "no third step in time"
                    time.sleep(0.05)
                workers = len(psutil.Process(proc.pid).children())
            assert listeners.seen and listeners.samples > 10, "the sampling saw the run's sockets"
            assert not listeners.beyond_loopback(), listeners.seen
            assert workers >= 2, "two loader workers"
            os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as scancel or the launcher does
            assert proc.wait(timeout=60) == 143, (tmp_path / "one.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "one.log").read_text()
    step = metric_steps(run)[-1]
    assert f"stopped by SIGTERM after step {step}: no checkpoint was written yet; move {run} away" in output
    assert "Traceback" not in output and "exited unexpectedly" not in output


def test_a_start_sweeps_deepspeed_buffers_that_no_process_maps(tmp_path: Path) -> None:
    import mmap

    from brats_gan.distributed import SHM, shm_buffer_name, sweep_stale_shm_buffers

    # Jobs of this test's own, by master address "test-<pid>": a killed one, a live one of which only rank 1's
    # buffer is mapped (rank 0's must stay: a starting peer may still open it), a young one, another owner's.
    addr = f"test-{os.getpid()}"
    names = {kind: SHM / shm_buffer_name(rank, addr, port) for kind, rank, port in
             (("orphan", 0, 1), ("live_rank0", 0, 2), ("live_rank1", 1, 2), ("young", 0, 3), ("foreign", 0, 4))}
    try:
        for kind, path in names.items():
            path.write_bytes(b"\0" * 4096)
            if kind != "young":
                os.utime(path, (time.time() - 600, time.time() - 600))
        if os.getuid() == 0:  # as root the sweep could unlink anyone's buffer: it must not
            os.chown(names["foreign"], 12345, -1)
            os.utime(names["foreign"], (time.time() - 600, time.time() - 600))
        else:
            names["foreign"].unlink()
        with open(names["live_rank1"], "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a live run's buffer
            removed = sweep_stale_shm_buffers()
        assert names["orphan"] in removed and not names["orphan"].exists()
        kept = ["live_rank0", "live_rank1", "young"] + (["foreign"] if os.getuid() == 0 else [])
        assert all(names[kind].exists() for kind in kept), {kind: names[kind].exists() for kind in kept}
    finally:
        for path in names.values():
            path.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_bf16_run_resumes_exactly(store: Path, tmp_path: Path) -> None:
    """bf16 trains through DeepSpeed's bf16 optimizer (ZeRO 1, issue 18), whose checkpoint holds its flat
    buffers' ``fragment_address`` tuples: the weights-only loader takes them, and the resumed run's losses are
    those of the run that never stopped. With a lazy penalty (``--gp-every 3``) the resumed step 3 is, as in the
    whole run, one without it: the schedule counts the run's critic steps, not the process's. (bf16 through
    ``torch_autocast`` checkpoints fp32 engines, as fp32 does; its Trainer runs in test_dispatch.py.)"""
    config = json.loads((REPO / "deepspeed_configs" / "paper_bf16.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "bf16.json").write_text(json.dumps(config))
    env = {"OMP_NUM_THREADS": "1"}

    def train(run: Path, steps: int, *more: str) -> str:
        return run_cli("train", "--store", store, "--out", run, "--preset", "tiny", "--steps", str(steps),
                       "--deepspeed-config", tmp_path / "bf16.json", "--checkpoint-every", "2", "--sample-every", "0",
                       "--swd-images", "0", "--gp-every", "3", *more, env=env, ok=True).output

    train(tmp_path / "whole", 3)  # checkpoints 2 and 3
    resumed = tmp_path / "resumed"  # the whole run as it was at its checkpoint 2: two launches, not three
    shutil.copytree(tmp_path / "whole", resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    (resumed / "checkpoints" / "latest").write_text("2\n")
    assert "resumed from step 2" in train(resumed, 3, "--resume")
    losses = ("critic_loss", "generator_loss", "wasserstein", "gradient_penalty")
    whole, resumed = ([[row[k] for k in losses] for row in metric_rows(tmp_path / run)] for run in ("whole", "resumed"))
    assert len(whole) == 3 and resumed == whole
    assert [float(row[3]) > 0 for row in whole] == [True, False, False], "the penalty on critic step 0 of 3"


def test_resume_skips_a_cut_short_newest_checkpoint_and_still_matches(store: Path, uninterrupted: Path,
                                                                      tmp_path: Path) -> None:
    run = tmp_path / "copied"
    shutil.copytree(uninterrupted, run)  # latest names 12; 9 is kept too
    for name in ("critic/mp_rank_00_model_states.pt", "rng_rank1.pt"):
        path = run / "checkpoints" / "12" / name
        path.write_bytes(path.read_bytes()[:1000])
    proc = launch("--out", run, "--resume", "--steps", "9")  # loads, then has nothing to do
    assert proc.returncode == 0, proc.output
    assert "checkpoint 12" in proc.output and "critic/mp_rank_00_model_states.pt is cut short" in proc.output
    assert read_latest(run) == 9, "latest names what was resumed, not the removed checkpoint"
    proc = launch("--out", run, "--resume", "--steps", "12")
    assert proc.returncode == 0, proc.output
    assert "resumed from step 9" in proc.output and "Traceback" not in proc.output
    assert metric_steps(run) == list(range(1, 13))
    assert_same_weights(run, uninterrupted, 12)


@pytest.mark.slow
def test_a_finished_run_resumes_and_continues_counting(store: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run = tmp_path / "continued"
    shutil.copytree(uninterrupted, run)
    proc = launch("--out", run, "--resume", "--steps", "14")
    assert proc.returncode == 0, proc.output
    assert "resumed from step 12" in proc.output
    assert metric_steps(run) == list(range(1, 15))
    assert read_latest(run) == 14


def test_a_learning_rate_schedule_spans_the_run_for_both_networks(store: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A decaying DeepSpeed schedule is counted in training steps: the critic, five updates a step, decays with
    the generator, not five times faster; its end defaults to --steps, and no run may train past it."""
    config = tmp_path / "decay.json"
    peak = 2e-4
    config.write_text(json.dumps({**DEFAULT_DEEPSPEED["tiny"], "scheduler": {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": peak, "warmup_num_steps": 2, "warmup_type": "linear"}}}))
    run = tmp_path / "run"
    proc = launch("--store", store, "--out", run, *TINY, "--steps", "6", "--sample-every", "0",
                  "--deepspeed-config", config, ranks=1)
    assert proc.returncode == 0, proc.output
    options = json.loads((run / "training_options.json").read_text())
    assert options["training"]["deepspeed"]["scheduler"]["params"]["total_num_steps"] == 6
    rates = {}
    for step in (3, 6):
        states = model_states(run, step)
        rates[step] = {tag: states[tag]["optimizer"]["param_groups"][0]["lr"] for tag in ("generator", "critic")}
    assert states["critic"]["global_steps"] == 5 * states["generator"]["global_steps"] == 30
    assert 0 < rates[6]["generator"] < rates[3]["generator"] <= peak, rates
    # the critic's rate changes within a step too (its five updates): within one step's decay of the generator's
    assert 0 < rates[6]["critic"] < rates[3]["critic"], rates
    for rate in rates.values():
        assert rate["critic"] == pytest.approx(rate["generator"], abs=peak / 4), rates
    past_the_end = "--steps (training.steps) 8 goes past the end of the learning-rate schedule " \
                   "(scheduler.params.total_num_steps 6)"
    _refused(capsys, ["--out", str(run), "--resume", "--steps", "8"], past_the_end)
    _refused(capsys, ["--out", str(run), "--resume", "--steps", "8", "--deepspeed-config", str(config)], past_the_end)
    before = (run / "training_options.json").read_text()
    recorded = json.loads(before)  # as a run from before schedules were counted in training steps records it
    del recorded["training"]["schedule_units"]
    (run / "training_options.json").write_text(json.dumps(recorded))
    old = build_options({("training", "steps"): 8}, run, resume=True, world_size=1)
    assert (old.training.schedule_units, old.training.steps) == ("updates", 8), "it resumes as it trained"
    (run / "training_options.json").write_text(before)
    common = ["--store", str(store), "--out", str(tmp_path / "new"), "--preset", "tiny", "--steps", "8"]
    short = json.loads(config.read_text())
    short["scheduler"]["params"]["total_num_steps"] = 4
    config.write_text(json.dumps(short))
    _refused(capsys, [*common, "--deepspeed-config", str(config)], "scheduler.params.total_num_steps 4")
    short["scheduler"]["params"].update(total_num_steps=8, warmup_num_steps=10)
    config.write_text(json.dumps(short))
    _refused(capsys, [*common, "--deepspeed-config", str(config)], "warmup_num_steps 10 is past the schedule's end")
    short["scheduler"]["params"] = {"warmup_num_step": 2}
    config.write_text(json.dumps(short))
    _refused(capsys, [*common, "--deepspeed-config", str(config)],
             "unknown field 'scheduler.params.warmup_num_step' (did you mean 'warmup_num_steps'?)")
    short["scheduler"]["type"] = "OneCycle"
    config.write_text(json.dumps(short))
    _refused(capsys, [*common, "--deepspeed-config", str(config)], "field 'scheduler.type' must be one of")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
        store_factory, tmp_path: Path) -> None:
    """The NaN comes in at step 3, between two reads of the figures (--log-every 4): the read that the
    checkpoint at step 4 forces finds it, names step 3, and saves nothing after step 2."""
    import zarr

    store = store_factory(subjects=4, slices=12, seed=5)
    poisoned = tmp_path / "poisoned.zarr"
    shutil.copytree(store, poisoned)
    plan = SliceStream(str(poisoned), batch_size=4, image_size=64, seed=0)
    order = plan.rank_share(0).ravel()  # one rank: epoch 0 feeds steps 1-2 and part of 3 (5 batches/step)
    sample = int(order[11 * 4])  # first sample of the 12th micro-batch: step 3's second critic batch
    image = zarr.open_group(str(poisoned), mode="r+")["image"]
    image[sample, 0, 100, 100] = np.nan
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "brats_gan.train", "--store", str(poisoned), "--out", str(run),
                           "--preset", "tiny", "--recipe", "poster", "--steps", "6", "--checkpoint-every", "2",
                           "--log-every", "4", "--no-verify-store"],  # else the NaN is refused before step 1 (test_verify.py)
                          check=False, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # 2 threads stall when other jobs share the cores
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "non-finite loss at step 3" in proc.stderr and "still names step 2" in proc.stderr
    assert read_latest(run) == 2
    assert metric_steps(run) == [1, 2], "the good steps' rows are kept, none after them"
    states = model_states(run, 2)
    assert all(torch.isfinite(t).all() for t in states["generator"]["module"].values())
