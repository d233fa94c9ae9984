"""Train the WGAN of the poster with two DeepSpeed data-parallel engines, streaming from the slice store.

On every rank, under the DeepSpeed launcher (one process per GPU, or per CPU slot with gloo)::

    deepspeed --num_gpus N --module brats_gan.train --store S.zarr --out RUN --preset paper \\
        --steps N --checkpoint-every K [--resume] [--deepspeed-config F] [--seed S]

or in one process without the launcher: ``brats-gan train ...`` / ``python -m brats_gan.train ...``.

Reading order: the three config dataclasses and their validation (everything that can be refused is
refused here, on every rank, before any rank initialises the process group or writes a file), then
:class:`Trainer` (engines, the three phases of a WGAN-GP step, checkpoints, watching), then
:func:`run`, which glues them together.

The loss (``--loss wgan-gp``, the default) is WGAN-GP (Gulrajani et al. 2017): per generator step,
``n_critic`` (5) critic steps on fresh real micro-batches, each minimising
``D(fake) - D(real) + lambda * (|grad_x D(x_hat)| - 1)^2`` with ``lambda`` = 10 and ``x_hat`` a random
interpolate of a real and a fake image; the generator minimises ``-D(G(z))``. ``--loss wgan-clip`` is
the original WGAN (Arjovsky et al. 2017, the poster's reference [4]): no penalty, critic weights
clipped to ``[-0.01, 0.01]`` after each critic step. The poster names the loss but neither variant.

A "step" is one generator update (with its ``n_critic`` critic updates); ``--steps`` counts those.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import difflib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from brats_gan import schema
from brats_gan.augment import POLICIES as AUGMENT_POLICIES
from brats_gan.augment import diff_augment, parse_policy
from brats_gan.cli import CommandError
from brats_gan.data import (
    DEFAULT_RUN_LENGTH,
    DEFAULT_WINDOW_BATCHES,
    Position,
    SliceStream,
    default_num_workers,
    iterate_batches,
)
from brats_gan.models import (
    RESIZE_MODES,
    UPSAMPLES,
    ModelConfig,
    build_models,
    get_config,
)
from brats_gan.preview import save_grid

log = logging.getLogger(__name__)

LOSSES = ("wgan-gp", "wgan-clip")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
OPTIONS_FILE = "training_options.json"
TRAINER_STATE = "trainer_state.json"
METRICS_FILE = "metrics.csv"
METRICS = ("step", "epoch", "critic_loss", "generator_loss", "wasserstein", "gradient_penalty",
           "step_s", "images_per_s", "swd", "time")
EXIT_DIVERGED = 3
SWD_MIN_IMAGES = 16

# The DeepSpeed recipes when --deepspeed-config is not given; deepspeed_configs/{paper,tiny}.json
# hold the same (a test keeps them equal), for users to copy and edit.
_ADAM = {"type": "Adam", "params": {"lr": 0.0002, "betas": [0.5, 0.999], "eps": 1e-08, "weight_decay": 0.001,
                                    "torch_adam": True, "adam_w_mode": False}}
DEFAULT_DEEPSPEED: dict[str, dict[str, Any]] = {
    "paper": {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "optimizer": _ADAM,
              "gradient_clipping": 0.0, "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False},
}
DEFAULT_DEEPSPEED["tiny"] = {**DEFAULT_DEEPSPEED["paper"], "train_micro_batch_size_per_gpu": 4}

# Top-level DeepSpeed fields this trainer accepts; anything else is a typo or a feature it does not
# drive (pipeline, MoE, ...) and is refused. Keys starting with "_" are comments.
DEEPSPEED_FIELDS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "gradient_clipping", "fp16", "bf16", "data_types", "zero_optimization", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "zero_allow_untested_optimizer", "tensorboard", "csv_monitor", "wandb",
    "comet", "flops_profiler", "comms_logger", "checkpoint", "dump_state", "disable_allgather",
})
ADAM_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "amsgrad",
                         "bias_correction"})
MONITORS = ("tensorboard", "csv_monitor")


class ConfigError(CommandError):
    """A bad option, config file, store or run folder: one line naming the field, exit status 2."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and keeps its last good checkpoint."""


# ==================================================================================== configuration


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read (see ``brats_gan.data``)."""

    store: str
    channels: tuple[str, ...] | None = None
    cache: str = "auto"
    num_workers: int | None = None  # None: data.default_num_workers(local world size)
    run_length: int = DEFAULT_RUN_LENGTH
    window_batches: int = DEFAULT_WINDOW_BATCHES


@dataclass(frozen=True)
class TrainingConfig:
    """What is trained and how; ``deepspeed`` is the resolved DeepSpeed config both engines get."""

    preset: str = "paper"
    steps: int = 10_000
    seed: int = 0
    loss: str = "wgan-gp"
    n_critic: int = 5
    gp_lambda: float = 10.0
    clip_value: float = 0.01
    augment: tuple[str, ...] = ("translation", "cutout")  # DiffAugment (brats_gan.augment); () = none
    upsample: str | None = None  # None: the preset's
    resize_mode: str | None = None  # None: the preset's
    deepspeed_config: str | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def model(self) -> ModelConfig:
        """The preset's networks, with the generator's upsampling as given on the command line."""
        given = {name: value for name in ("upsample", "resize_mode") if (value := getattr(self, name)) is not None}
        return dataclasses.replace(get_config(self.preset), **given)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run lives and how often it is saved and watched."""

    out: str
    every: int = 500
    keep: int = 2
    resume: bool = False
    sample_every: int | None = None  # None: same as ``every``; 0: never
    samples: int = 16
    swd_images: int = 256  # generated vs real images for the SWD at each checkpoint; 0: none


@dataclass(frozen=True)
class Options:
    data: DataConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig

    def to_json(self) -> dict[str, Any]:
        return {"data": dataclasses.asdict(self.data), "training": dataclasses.asdict(self.training),
                "checkpoint": dataclasses.asdict(self.checkpoint)}


# CLI flag -> (section, field); the flag names the field in every message.
FLAGS: dict[str, tuple[str, str]] = {
    "--store": ("data", "store"), "--channels": ("data", "channels"), "--cache": ("data", "cache"),
    "--num-workers": ("data", "num_workers"), "--run-length": ("data", "run_length"),
    "--window-batches": ("data", "window_batches"),
    "--preset": ("training", "preset"), "--steps": ("training", "steps"), "--seed": ("training", "seed"),
    "--loss": ("training", "loss"), "--n-critic": ("training", "n_critic"),
    "--gp-lambda": ("training", "gp_lambda"), "--clip-value": ("training", "clip_value"),
    "--augment": ("training", "augment"), "--upsample": ("training", "upsample"),
    "--resize-mode": ("training", "resize_mode"),
    "--deepspeed-config": ("training", "deepspeed_config"),
    "--out": ("checkpoint", "out"), "--checkpoint-every": ("checkpoint", "every"),
    "--keep-checkpoints": ("checkpoint", "keep"), "--sample-every": ("checkpoint", "sample_every"),
    "--samples": ("checkpoint", "samples"), "--swd-images": ("checkpoint", "swd_images"),
}
# What a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = {("training", "steps"), ("checkpoint", "every"), ("checkpoint", "keep"),
                     ("checkpoint", "sample_every"), ("checkpoint", "samples"), ("data", "num_workers"),
                     ("checkpoint", "swd_images"),
                     ("data", "store"), ("data", "cache")}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-gan train`` and ``python -m brats_gan.train``; defaults live in the dataclasses."""
    d, t, c = DataConfig(store=""), TrainingConfig(), CheckpointConfig(out="")
    run = parser.add_argument_group("run")
    run.add_argument("--store", help="complete slice store (Zarr) to train on")
    run.add_argument("--out", required=True, help="run folder; must not exist unless --resume")
    run.add_argument("--resume", action="store_true", help="continue RUN from RUN/checkpoints/latest")
    run.add_argument("--preset", help=f"model preset (default {t.preset}; see `brats-gan models`)")
    run.add_argument("--steps", type=int, help=f"generator steps to reach in total (default {t.steps})")
    run.add_argument("--seed", type=int, help=f"seed of weights, noise and data order (default {t.seed})")
    run.add_argument("--upsample", choices=UPSAMPLES,
                     help="the generator's upsampling: transposed 4x4 convolutions (the poster's grid effect) or "
                          "resize then 3x3 convolution (Odena et al. 2016) (default: the preset's)")
    run.add_argument("--resize-mode", choices=RESIZE_MODES,
                     help="interpolation of --upsample resize (default: the preset's, nearest)")
    run.add_argument("--deepspeed-config", metavar="JSON",
                     help="DeepSpeed config for both engines (default: the paper's recipe; the tiny presets "
                          "use deepspeed_configs/tiny.json's micro-batch of 4)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=LOSSES, help=f"default {t.loss}")
    loss.add_argument("--n-critic", type=int, help=f"critic steps per generator step (default {t.n_critic})")
    loss.add_argument("--gp-lambda", type=float, help=f"gradient-penalty weight (default {t.gp_lambda})")
    loss.add_argument("--clip-value", type=float, help=f"wgan-clip weight bound (default {t.clip_value})")
    loss.add_argument("--augment", metavar="POLICIES",
                      help="DiffAugment of the critic's real and fake inputs: comma-separated "
                           f"{','.join(AUGMENT_POLICIES)}, or all, or none (the poster's recipe) (default "
                           f"{','.join(t.augment)}: on 384 phantom slices it lowered the SWD by ~40%%)")
    data = parser.add_argument_group("data")
    data.add_argument("--channels", nargs="+", metavar="NAME",
                      help="one stored channel (repeated to 3) or three (default: the store's only one or three)")
    data.add_argument("--cache", choices=("auto", "memory", "stream"),
                      help=f"keep the store in memory (auto: if <= 256 MiB) (default {d.cache})")
    data.add_argument("--num-workers", type=int, help="loader processes per rank (default: cores per rank - 1, <= 4)")
    data.add_argument("--run-length", type=int, help=f"samples per contiguous read (default {d.run_length})")
    data.add_argument("--window-batches", type=int,
                      help=f"micro-batches shuffled together per window (default {d.window_batches})")
    ck = parser.add_argument_group("checkpoints and watching")
    ck.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints (default {c.every})")
    ck.add_argument("--keep-checkpoints", type=int, help=f"complete checkpoints kept (default {c.keep})")
    ck.add_argument("--sample-every", type=int, help="steps between sample grids (default: --checkpoint-every; 0: none)")
    ck.add_argument("--samples", type=int, help=f"images in the sample grid (default {c.samples})")
    ck.add_argument("--swd-images", type=int,
                    help=f"generated and real images whose SWD is measured at each checkpoint, to the CSV, "
                         f"TensorBoard and the `best` pointer (default {c.swd_images}; 0: none)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _given(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    given = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            given[key] = tuple(value) if isinstance(value, list) else value
    return given


def _flag(key: tuple[str, str]) -> str:
    return next(f for f, k in FLAGS.items() if k == key)


def _bad(key: tuple[str, str], value: Any, must: str) -> ConfigError:
    return ConfigError(f"{_flag(key)} ({key[0]}.{key[1]}) must be {must}, got {value!r}")


def validate(options: Options) -> None:
    """Check every field that DeepSpeed, the store or the loop would otherwise reject late."""
    checks: list[tuple[tuple[str, str], bool, str]] = []

    def at_least(key: tuple[str, str], value: Any, low: float, kind: type = int) -> None:
        ok = isinstance(value, kind) and not isinstance(value, bool) and value >= low
        checks.append((key, ok, f"{'an int' if kind is int else 'a number'} >= {low}"))

    d, t, c = options.data, options.training, options.checkpoint
    at_least(("data", "run_length"), d.run_length, 1)
    at_least(("data", "window_batches"), d.window_batches, 1)
    if d.num_workers is not None:
        at_least(("data", "num_workers"), d.num_workers, 0)
    at_least(("training", "steps"), t.steps, 1)
    at_least(("training", "seed"), t.seed, 0)
    at_least(("training", "n_critic"), t.n_critic, 1)
    at_least(("training", "gp_lambda"), float(t.gp_lambda), 0.0, float)
    checks.append((("training", "clip_value"), t.clip_value > 0, "> 0"))
    checks.append((("training", "loss"), t.loss in LOSSES, f"one of {', '.join(LOSSES)}"))
    at_least(("checkpoint", "every"), c.every, 1)
    at_least(("checkpoint", "keep"), c.keep, 1)
    if c.sample_every is not None:
        at_least(("checkpoint", "sample_every"), c.sample_every, 0)
    checks.append((("checkpoint", "samples"), isinstance(c.samples, int) and 1 <= c.samples <= 256, "in [1, 256]"))
    checks.append((("checkpoint", "swd_images"), isinstance(c.swd_images, int) and not isinstance(c.swd_images, bool)
                   and (c.swd_images == 0 or c.swd_images >= SWD_MIN_IMAGES), f"0 (none) or >= {SWD_MIN_IMAGES}"))
    for key, ok, must in checks:
        if not ok:
            raise _bad(key, getattr(getattr(options, key[0]), key[1]), must)

    try:
        get_config(t.preset)
    except ValueError as err:
        raise ConfigError(f"--preset (training.preset): {err}") from None
    try:
        _ = t.model  # the preset with --upsample/--resize-mode, validated by ModelConfig
    except ValueError as err:
        raise ConfigError(f"--upsample/--resize-mode (training.upsample/resize_mode): {err}") from None
    ds = t.deepspeed
    if t.loss == "wgan-clip" and (ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")):
        raise ConfigError("--loss wgan-clip clips the fp32 weights the optimizer owns only in fp32; "
                          "use a config without bf16/fp16 or --loss wgan-gp")


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_deepspeed_config(path: str | None, preset: str, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config both engines get: the file's (validated) or the preset's default recipe.

    DeepSpeed ignores unknown top-level fields and checks the rest only inside ``initialize`` (after
    the process group is up); here a typo is refused by name before any rank starts.
    """
    if path is None:
        return copy.deepcopy(DEFAULT_DEEPSPEED["tiny" if preset.startswith("tiny") else "paper"])
    where = f"--deepspeed-config {path}"
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must hold a JSON object")
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    for key in config:
        if key not in DEEPSPEED_FIELDS:
            raise ConfigError(f"{where}: unknown field {key!r}{_suggest(key, sorted(DEEPSPEED_FIELDS))}; "
                              f"fields this trainer accepts: {', '.join(sorted(DEEPSPEED_FIELDS))}")
    micro = config.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 2:
        raise ConfigError(f"{where}: field 'train_micro_batch_size_per_gpu' must be an int >= 2 (batch norm "
                          f"needs two samples), got {micro!r}")
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError(f"{where}: field 'gradient_accumulation_steps' must be 1 (each critic and generator "
                          f"step is one micro-batch), got {config['gradient_accumulation_steps']!r}")
    total = config.get("train_batch_size")
    if total is not None and total != micro * world_size:
        raise ConfigError(f"{where}: field 'train_batch_size' is {total} but micro-batch {micro} x "
                          f"{world_size} rank(s) is {micro * world_size}; drop it or make it match")
    if config.get("zero_optimization", {}).get("stage", 0) != 0:
        raise ConfigError(f"{where}: field 'zero_optimization.stage' must be 0: the networks are small "
                          "and replicated; ZeRO partitioning would only add communication")
    optimizer = config.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, dict) or "type" not in optimizer:
            raise ConfigError(f"{where}: field 'optimizer' must be an object with a 'type'")
        params = optimizer.get("params", {})
        if str(optimizer["type"]).lower() in ("adam", "adamw"):
            for key in params:
                if key not in ADAM_PARAMS:
                    raise ConfigError(f"{where}: unknown field 'optimizer.params.{key}'"
                                      f"{_suggest(key, sorted(ADAM_PARAMS))}; known: {', '.join(sorted(ADAM_PARAMS))}")
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(copy.deepcopy(probe))
    except Exception as err:  # noqa: BLE001  (pydantic and assertion errors; both name the field)
        raise ConfigError(f"{where}: {' '.join(str(err).split())}") from None
    return config


def build_options(args: argparse.Namespace, world_size: int) -> Options:
    """Options from the CLI (new run) or from ``RUN/training_options.json`` plus allowed changes (resume)."""
    given = _given(args)
    if ("training", "augment") in given:
        try:
            given[("training", "augment")] = parse_policy(given[("training", "augment")])
        except ValueError as err:
            raise ConfigError(f"--augment: {err}") from None
    if ("data", "store") in given:  # recorded absolute: generate and resumes may run from another folder
        given[("data", "store")] = str(Path(given[("data", "store")]).absolute())
    out = Path(args.out)
    given[("checkpoint", "out")] = str(out)
    given[("checkpoint", "resume")] = bool(args.resume)
    if args.resume:
        saved_path = out / OPTIONS_FILE
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {saved_path} not found; {out} is not a training run")
        try:
            saved = json.loads(saved_path.read_text())
            sections = {name: dict(saved[name]) for name in ("data", "training", "checkpoint")}
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--resume: {saved_path} is not readable training options ({err!r})") from None
        if ("training", "deepspeed_config") in given:
            fresh = load_deepspeed_config(given.pop(("training", "deepspeed_config")),
                                          sections["training"]["preset"], world_size)
            if fresh != sections["training"]["deepspeed"]:
                raise ConfigError("--resume: --deepspeed-config differs from the config the run was started "
                                  "with (saved in training_options.json); start a new run to change it")
        for key, value in given.items():
            old = sections[key[0]].get(key[1])
            old = tuple(old) if isinstance(old, list) else old
            if key not in RESUMABLE_CHANGES and key[1] not in ("out", "resume") and value != old:
                raise ConfigError(f"--resume: {_flag(key)} {value!r} differs from the run's {old!r}; "
                                  "a resumed run keeps its settings (start a new run to change them)")
            sections[key[0]][key[1]] = value
        if sections["data"].get("channels") is not None:
            sections["data"]["channels"] = tuple(sections["data"]["channels"])
        sections["training"]["augment"] = tuple(sections["training"].get("augment", ()))
    else:
        if ("data", "store") not in given:
            raise ConfigError("--store is required for a new run")
        sections = {"data": {}, "training": {}, "checkpoint": {}}
        for key, value in given.items():
            sections[key[0]][key[1]] = value
        preset = sections["training"].get("preset", TrainingConfig.preset)
        sections["training"]["deepspeed"] = load_deepspeed_config(
            sections["training"].get("deepspeed_config"), str(preset), world_size)
    try:
        options = Options(DataConfig(**sections["data"]), TrainingConfig(**sections["training"]),
                          CheckpointConfig(**sections["checkpoint"]))
    except TypeError as err:
        raise ConfigError(f"{out / OPTIONS_FILE}: {err}") from None
    validate(options)
    return options


def check_run_folder(options: Options, world_size: int) -> int | None:
    """Refuse to overwrite a run, or to resume one without a complete checkpoint; the step to resume from."""
    out = Path(options.checkpoint.out)
    if not options.checkpoint.resume:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--out {out} already exists; pass --resume to continue it, or choose a new folder "
                              "(a run is never overwritten)")
        return None
    step = read_latest(out)
    if step is None:
        raise ConfigError(f"--resume: {out / CHECKPOINTS / LATEST} names no complete checkpoint "
                          "(the run was stopped before its first one); start it again in a new folder")
    state = json.loads((out / CHECKPOINTS / str(step) / TRAINER_STATE).read_text())
    if state["world_size"] != world_size:
        raise ConfigError(f"--resume: checkpoint {step} was written by {state['world_size']} rank(s), this "
                          f"launch has {world_size}; resume with the same number of ranks so that data "
                          "order and random streams continue exactly")
    return step


def checkpoint_steps(run: str | Path, complete_only: bool = True) -> list[int]:
    """Steps of the run's checkpoint folders, ascending: the complete ones (holding ``trainer_state.json``,
    written last), or every one, half-written included, with ``complete_only=False``."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
                  and (not complete_only or (p / TRAINER_STATE).is_file()))


def read_latest(run: str | Path, pointer: str = LATEST) -> int | None:
    """The step ``RUN/checkpoints/latest`` (or ``best``) names, if that checkpoint is complete."""
    root = Path(run) / CHECKPOINTS
    try:
        step = int((root / pointer).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return step if (root / str(step) / TRAINER_STATE).is_file() else None


# ==================================================================================== distributed setup


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the launcher's environment (or a one-process default)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_environ(cls, local_rank_arg: int | None = None) -> DistEnv:
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
        local_world = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
        return cls(int(env.get("RANK", 0)), world, local, local_world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv) -> str:
    """Threads, process group and device; returns the device name.

    The DeepSpeed launcher sets no OMP_NUM_THREADS, so every CPU rank would use every core (two
    CPU ranks: ~400 ms/step instead of ~110 ms): each rank gets cores / ranks-on-this-node unless the
    user set OMP_NUM_THREADS. Without the launcher DeepSpeed would fall back to MPI discovery (and fail
    without mpi4py), so a single process describes itself as rank 0 of 1 on a free local port.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    return accelerator.device_name(env.local_rank) if accelerator.device_name() != "cpu" else "cpu"


class _RankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors, each line marked with its rank."""

    def __init__(self, env: DistEnv) -> None:
        super().__init__()
        self.env = env

    def filter(self, record: logging.LogRecord) -> bool:
        if self.env.rank != 0 and record.levelno < logging.WARNING:
            return False
        if self.env.world_size > 1 and not getattr(record, "_rank_marked", False):
            record.msg = f"[rank {self.env.rank}] {record.msg}"
            record._rank_marked = True
        return True


def configure_logging(env: DistEnv, verbose: bool) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RankFilter(env))
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


# ==================================================================================== the trainer


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients for ``module`` inside (the critic during the generator step)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": random.getstate()[0], "state": list(random.getstate()[1]),
                   "gauss": random.getstate()[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank(seed: int, rank: int) -> None:
    """Different noise, dropout and penalty interpolates on each rank, reproducibly."""
    rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed)
    random.seed(rank_seed)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, and rename: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights_only_checkpoint_engine(engine: Any) -> None:
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False`` (arbitrary pickles); its
    checkpoints of these models hold only tensors and plain containers, so load them the safe way."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return torch.load(path, map_location=map_location, weights_only=True)

    safe = WeightsOnly.__new__(WeightsOnly)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe


class Trainer:
    """Two DeepSpeed engines (generator, critic), the data stream, and the run folder.

    Phases are methods: :meth:`critic_step`, :meth:`gradient_penalty`, :meth:`generator_step`.
    DeepSpeed allows a backward through a graph built by calling an engine only inside that engine's
    own ``backward()`` ("Direct calls to tensor.backward() are not supported"). So the critic *engine*
    is called only for the scores its own backward differentiates; the penalty's ``autograd.grad`` and
    the generator's loss go through ``critic.module``, with the critic's parameters frozen for the
    generator step (else their gradients would leak into the next critic step).
    """

    def __init__(self, options: Options, env: DistEnv, device: str, stream: SliceStream,
                 resume_step: int | None) -> None:
        self.options, self.env, self.device, self.stream = options, env, device, stream
        self.t, self.c = options.training, options.checkpoint
        self.run_dir = Path(self.c.out)
        self.is_main = env.rank == 0
        self.model_config = self.t.model

        torch.manual_seed(self.t.seed)
        generator, critic = build_models(self.model_config)
        self.generator = self._engine(generator, "generator")
        self.critic = self._engine(critic, "critic")
        self.dtype = next(self.generator.module.parameters()).dtype
        self.fixed_noise = torch.randn(self.c.samples, self.model_config.latent_dim,
                                       generator=torch.Generator().manual_seed(self.t.seed))
        self.swd_images = min(self.c.swd_images, stream.n_samples)
        self.swd_noise = torch.randn(self.swd_images, self.model_config.latent_dim,
                                     generator=torch.Generator().manual_seed(self.t.seed + 1))
        self._swd_real: torch.Tensor | None = None
        self.best_swd = math.inf
        self.num_workers = (options.data.num_workers if options.data.num_workers is not None
                            else default_num_workers(env.local_world_size))

        self.step = 0
        self.position = Position()
        if resume_step is None:
            seed_rank(self.t.seed, env.rank)
            if self.is_main:
                for sub in (CHECKPOINTS, "samples"):
                    (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        else:
            self.load(resume_step)
        if self.is_main:
            saved = {**options.to_json(), "model": dataclasses.asdict(self.model_config),
                     "world_size": env.world_size, "versions": _versions(),
                     "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            _atomic_write_text(self.run_dir / OPTIONS_FILE, json.dumps(saved, indent=2) + "\n")
        self._barrier()
        self.metrics = MetricsLog(self.run_dir, self.step) if self.is_main else None

    def _engine(self, module: Any, name: str) -> Any:
        import deepspeed

        config = copy.deepcopy(self.t.deepspeed)
        for monitor in MONITORS:
            if config.get(monitor, {}).get("enabled"):
                config[monitor]["job_name"] = f"{config[monitor].get('job_name', 'brats_gan')}_{name}"
                config[monitor].setdefault("output_path", str(self.run_dir / "deepspeed_monitor"))
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
        _weights_only_checkpoint_engine(engine)
        return engine

    def _barrier(self) -> None:
        dist.barrier()

    # ---------------------------------------------------------------- the phases of one step

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.model_config.latent_dim, device=self.device, dtype=self.dtype)

    def critic_step(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One critic update on a real micro-batch; returns (loss, Wasserstein estimate, penalty)."""
        real = real.to(self.device, self.dtype, non_blocking=True)
        with torch.no_grad():
            fake = self.generator.module(self.noise(real.shape[0]))
        real, fake = self.augment(real), self.augment(fake)
        real_score = self.critic(real).float().mean()
        fake_score = self.critic(fake).float().mean()
        loss = fake_score - real_score
        penalty = torch.zeros((), device=self.device)
        if self.t.loss == "wgan-gp":
            penalty = self.gradient_penalty(real, fake)
            loss = loss + self.t.gp_lambda * penalty
        self.critic.backward(loss)
        self.critic.step()
        if self.t.loss == "wgan-clip":
            with torch.no_grad():
                for p in self.critic.module.parameters():
                    p.clamp_(-self.t.clip_value, self.t.clip_value)
        return loss.detach(), (real_score - fake_score).detach(), penalty.detach()

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment (``--augment``) of what the critic sees, real and fake alike; identity by default."""
        return diff_augment(images, self.t.augment) if self.t.augment else images

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``E[(|grad_x D(x_hat)| - 1)^2]`` at random interpolates, differentiable (double backward)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=self.device, dtype=self.dtype)
        x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
        score = self.critic.module(x_hat)
        (grad,) = torch.autograd.grad(score.float().sum(), x_hat, create_graph=True)
        return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()

    def generator_step(self, batch_size: int) -> torch.Tensor:
        """One generator update against the frozen critic; returns its loss."""
        with frozen(self.critic.module):
            fake = self.generator(self.noise(batch_size))
            loss = -self.critic.module(self.augment(fake)).float().mean()
            self.generator.backward(loss)
            self.generator.step()
        return loss.detach()

    # ---------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Steps until ``--steps``: train, log, and every K steps checkpoint and draw samples."""
        if self.step >= self.t.steps:
            log.info("run is at step %d, --steps is %d: nothing to do", self.step, self.t.steps)
            if self.metrics:
                self.metrics.close()
            return
        batches = iterate_batches(self.stream, self.position, num_workers=self.num_workers,
                                  pin_memory=self.device != "cpu")
        sample_every = self.c.every if self.c.sample_every is None else self.c.sample_every
        log.info("training %s from step %d to %d on %d rank(s): micro-batch %d, %d micro-batches per rank "
                 "per epoch, %s data, %d loader worker(s), %d thread(s) per rank", self.t.preset, self.step,
                 self.t.steps, self.env.world_size, self.stream.batch_size, self.stream.batches_per_epoch,
                 "cached" if self.stream.cached else "streamed", 0 if self.stream.cached else self.num_workers,
                 torch.get_num_threads())
        bar = tqdm(total=self.t.steps, initial=self.step, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30)
        redirect = logging_redirect_tqdm() if self.is_main else contextlib.nullcontext()
        try:
            with bar, redirect:
                while self.step < self.t.steps:
                    row = self.train_step(batches)
                    checkpoint = self.step % self.c.every == 0 or self.step == self.t.steps
                    row["swd"] = self.measure_swd() if checkpoint else None
                    if self.metrics:
                        self.metrics.write(row)
                    bar.update(1)
                    bar.set_postfix(W=f"{row['wasserstein']:.3f}", img_s=f"{row['images_per_s']:.0f}", refresh=False)
                    if checkpoint:
                        self.save(row["swd"])
                    if sample_every and (self.step % sample_every == 0 or self.step == self.t.steps):
                        self.sample_grid()
        finally:
            batches.close()
            if self.metrics:
                self.metrics.close()

    def train_step(self, batches: Iterator[tuple[Position, torch.Tensor]]) -> dict[str, Any]:
        """``n_critic`` critic steps and one generator step; the metrics row, averaged over ranks.

        The rank average is one all-reduce per step, which also makes every rank see the same
        non-finite value and stop at the same step.
        """
        start = time.perf_counter()
        critic = []
        for _ in range(self.t.n_critic):
            position, real = next(batches)
            critic.append(torch.stack(self.critic_step(real)))
        g_loss = self.generator_step(self.stream.batch_size)
        self.step += 1
        bpe = self.stream.batches_per_epoch
        self.position = (Position(position.epoch, position.batch + 1) if position.batch + 1 < bpe
                         else Position(position.epoch + 1, 0))
        values = torch.cat([torch.stack(critic).float().mean(0), g_loss.float().view(1)])
        dist.all_reduce(values)
        c_loss, wasserstein, penalty, g_loss = (values / self.env.world_size).tolist()
        step_s = time.perf_counter() - start
        real_images = self.stream.batch_size * self.env.world_size * self.t.n_critic
        row = {"step": self.step, "epoch": round(self.position.epoch + self.position.batch / bpe, 4),
               "critic_loss": c_loss, "generator_loss": g_loss, "wasserstein": wasserstein,
               "gradient_penalty": penalty, "step_s": round(step_s, 5),
               "images_per_s": round(real_images / step_s, 2), "time": round(time.time(), 3)}
        if not all(math.isfinite(v) for v in (c_loss, wasserstein, penalty, g_loss)):
            raise TrainingDiverged(self._diverged_message(row))
        return row

    def _diverged_message(self, row: dict[str, Any]) -> str:
        latest = read_latest(self.run_dir)
        kept = (f"{self.run_dir / CHECKPOINTS / LATEST} still names step {latest}, the last good checkpoint; "
                "resume from it with --resume (perhaps with a lower learning rate in a new run)"
                if latest is not None else "no checkpoint was written before it")
        losses = ", ".join(f"{k}={row[k]}" for k in ("critic_loss", "generator_loss", "wasserstein",
                                                     "gradient_penalty"))
        return f"non-finite loss at step {row['step']} ({losses}): training stopped; {kept}"

    # ---------------------------------------------------------------- checkpoints

    def save(self, swd: float | None = None) -> None:
        """``RUN/checkpoints/<step>/{generator,critic}/`` (DeepSpeed), ``rng_rank<r>.pt`` and
        ``trainer_state.json``; then, after a barrier proves every rank finished, ``latest``, and
        ``best`` when this checkpoint's SWD is the lowest so far."""
        folder = self.run_dir / CHECKPOINTS / str(self.step)
        if self.is_main and folder.exists():
            shutil.rmtree(folder)
        self._barrier()
        self.generator.save_checkpoint(str(folder), tag="generator", save_latest=False)
        self.critic.save_checkpoint(str(folder), tag="critic", save_latest=False)
        rng_path = folder / f"rng_rank{self.env.rank}.pt"
        torch.save(rng_state(), rng_path.with_suffix(".tmp"))
        os.replace(rng_path.with_suffix(".tmp"), rng_path)
        if self.is_main:
            state = {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                     "world_size": self.env.world_size, "micro_batch": self.stream.batch_size,
                     "seed": self.t.seed, "preset": self.t.preset, "swd": swd,
                     "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            _atomic_write_text(folder / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
        self._barrier()
        if self.is_main:
            _atomic_write_text(self.run_dir / CHECKPOINTS / LATEST, f"{self.step}\n")
            if swd is not None and swd < self.best_swd:
                self.best_swd = swd
                _atomic_write_text(self.run_dir / CHECKPOINTS / BEST, f"{self.step}\n")
            self._prune()
            log.info("step %d: checkpoint %s", self.step, folder)

    def _prune(self) -> None:
        root = self.run_dir / CHECKPOINTS
        steps = checkpoint_steps(self.run_dir, complete_only=False)
        best = read_latest(self.run_dir, BEST)
        for step in steps:
            if step < self.step and step not in steps[-self.c.keep:] and step != best:
                shutil.rmtree(root / str(step), ignore_errors=True)

    def load(self, step: int) -> None:
        folder = self.run_dir / CHECKPOINTS / str(step)
        for engine, tag in ((self.generator, "generator"), (self.critic, "critic")):
            path, _ = engine.load_checkpoint(str(folder), tag=tag)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {folder / tag}")
        state = json.loads((folder / TRAINER_STATE).read_text())
        self.step = int(state["step"])
        self.position = Position(int(state["epoch"]), int(state["batch"]))
        set_rng_state(torch.load(folder / f"rng_rank{self.env.rank}.pt", weights_only=True))
        self._barrier()
        if self.is_main:
            for stale in checkpoint_steps(self.run_dir, complete_only=False):
                if stale > step:
                    shutil.rmtree(self.run_dir / CHECKPOINTS / str(stale), ignore_errors=True)
        best = read_latest(self.run_dir, BEST)
        if best is not None and best <= step:
            saved = json.loads((self.run_dir / CHECKPOINTS / str(best) / TRAINER_STATE).read_text()).get("swd")
            self.best_swd = math.inf if saved is None else float(saved)
        log.info("resumed from step %d (epoch %d, micro-batch %d)", self.step, self.position.epoch,
                 self.position.batch)

    # ---------------------------------------------------------------- watching

    def measure_swd(self) -> float | None:
        """SWD (x1e3, mean over pyramid levels; ``brats_gan.metrics``) between a fixed noise batch's images
        and evenly spaced real images of the store, at model size (rank 0; None elsewhere or when off).
        Like the sample grid it runs in eval mode under a forked RNG, so it never changes training."""
        if not self.is_main or not self.swd_images:
            return None
        from brats_gan.metrics import swd_distance

        if self._swd_real is None:
            picks = np.linspace(0, self.stream.n_samples - 1, self.swd_images).round().astype(np.int64)
            self._swd_real = self.stream.transform(self.stream.read(picks)).float()
        fake = self.generate(self.swd_noise)
        return float(swd_distance(self._swd_real, fake, seed=self.t.seed)["mean"])

    def generate(self, noise: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """The generator's images for ``noise`` (float32, on the CPU), in eval mode and under a forked
        RNG, so that drawing samples or measuring them never changes the training's random stream."""
        module = self.generator.module
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            try:
                return torch.cat([module(z.to(self.device, self.dtype)).float().cpu() for z in noise.split(batch)])
            finally:
                module.train()

    def sample_grid(self) -> None:
        """The generator on the fixed noise batch -> ``RUN/samples/step_<step>.png`` (rank 0)."""
        if self.is_main:
            save_grid(self.generate(self.fixed_noise).numpy(), self.run_dir / "samples" / f"step_{self.step:07d}.png")


class MetricsLog:
    """``RUN/metrics.csv`` and TensorBoard (``RUN/tensorboard``), rank 0 only, one row per step.

    ``critic_loss``, ``wasserstein`` (the critic's estimate ``D(real) - D(fake)``) and
    ``gradient_penalty`` are means over the step's ``n_critic`` critic updates; every value is the
    mean over ranks. ``images_per_s`` counts the real images all ranks' critics consumed per second
    of the step (``micro-batch x ranks x n_critic / step_s``).

    On resume both drop what a killed run wrote after the checkpoint it resumes from, so the logs
    read as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / METRICS_FILE
        kept: list[dict[str, str]] = []
        if path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
        self.file = open(path, "w", newline="", buffering=1)  # noqa: SIM115  (open for the whole run)
        self.csv = csv.DictWriter(self.file, fieldnames=METRICS)
        self.csv.writeheader()
        self.csv.writerows(kept)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, Any]) -> None:
        self.csv.writerow(row)
        step = row["step"]
        for key, tag in (("critic_loss", "loss/critic"), ("generator_loss", "loss/generator"),
                         ("wasserstein", "wasserstein_estimate"), ("gradient_penalty", "loss/gradient_penalty"),
                         ("images_per_s", "throughput/images_per_s"), ("step_s", "throughput/step_s")):
            self.tb.add_scalar(tag, row[key], step)
        if row.get("swd") is not None:
            self.tb.add_scalar("quality/swd", row["swd"], step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _versions() -> dict[str, str]:
    import deepspeed

    from brats_gan import __version__

    return {"brats_gan": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}


# ==================================================================================== entry points


def run(args: argparse.Namespace) -> int:
    """Validate everything on every rank, then join the process group and train."""
    env = DistEnv.from_environ(getattr(args, "local_rank", None))
    configure_logging(env, bool(getattr(args, "verbose", False)))
    options = build_options(args, env.world_size)
    resume_step = check_run_folder(options, env.world_size)
    try:
        stream = SliceStream(
            options.data.store, batch_size=options.training.micro_batch,
            image_size=options.training.model.image_size,
            rank=env.rank, world_size=env.world_size, seed=options.training.seed,
            channels=options.data.channels, cache=options.data.cache,
            run_length=options.data.run_length, window_batches=options.data.window_batches,
        )
    except schema.StoreError as err:
        raise ConfigError(f"--store: {err}") from None

    device = init_distributed(env)
    try:
        trainer = Trainer(options, env, device, stream, resume_step)
        trainer.fit()
    except TrainingDiverged as err:
        log.error("%s", err)
        return EXIT_DIVERGED
    finally:
        dist.destroy_process_group()
        remove_shm_buffer(env)
    log.info("done: %s at step %d", options.checkpoint.out, trainer.step)
    return 0


def remove_shm_buffer(env: DistEnv) -> None:
    """Unlink this rank's ``/dev/shm`` buffer of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed 0.19 creates one ~48 MB segment per rank and run (named by user, master address and
    port) and never unlinks it: every CPU run leaked ~100 MB of RAM until /dev/shm filled the
    machine's memory. Unlinking after the process group is gone is safe: peers that still map it keep
    their mapping. A run killed with SIGKILL cannot do this; ``tests/conftest.py`` sweeps after tests.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{env.rank}")
    with contextlib.suppress(OSError):
        (Path("/dev/shm") / name).unlink()


def main(argv: list[str] | None = None) -> int:
    """``python -m brats_gan.train`` (what the DeepSpeed launcher runs on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m brats_gan.train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    configure_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except CommandError as err:
        rank = os.environ.get("RANK")
        where = f" [rank {rank}]" if rank not in (None, "0") else ""
        print(f"brats_gan.train{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brats_gan.train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
