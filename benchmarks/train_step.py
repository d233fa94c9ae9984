"""Seconds per WGAN-GP iteration: the trainer's DeepSpeed engines against a plain PyTorch loop.

One iteration is what ``Trainer.train_step`` does: ``n_critic`` (5) critic steps, each with the
gradient penalty's double backward, then one generator step, then the metric readout (one
all-reduce of the step's figures, and a copy to the host, which also synchronises the device).

Both sides run the same phases, ``brats_gan.loss.WGANLoss`` (WGAN-GP, no DiffAugment), so the
ratio measures the engines and nothing else. Contender: the phases on two DeepSpeed engines built by
``brats_gan.train.build_engine`` from the preset's ``DEFAULT_DEEPSPEED`` recipe; for ``--dtype bf16``
plus what ``deepspeed_configs/paper_bf16.json`` adds (``bf16.enabled``, ``data_types.buffer_dtype``
bf16, ZeRO stage 1 with fp32 ``grad_accum_dtype``: DeepSpeed's bf16 optimizer); for ``--dtype bf16-autocast``
what ``deepspeed_configs/paper_bf16_autocast.json`` adds (``torch_autocast``: fp32 weights and Adam, each
phase's forwards under ``torch.autocast`` in bf16, as the baseline's). Baseline: the phases on
the plain modules, each loss's backward and ``torch.optim.Adam`` with the recipe's hyper-parameters and
implementation (lr 2e-4, betas (0.5, 0.999), eps 1e-8, L2 weight decay 1e-3, ``fused``); for bf16
the modules are cast to bf16 and Adam steps fp32 master copies, as DeepSpeed's bf16 optimizer does.

Both sides start from the same weights (same seed) and read the same micro-batches, pre-loaded in
device memory (random in [-1, 1], or the first ones of ``--store``). Warm-up starts with one critic
step and one iteration of each side from the same RNG state and reports the largest difference of
their losses: 0.0 in fp32 (the baseline computes exactly what the trainer computes, bit for bit);
in bf16 the first critic step agrees and later ones drift at bf16 rounding level (DeepSpeed's fp32
master copies are not bit-equal to the baseline's). Then the iterations alternate
(ABBA), so both see the same background load; medians of ``--steps`` timed iterations after
``--warmup``, and the fastest of each side, since on a shared machine the median can be mostly
other jobs' load. Target: deepspeed / torch <= 1.10.

Images/s counts real images, as the trainer's metrics do: micro-batch x n_critic per iteration.
FLOP per image is counted, not estimated: one iteration of the baseline's phases on the meta device
under a dispatch mode that applies torch's FLOP formulas (convolutions, their backward and double
backward, matrix products) divided by the images of the iteration. MFU = images/s x FLOP per image /
peak: the peak comes from ``--peak-tflops`` or, on CUDA, from a table keyed by device name (dense
bf16; fp32 with TF32 off, which this script enforces for fp32 unless ``--tf32``). On CUDA the
default is both dtypes, fp32 then bf16.

``--compile`` runs both sides' critic steps as the functional step of ``brats_gan.compiled_critic`` (the
trainer's ``--compile``), ``torch.compile``'d; ``--compile eager`` runs that functional step without compiling
(torch's ``TORCHDYNAMO_DISABLE``). The first critic step of each side then includes its compile, reported as
``compile_s``; the timed iterations come after it. Compiled, instance noise is drawn by inductor's generator.

Runs as one process: ``distributed.init_distributed`` makes it rank 0 of 1 (gloo on CPU, NCCL on CUDA) and
sets the CPU threads to this process's cores unless OMP_NUM_THREADS is set; ``--threads`` overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from brats_gan.data import Position, to_model
from brats_gan.distributed import DistEnv, init_distributed, shutdown_distributed
from brats_gan.loss import WGANLoss
from brats_gan.models import PRESETS, FlopCount, build_models, get_config
from brats_gan.recipes import model_config
from brats_gan.train import build_engine, engine_loss
from brats_gan.train_config import TrainingConfig, autocast_dtype, load_deepspeed_config

# the weights' dtype; bf16-autocast's forwards run in bf16 under torch.autocast (its config's torch_autocast)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}
# Dense peak TFLOP/s per GPU: (bf16, tf32, fp32 with TF32 off); the first key contained in the
# device name wins, so the specific names come first.
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H100": (989.0, 494.0, 67.0),
    "H200": (989.0, 494.0, 67.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 183.0, 91.6),
}
Batches = Iterator[tuple[Position, torch.Tensor]]


# ------------------------------------------------------------------------------------ the two sides


class DeepSpeedSide:
    """What ``Trainer.train_step`` runs: the phases (``brats_gan.loss.WGANLoss``) on two engines built by
    ``brats_gan.train.build_engine`` from the recipe, and the step's all-reduce of its figures. Loss and
    augmentation as the baseline: WGAN-GP, no DiffAugment (as the tiny presets' recipe; `paper`'s augments)."""

    def __init__(self, preset: str, config: dict[str, Any], device: str, n_critic: int, batch_size: int,
                 seed: int, compile: bool = False) -> None:
        self.training = TrainingConfig(preset=preset, n_critic=n_critic, seed=seed, augment=(), deepspeed=config,
                                       compile=compile)
        torch.manual_seed(seed)
        generator, critic = build_models(self.training.model)
        run_dir = Path(tempfile.gettempdir())
        self.generator = build_engine(generator, "generator", config, run_dir)
        self.critic = build_engine(critic, "critic", config, run_dir)
        self.phases = engine_loss(self.generator, self.critic, self.training, device)
        self.n_critic, self.batch_size = n_critic, batch_size

    def train_step(self, batches: Batches) -> list[float]:
        figures, _ = self.phases.iteration(batches, self.n_critic, self.batch_size)
        values = torch.cat([figures, figures.new_zeros(1)])  # the trainer's stop flag rides along
        dist.all_reduce(values)
        return values[:4].tolist()


class TorchLoop:
    """The same phases (``WGANLoss``: WGAN-GP, no DiffAugment) on plain modules and ``torch.optim.Adam``, with
    the networks the DeepSpeed side trains (the preset's, with its recipe's model fields)."""

    def __init__(self, preset: str, adam: dict[str, Any], device: str, dtype: torch.dtype, n_critic: int,
                 gp_lambda: float, batch_size: int, seed: int, compile: bool = False,
                 autocast: torch.dtype | None = None) -> None:
        self.config = model_config(preset)
        self.dtype = dtype
        self.n_critic, self.batch_size = n_critic, batch_size
        torch.manual_seed(seed)
        generator, critic = build_models(self.config)
        self.generator = generator.to(device, dtype)
        self.critic = critic.to(device, dtype)
        g_master, g_opt = self._optimizer(self.generator, adam)
        c_master, c_opt = self._optimizer(self.critic, adam)
        self.optimizers = {"generator": g_opt, "critic": c_opt}
        self.phases = WGANLoss(
            critic=self.critic, critic_module=self.critic, generator=self.generator, generator_module=self.generator,
            update_critic=lambda loss: self._update(loss, self.critic, c_master, c_opt),
            update_generator=lambda loss: self._update(loss, self.generator, g_master, g_opt),
            latent_dim=self.config.latent_dim, channels=self.config.channels, device=device, dtype=dtype,
            gp_lambda=gp_lambda, functional="compiled" if compile else "off", autocast=autocast)

    def _optimizer(self, module: torch.nn.Module, adam: dict[str, Any]) -> tuple[list[torch.Tensor], torch.optim.Adam]:
        params = list(module.parameters())
        if self.dtype != torch.float32:
            params = [p.detach().float().clone().requires_grad_(True) for p in params]
        kwargs = {k: adam[k] for k in ("lr", "betas", "eps", "weight_decay", "foreach", "fused") if k in adam}
        return params, torch.optim.Adam(params, **kwargs)

    def _update(self, loss: torch.Tensor, module: torch.nn.Module, master: list[torch.Tensor],
                opt: torch.optim.Adam) -> None:
        loss.backward()
        params = list(module.parameters())
        mixed = self.dtype != torch.float32
        if mixed:
            for m, p in zip(master, params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mixed:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)

    def train_step(self, batches: Batches) -> list[float]:
        figures, _ = self.phases.iteration(batches, self.n_critic, self.batch_size)
        values = torch.cat([figures, figures.new_zeros(1)])
        dist.all_reduce(values)
        return values[:4].tolist()


# ------------------------------------------------------------------------------------ FLOPs and peaks


def flop_per_image(preset: str, adam: dict[str, Any], n_critic: int, gp_lambda: float, batch_size: int) -> float:
    """FLOP of one iteration of the baseline's phases (meta device: nothing is computed) per real image."""
    unfused = {k: v for k, v in adam.items() if k != "fused"}  # torch's fused Adam has no meta kernel
    loop = TorchLoop(preset, unfused, "meta", torch.float32, n_critic, gp_lambda, batch_size, seed=0)
    size = loop.config.image_size
    with FlopCount() as count:
        for _ in range(n_critic):
            loop.phases.critic_step(torch.zeros(batch_size, loop.config.channels, size, size, device="meta"))
        loop.phases.generator_step(batch_size)
    return count.total / (batch_size * n_critic)


def peak_tflops(device: str, dtype: str, tf32: bool, override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "unknown (CPU; pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32_peak, fp32) in PEAK_TFLOPS.items():
        if key in name:
            low = dtype.startswith("bf16")
            peak = bf16 if low else tf32_peak if tf32 else fp32
            return peak, f"{name}: {key} dense {'bf16' if low else 'tf32' if tf32 else 'fp32'}"
    return None, f"unknown ({name} not in the table; pass --peak-tflops)"


def set_fp32_precision(tf32: bool) -> None:
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


# ------------------------------------------------------------------------------------ measuring


def make_batches(args: argparse.Namespace, image_size: int, channels: int, device: str, count: int) -> list[torch.Tensor]:
    """``count`` micro-batches in device memory: random in [-1, 1], or the first ones ``--store`` delivers."""
    if args.store is None:
        g = torch.Generator().manual_seed(args.seed)
        return [(torch.rand(args.batch_size, channels, image_size, image_size, generator=g) * 2 - 1).to(device)
                for _ in range(count)]
    from itertools import islice

    from brats_gan.data import SliceStream, iterate_batches

    stream = SliceStream(args.store, batch_size=args.batch_size, image_size=image_size, cache="memory")
    return [to_model(b, device, b.dtype, channels) for _, b in islice(iterate_batches(stream), count)]


def cycle(batches: list[torch.Tensor]) -> Batches:
    i = 0
    while True:
        yield Position(0, i), batches[i % len(batches)]
        i += 1


def time_interleaved(sides: dict[str, Callable[[], Any]], warmup: int, steps: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each side; calls alternate A B B A ... so both see the same load."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            start = time.perf_counter()
            sides[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def deepspeed_config(preset: str, dtype_name: str, batch_size: int, world_size: int = 1,
                     recipe: str | None = None) -> dict[str, Any]:
    """The preset's recipe (or ``recipe``) at ``batch_size``; for bf16 what ``deepspeed_configs/paper_bf16.json``
    adds. ``end_to_end.py`` trains with the same config, so that the two figures compare like with like."""
    config = load_deepspeed_config(None, preset, world_size=world_size, recipe=recipe)
    config["train_micro_batch_size_per_gpu"] = batch_size
    if dtype_name == "bf16":
        config.update(bf16={"enabled": True}, zero_optimization={"stage": 1},
                      data_types={"buffer_dtype": "bf16", "grad_accum_dtype": "fp32"})
    elif dtype_name == "bf16-autocast":
        config.update(torch_autocast={"enabled": True, "dtype": "bf16"})
    return config


def measure(args: argparse.Namespace, dtype_name: str, device: str) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    config = deepspeed_config(args.preset, dtype_name, args.batch_size)
    adam = config["optimizer"]["params"]
    model = get_config(args.preset)

    compile = args.compile is not None
    ds = DeepSpeedSide(args.preset, config, device, args.n_critic, args.batch_size, args.seed, compile)
    gp_lambda = ds.training.gp_lambda
    loop = TorchLoop(args.preset, adam, device, dtype, args.n_critic, gp_lambda, args.batch_size, args.seed, compile,
                     autocast=autocast_dtype(config))
    data = make_batches(args, model.image_size, model.channels, device, 2 * args.n_critic)
    ds_batches, torch_batches = cycle(data), cycle(data)
    compile_s = {}
    torch.manual_seed(args.seed + 1)
    start = time.perf_counter()
    ds_critic = ds.phases.critic_step(data[0])
    compile_s["deepspeed"] = time.perf_counter() - start
    torch.manual_seed(args.seed + 1)
    start = time.perf_counter()
    torch_critic = loop.phases.critic_step(data[0])
    compile_s["torch"] = time.perf_counter() - start
    step_difference = max(abs(a.item() - b.item()) for a, b in zip(ds_critic, torch_critic))
    torch.manual_seed(args.seed + 2)
    ds_values = ds.train_step(ds_batches)
    torch.manual_seed(args.seed + 2)
    values = loop.train_step(torch_batches)
    iteration_difference = max(abs(a - b) for a, b in zip(ds_values, values))
    times = time_interleaved({"deepspeed": lambda: ds.train_step(ds_batches),
                              "torch": lambda: loop.train_step(torch_batches)},
                             args.warmup - 1, args.steps, device)

    images = args.batch_size * args.n_critic
    ds_s, torch_s = statistics.median(times["deepspeed"]), statistics.median(times["torch"])
    flop = flop_per_image(args.preset, adam, args.n_critic, gp_lambda, args.batch_size)
    peak, peak_source = peak_tflops(device, dtype_name, args.tf32, args.peak_tflops)
    result: dict[str, Any] = {
        "dtype": dtype_name,
        "deepspeed_optimizer": type(ds.critic.optimizer).__name__,
        "critic_step": {None: "autograd", "eager": "functional, eager"}.get(args.compile, "functional, compiled"),
        "first_critic_step_s": {side: round(s, 2) for side, s in compile_s.items()},
        "first_critic_step_max_loss_difference": step_difference,
        "next_iteration_max_loss_difference": iteration_difference,
        "deepspeed_step_s": round(ds_s, 5),
        "torch_step_s": round(torch_s, 5),
        "ratio": round(ds_s / torch_s, 3),
        "deepspeed_best_s": round(min(times["deepspeed"]), 5),
        "torch_best_s": round(min(times["torch"]), 5),
        "ratio_best": round(min(times["deepspeed"]) / min(times["torch"]), 3),
        "deepspeed_images_per_s": round(images / ds_s, 2),
        "torch_images_per_s": round(images / torch_s, 2),
        "gflop_per_image": round(flop / 1e9, 3),
        "deepspeed_tflops": round(images / ds_s * flop / 1e12, 4),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "deepspeed_mfu": round(images / ds_s * flop / (peak * 1e12), 4) if peak else None,
        "torch_mfu": round(images / torch_s * flop / (peak * 1e12), 4) if peak else None,
        "deepspeed_times_s": [round(t, 5) for t in times["deepspeed"]],
        "torch_times_s": [round(t, 5) for t in times["torch"]],
    }
    return result


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """DeepSpeed logs and prints to file descriptor 1; with ``--json`` only the JSON line goes there."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    device = init_distributed(env)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.compile == "eager":
        torch._dynamo.config.disable = True  # what TORCHDYNAMO_DISABLE=1 sets: compiled functions run as written
    cuda = device.startswith("cuda")
    if cuda:
        set_fp32_precision(args.tf32)
    slow = args.preset.startswith("paper") and not cuda
    args.steps = args.steps if args.steps is not None else 4 if slow else 30
    args.warmup = max(1, args.warmup if args.warmup is not None else 1 if slow else 5)
    if args.batch_size is None:
        args.batch_size = int(load_deepspeed_config(None, args.preset, 1)["train_micro_batch_size_per_gpu"])
    dtypes = args.dtype or (["fp32", "bf16"] if cuda else ["fp32"])

    load_start = os.getloadavg()
    results = []
    for dtype in dtypes:
        results.append(measure(args, dtype, device))
        if cuda:
            torch.cuda.empty_cache()
    summary = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)),
        "batch_size": args.batch_size,
        "n_critic": args.n_critic,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": args.store or "random",
        "compile": args.compile,
        "torch": torch.__version__,
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    shutdown_distributed(env)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model preset")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="one or more (default: fp32 on CPU, fp32 and bf16 on CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed iterations per side (default: 30; paper preset on CPU: 4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed iterations per side first, at least 1 (default: 5; paper preset on CPU: 1), "
                             "after the untimed critic step of the equality check")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch (default: the preset's DeepSpeed recipe: 8 paper, 4 tiny)")
    parser.add_argument("--n-critic", type=int, default=5, help="critic steps per iteration")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (default: init_distributed's: this process's cores)")
    parser.add_argument("--store", help="take the micro-batches from this slice store instead of random data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (overrides the table)")
    parser.add_argument("--tf32", action="store_true", help="CUDA fp32: allow TF32 (peak: the TF32 column)")
    parser.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "eager"], default=None,
                        help="both sides' critic steps as the functional step (the trainer's --compile), "
                             "torch.compile'd (inductor) or not (eager)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    with stdout_to_stderr(args.json):
        summary = run(args)
    results = summary["results"]
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.preset}: micro-batch {args.batch_size}, n_critic {args.n_critic}, {summary['device']}, "
          f"{summary['threads']} thread(s), {args.steps} timed + {args.warmup} warm-up iterations per side, "
          f"load average {summary['load_avg_start'][0]:.2f} -> {summary['load_avg_end'][0]:.2f}")
    for r in results:
        print(f"[{r['dtype']}] critic step: {r['critic_step']}; the first one (with its compile) took "
              f"{r['first_critic_step_s']['deepspeed']:.2f} s (deepspeed), {r['first_critic_step_s']['torch']:.2f} s "
              "(torch)")
        print(f"[{r['dtype']}] deepspeed ({r['deepspeed_optimizer']}): {r['deepspeed_step_s']:.4f} s/iteration "
              f"({r['deepspeed_images_per_s']:.1f} images/s)")
        print(f"[{r['dtype']}] torch                : {r['torch_step_s']:.4f} s/iteration "
              f"({r['torch_images_per_s']:.1f} images/s)")
        mfu = f", MFU {r['deepspeed_mfu']:.1%} (peak {r['peak_tflops']} TFLOP/s)" if r["deepspeed_mfu"] else ""
        print(f"[{r['dtype']}] from the same weights and RNG state, losses differ by at most "
              f"{r['first_critic_step_max_loss_difference']:.3g} (first critic step), "
              f"{r['next_iteration_max_loss_difference']:.3g} (next iteration)")
        print(f"[{r['dtype']}] ratio deepspeed/torch: {r['ratio']:.3f}  (target <= 1.10; of the fastest iterations: "
              f"{r['ratio_best']:.3f}); "
              f"{r['gflop_per_image']} GFLOP per image, {r['deepspeed_tflops']:.3f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
