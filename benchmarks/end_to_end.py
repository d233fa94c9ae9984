"""The whole job as a user runs it, time-boxed, with one JSON line at the end.

1. Data: brain phantoms in the BraTS 2020 layout (or ``--data BRATS_DIR``), preprocessed by
   ``brats-gan preprocess`` into a training store (``--train-subjects``) and a held-out store
   (``--heldout-subjects``: subjects the generator never sees).
2. Training: ``deepspeed --num_gpus R --module brats_gan.train`` (the real launcher, on a GPU or on
   CPU slots), for ``--seconds`` after its first step, then stopped the way a scheduler stops a job:
   SIGTERM to the whole process group, SIGKILL after ``--grace`` seconds if it is still there.
3. ``brats-gan generate`` from the ``best`` and the ``latest`` checkpoint (grids written), and
   ``brats-gan evaluate`` of each against the held-out store, with the training store for memorisation.
4. Baseline, in the same run after training: ``benchmarks/train_step.py`` for the same preset, dtype
   and micro-batch (its DeepSpeed side: the trainer's own phases on random data in device memory,
   no DiffAugment).

Throughput, from the run's ``metrics.csv``: ``step_images_per_s`` is the median of the per-step
figure (the critic's real images over the step's own time: loader waits, DiffAugment and the metric
readout included, checkpoints not), ``end_to_end_images_per_s`` the real images of every step after
the first over the wall time between their rows (checkpoints, the SWD and sample grids included).
Each over ``train_step_images_per_s`` is the share of the bare step that the whole trainer keeps.

Defaults: on a CPU the ``tiny`` presets in fp32, on a GPU the ``paper`` presets in bf16, each at its
recipe's micro-batch (``--micro-batch`` changes it). Progress goes to stderr, the JSON line to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEP = REPO / "benchmarks" / "train_step.py"
CPU_PRESETS, GPU_PRESETS = ("tiny", "tiny-resize"), ("paper", "paper-resize")
QUALITY = ("swd", "swd_floor", "checkerboard", "checkerboard_real", "ms_ssim_fake", "ms_ssim_real",
           "memorisation_share")


class BenchmarkError(RuntimeError):
    """A stage failed; the message names it and carries the end of its output."""


def say(message: str) -> None:
    print(f"[end_to_end] {message}", file=sys.stderr, flush=True)


def brats_gan(*args: Any, timeout: float = 3600) -> subprocess.CompletedProcess:
    """``brats-gan ARGS`` with this interpreter; a failure raises with the command's own words."""
    command = [sys.executable, "-m", "brats_gan", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"brats-gan {args[0]} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def deepspeed_launcher() -> list[str]:
    exe = shutil.which("deepspeed")
    return [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]


# ------------------------------------------------------------------------------------ stages


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, float]]:
    """The training and held-out stores (written once, shared by every preset)."""
    data = Path(args.data) if args.data else work / "MICCAI_BraTS2020_TrainingData"
    if not args.data:
        from brats_gan.phantoms import write_phantom_dataset

        count = args.phantoms
        say(f"writing {count} phantom subjects to {data}")
        write_phantom_dataset(data, n_subjects=count, layout="2020", shape=tuple(args.phantom_shape),
                              seed=args.seed, modalities=("flair",), with_seg=False)
    seconds = {}
    stores = {}
    for name, subjects in (("train", args.train_subjects), ("heldout", args.heldout_subjects)):
        store = work / f"{name}.zarr"
        say(f"preprocessing subjects {subjects} into {store}")
        start = time.perf_counter()
        brats_gan("preprocess", data, "--out", store, "--subjects", subjects, "--slices", args.slices,
                  "--size", args.size, "--no-progress", "--dashboard-port", 0,
                  *(["--workers", args.workers] if args.workers else []))
        seconds[name] = round(time.perf_counter() - start, 2)
        stores[name] = store
    return stores["train"], stores["heldout"], seconds


def read_metrics(run: Path) -> list[dict[str, str]]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sweep_shm(port: int) -> int:
    """Unlink DeepSpeed's CPU all-reduce buffers of this run's master port (a SIGKILLed rank cannot)."""
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def train(args: argparse.Namespace, preset: str, store: Path, work: Path) -> dict[str, Any]:
    """Launch the trainer, let it train for ``--seconds`` after its first step, stop it as a scheduler does."""
    sys.path.insert(0, str(TRAIN_STEP.parent))
    from train_step import deepspeed_config

    from brats_gan.distributed import free_port

    run = work / f"run-{preset}"
    config_path = work / f"deepspeed-{preset}-{args.dtype}-{args.micro_batch[preset]}.json"
    config_path.write_text(json.dumps(deepspeed_config(preset, args.dtype, args.micro_batch[preset], args.ranks)))
    port = free_port()
    command = [*deepspeed_launcher(), "--num_gpus", str(args.ranks), "--master_port", str(port),
               "--module", "brats_gan.train", "--store", str(store), "--out", str(run), "--preset", preset,
               "--steps", str(10**9), "--checkpoint-every", str(args.checkpoint_every), "--seed", str(args.seed),
               "--deepspeed-config", str(config_path), *args.train_args]
    log_path = work / f"train-{preset}.log"
    say(f"training {preset} ({args.dtype}, micro-batch {args.micro_batch[preset]}, {args.ranks} rank(s)) "
        f"for {args.seconds} s after its first step; log {log_path}")
    launched = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            first_step = None
            while proc.poll() is None:
                if first_step is None and read_metrics(run):
                    first_step = time.monotonic()
                elapsed = time.monotonic() - (first_step or launched)
                if (first_step and elapsed >= args.seconds) or (not first_step and elapsed >= args.startup_timeout):
                    break
                time.sleep(0.2)
            if proc.poll() is not None:
                raise BenchmarkError(f"training exited {proc.returncode} before it was stopped:\n"
                                     f"{log_path.read_text()[-3000:]}")
            if first_step is None:
                raise BenchmarkError(f"no training step within --startup-timeout {args.startup_timeout} s:\n"
                                     f"{log_path.read_text()[-3000:]}")
            stopped = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=args.grace)
                stop = "SIGTERM"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                stop = "SIGKILL"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            swept = sweep_shm(port)
    rows = read_metrics(run)
    images = [float(r["images_per_s"]) for r in rows]
    n_critic = int(json.loads((run / "training_options.json").read_text())["training"]["n_critic"])
    per_step = args.micro_batch[preset] * args.ranks * n_critic
    span = float(rows[-1]["time"]) - float(rows[0]["time"]) if len(rows) > 1 else 0.0
    return {
        "run": str(run),
        "startup_s": round(first_step - launched, 2),
        "steps": int(rows[-1]["step"]) if rows else 0,
        "stopped_by": stop,
        "stop_s": round(time.monotonic() - stopped, 2),
        "exit_status": proc.returncode,
        "n_critic": n_critic,
        "shm_buffers_swept": swept,
        "step_images_per_s": round(statistics.median(images), 2) if images else None,
        "end_to_end_images_per_s": round(per_step * (len(rows) - 1) / span, 2) if span > 0 else None,
        "swd_by_step": [[int(r["step"]), round(float(r["swd"]), 2)] for r in rows if r.get("swd")],
    }


def baseline(args: argparse.Namespace, preset: str, n_critic: int) -> dict[str, Any]:
    """``train_step.py`` for the same preset, dtype, micro-batch and critic steps as the run, its JSON line."""
    say(f"baseline: benchmarks/train_step.py --preset {preset} --dtype {args.dtype}")
    command = [sys.executable, str(TRAIN_STEP), "--preset", preset, "--dtype", args.dtype,
               "--batch-size", str(args.micro_batch[preset]), "--n-critic", str(n_critic), "--json",
               "--seed", str(args.seed),
               *(["--steps", str(args.baseline_steps)] if args.baseline_steps else [])]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise BenchmarkError(f"train_step.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]
    return {"train_step_images_per_s": result["deepspeed_images_per_s"],
            "train_step_torch_images_per_s": result["torch_images_per_s"],
            "train_step_deepspeed_optimizer": result["deepspeed_optimizer"]}


def judge(args: argparse.Namespace, preset: str, run: Path, train_store: Path, heldout: Path,
          work: Path) -> dict[str, Any]:
    """Generate from ``best`` and ``latest`` (with grids) and evaluate each against the held-out store."""
    from brats_gan.checkpoints import BEST, LATEST, read_latest

    out: dict[str, Any] = {}
    for which, pointer in (("best", BEST), ("latest", LATEST)):
        step = read_latest(run, pointer)
        if step is None:
            raise BenchmarkError(f"{run} has no {which} checkpoint after {args.seconds} s; raise --seconds or "
                                 "lower --checkpoint-every")
        store, grid = work / f"synthetic-{preset}-{which}.zarr", work / f"synthetic-{preset}-{which}.png"
        say(f"generating {args.num} slices from {which} (step {step}) and evaluating them")
        start = time.perf_counter()
        brats_gan("generate", "--checkpoint", run, "--which", which, "--num", args.num, "--out", store,
                  "--grid", grid, "--seed", args.seed)
        generated = time.perf_counter() - start
        figures = json.loads(brats_gan("evaluate", "--real", heldout, "--fake", store, "--train", train_store,
                                       "--json", "--seed", args.seed).stdout)
        entry = {"step": step, "generate_s": round(generated, 2), "grid": str(grid),
                 **{key: None if figures.get(key) is None else round(figures[key], 4) for key in QUALITY}}
        if entry["swd"] is not None and entry["swd_floor"]:
            entry["swd_over_floor"] = round(entry["swd"] / entry["swd_floor"], 3)
        out[which] = entry
    return out


def run_preset(args: argparse.Namespace, preset: str, train_store: Path, heldout: Path, work: Path) -> dict[str, Any]:
    training = train(args, preset, train_store, work)
    base = baseline(args, preset, training["n_critic"])
    for key in ("step", "end_to_end"):
        figure = training[f"{key}_images_per_s"]
        training[f"{key}_share_of_train_step"] = (round(figure / base["train_step_images_per_s"], 3)
                                                   if figure else None)
    return {"preset": preset, "micro_batch": args.micro_batch[preset], "training": {**training, **base},
            "samples": sorted(str(p) for p in (Path(training["run"]) / "samples").glob("*.png"))[-2:],
            "checkpoints": judge(args, preset, Path(training["run"]), train_store, heldout, work)}


# ------------------------------------------------------------------------------------ the command


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", metavar="BRATS_DIR", help="a BraTS folder instead of phantoms")
    p.add_argument("--phantoms", type=int, default=12, help="phantom subjects to write (without --data)")
    p.add_argument("--phantom-shape", type=int, nargs=3, default=(240, 240, 155), metavar=("X", "Y", "Z"))
    p.add_argument("--train-subjects", default="1-8", help="subjects of the training store (preprocess --subjects)")
    p.add_argument("--heldout-subjects", default="9-12", help="subjects of the held-out store, never trained on")
    p.add_argument("--slices", type=int, default=48, help="axial slices per subject")
    p.add_argument("--size", type=int, default=256, help="stored slice size (the loader downsamples for tiny)")
    p.add_argument("--workers", type=int, default=None, help="Dask workers for preprocessing (default: one per core)")
    p.add_argument("--preset", nargs="+", default=None,
                   help=f"presets to train one after the other (default: {' '.join(CPU_PRESETS)} on a CPU, "
                        f"{' '.join(GPU_PRESETS)} on a GPU)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on a CPU, bf16 on a GPU")
    p.add_argument("--micro-batch", type=int, default=None, help="per rank (default: each preset's recipe)")
    p.add_argument("--ranks", type=int, default=1, help="launcher ranks (GPUs, or CPU slots)")
    p.add_argument("--seconds", type=float, default=60.0, help="training time per preset after its first step")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the first step")
    p.add_argument("--checkpoint-every", type=int, default=50, help="training --checkpoint-every")
    p.add_argument("--num", type=int, default=256, help="synthetic slices per checkpoint")
    p.add_argument("--baseline-steps", type=int, default=None, help="timed iterations of train_step.py (its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", metavar="DIR", help="keep stores, runs, grids and logs here (default: a temporary "
                                                 "folder, kept and named at the end)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="everything after it goes to brats_gan.train (e.g. --train-args --augment none)")
    args = p.parse_args(argv)
    for name in ("phantoms", "slices", "size", "ranks", "checkpoint_every", "num"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0 or args.grace < 0:
        p.error("--seconds must be > 0 and --grace >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    from brats_gan.models import PRESETS
    from brats_gan.train_config import load_deepspeed_config

    cuda = torch.cuda.is_available()
    args.preset = args.preset or list(GPU_PRESETS if cuda else CPU_PRESETS)
    unknown = [p for p in args.preset if p not in PRESETS]
    if unknown:
        print(f"end_to_end.py: error: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(sorted(PRESETS))}",
              file=sys.stderr)
        return 2
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.micro_batch = {p: args.micro_batch or int(load_deepspeed_config(None, p, 1)["train_micro_batch_size_per_gpu"])
                        for p in args.preset}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="brats-gan-end-to-end-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        train_store, heldout, preprocess_s = prepare_data(args, work)
        results = [run_preset(args, preset, train_store, heldout, work) for preset in args.preset]
    except BenchmarkError as err:
        print(f"end_to_end.py: error: {err}", file=sys.stderr)
        return 1
    summary = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "ranks": args.ranks,
        "seconds": args.seconds,
        "data": args.data or f"{args.phantoms} phantoms {'x'.join(map(str, args.phantom_shape))}",
        "train_subjects": args.train_subjects,
        "heldout_subjects": args.heldout_subjects,
        "preprocess_s": preprocess_s,
        "presets": results,
        "work": str(work),
        "total_s": round(time.perf_counter() - started, 1),
    }
    say(f"done in {summary['total_s']} s; stores, runs, grids and logs in {work}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
