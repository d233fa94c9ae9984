"""The options of a training run: one dataclass per concern, read from the command line (new run) or
from ``RUN/training_options.json`` plus the changes a resume allows, and validated on every rank before
any rank joins the process group or writes a file. Every refusal names the flag and the field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from brats_gan import schema
from brats_gan.augment import parse_policy
from brats_gan.checkpoints import (
    CHECKPOINTS,
    LATEST,
    OPTIONS_FILE,
    TRAINER_STATE,
    RunFolderError,
    read_options,
    resume_plan,
    unwritable,
    usable_checkpoint,
)
from brats_gan.compiled_critic import unsupported
from brats_gan.data import DEFAULT_RUN_LENGTH, DEFAULT_WINDOW_BATCHES
from brats_gan.errors import UserError
from brats_gan.models import Critic, ModelConfig, get_config
from brats_gan.recipes import get_recipe, model_config, preset_family, preset_recipe

log = logging.getLogger(__name__)

LOSSES = ("wgan-gp", "wgan-clip")
STORE_IDENTITY = "store_identity"  # training_options.json: the store the run trains on (store_identity())
CHECKPOINT_SWD_MIN_IMAGES = 16  # --swd-images: fewer make the SWD too noisy to choose the best checkpoint by

# The DeepSpeed configs when --deepspeed-config is not given: the preset family's micro-batch, fp32, and
# Adam with the preset's recipe (brats_gan.recipes); deepspeed_configs/{paper,tiny}.json hold the same (a
# test keeps them equal), for users to copy and edit.
# L2 decay as Chainer's hook, not AdamW; torch's fused Adam (one kernel per step on a GPU, 4x faster than its per-tensor
# loop on a CPU; the same update to rounding) where DeepSpeed would leave torch its per-tensor loop on CPU tensors
_ADAM_FIXED = {"eps": 1e-08, "torch_adam": True, "adam_w_mode": False, "fused": True}
_MICRO_BATCH = {"paper": 8, "tiny": 4}


def default_deepspeed(preset: str, recipe: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config of ``preset`` trained with ``recipe`` (default: the preset's)."""
    adam = get_recipe(recipe or preset_recipe(preset)).adam
    return {"train_micro_batch_size_per_gpu": _MICRO_BATCH[preset_family(preset)], "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {**copy.deepcopy(adam), **_ADAM_FIXED}},
            "gradient_clipping": 0.0, "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False}


DEFAULT_DEEPSPEED: dict[str, dict[str, Any]] = {family: default_deepspeed(family) for family in _MICRO_BATCH}

# Top-level DeepSpeed fields this trainer accepts; anything else is a typo or a feature it does not
# drive (pipeline, MoE, ...) and is refused. Keys starting with "_" are comments.
DEEPSPEED_FIELDS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "gradient_clipping", "fp16", "bf16", "data_types", "zero_optimization", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "communication_data_type", "zero_allow_untested_optimizer", "tensorboard", "csv_monitor", "wandb",
    "comet", "flops_profiler", "comms_logger", "checkpoint", "dump_state", "disable_allgather", "torch_autocast",
})
ADAM_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "amsgrad",
                         "bias_correction", "foreach", "fused"})
MONITORS = ("tensorboard", "csv_monitor")
# DeepSpeed's learning-rate schedules this trainer drives, and their fields DeepSpeed counts in optimizer updates. A
# config gives them in training steps (as --steps; DeepSpeed's warmup default of 1000 when left out); the critic,
# which updates n_critic times a step, gets them scaled (engine_deepspeed), so both networks follow one schedule.
# WarmupDecayLR and WarmupCosineLR end at total_num_steps (left out: --steps) and hold their end rate after it.
SCHEDULES = {"WarmupLR": ("warmup_num_steps",), "WarmupDecayLR": ("warmup_num_steps", "total_num_steps"),
             "WarmupCosineLR": ("warmup_num_steps", "total_num_steps")}
DEFAULT_WARMUP_STEPS = 1000  # DeepSpeed's, recorded so that it is scaled for the critic like a given one
# training.schedule_units: how a run reads its schedule's counts. Runs recorded before SCHEDULES gave both engines
# DeepSpeed's counts unscaled; they resume so ("updates").
SCHEDULE_UNITS = ("training-steps", "updates")


class ConfigError(UserError):
    """A bad option, config file, store or run folder: one line naming the field, exit status 2."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are read (see ``brats_gan.data``)."""

    store: str
    channels: tuple[str, ...] | None = None
    cache: str = "auto"
    num_workers: int | None = None  # None: data.default_num_workers(local world size)
    run_length: int = DEFAULT_RUN_LENGTH
    window_batches: int = DEFAULT_WINDOW_BATCHES
    verify: bool = True  # read every shard once at start (brats_gan.verify); off: trust the store


@dataclass(frozen=True)
class TrainingConfig:
    """What is trained and how; ``deepspeed`` is the resolved DeepSpeed config both engines get."""

    preset: str = "paper"
    recipe: str | None = None  # brats_gan.recipes; None: the preset's (a new run records the one it used)
    steps: int = 10_000
    seed: int = 0
    loss: str = "wgan-gp"
    n_critic: int = 5
    gp_lambda: float = 10.0
    gp_every: int = 1  # the penalty on every N-th critic step, lambda x N (lazy regularisation); 1: every step
    clip_value: float = 0.01
    augment: tuple[str, ...] = ("translation", "cutout")  # DiffAugment (brats_gan.augment); () = none
    augment_p: float = 1.0  # each policy's probability per image
    ema_images: int = 10_000  # half-life of the averaged generator (brats_gan.ema) in generated images; 0: none
    ema_rampup: float = 0.05  # the half-life is at most this x the images generated so far; 0: no ramp-up
    upsample: str | None = None  # None: the preset's
    resize_mode: str | None = None  # None: the preset's
    critic_mbstd_group: int | None = None  # None: the preset's and recipe's
    generator_dropout: float | None = None  # None: the preset's and recipe's
    generator_output: str | None = None  # None: the preset's and recipe's
    compile: bool = False  # the critic step as one torch.compile'd function (brats_gan.compiled_critic)
    schedule_units: str = SCHEDULE_UNITS[0]  # SCHEDULE_UNITS; "updates" only for runs recorded before it
    deepspeed_config: str | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def model(self) -> ModelConfig:
        """The preset's networks with its recipe's changes and those given on the command line."""
        return model_config(self.preset, self.recipe, **{key[1]: getattr(self, key[1]) for key in MODEL_CHOICES})


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
    on_signal: bool = False  # checkpoint the step at which SIGTERM/SIGUSR1 stops the run
    log_every: int = 10  # steps between reads of the figures (and of a stop request) by the host


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
    "--window-batches": ("data", "window_batches"), "--verify-store": ("data", "verify"),
    "--preset": ("training", "preset"), "--recipe": ("training", "recipe"), "--steps": ("training", "steps"),
    "--seed": ("training", "seed"),
    "--loss": ("training", "loss"), "--n-critic": ("training", "n_critic"),
    "--gp-lambda": ("training", "gp_lambda"), "--gp-every": ("training", "gp_every"),
    "--clip-value": ("training", "clip_value"),
    "--augment": ("training", "augment"), "--augment-p": ("training", "augment_p"),
    "--ema-images": ("training", "ema_images"), "--ema-rampup": ("training", "ema_rampup"),
    "--upsample": ("training", "upsample"),
    "--resize-mode": ("training", "resize_mode"), "--critic-mbstd": ("training", "critic_mbstd_group"),
    "--generator-dropout": ("training", "generator_dropout"),
    "--generator-output": ("training", "generator_output"), "--compile": ("training", "compile"),
    "--deepspeed-config": ("training", "deepspeed_config"),
    "--out": ("checkpoint", "out"), "--checkpoint-every": ("checkpoint", "every"),
    "--keep-checkpoints": ("checkpoint", "keep"), "--sample-every": ("checkpoint", "sample_every"),
    "--samples": ("checkpoint", "samples"), "--swd-images": ("checkpoint", "swd_images"),
    "--checkpoint-on-signal": ("checkpoint", "on_signal"), "--log-every": ("checkpoint", "log_every"),
}
# Options that change the preset's network; None means the preset's own.
MODEL_CHOICES = {("training", "upsample"), ("training", "resize_mode"), ("training", "critic_mbstd_group"),
                 ("training", "generator_dropout"), ("training", "generator_output")}
# What a resumed run may change; anything else would make it a different run.
RESUMABLE_CHANGES = {("training", "steps"), ("checkpoint", "every"), ("checkpoint", "keep"),
                     ("checkpoint", "sample_every"), ("checkpoint", "samples"), ("data", "num_workers"),
                     ("checkpoint", "swd_images"), ("checkpoint", "on_signal"), ("data", "verify"), ("checkpoint", "log_every"),
                     ("data", "store"), ("data", "cache"), ("training", "compile")}


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
    at_least(("training", "gp_every"), t.gp_every, 1)
    checks.append((("training", "clip_value"), t.clip_value > 0, "> 0"))
    checks.append((("training", "augment_p"), isinstance(t.augment_p, (int, float)) and not isinstance(t.augment_p, bool)
                   and 0 < t.augment_p <= 1, "a number in (0, 1]"))
    at_least(("training", "ema_images"), t.ema_images, 0)
    at_least(("training", "ema_rampup"), float(t.ema_rampup), 0.0, float)
    checks.append((("training", "loss"), t.loss in LOSSES, f"one of {', '.join(LOSSES)}"))
    at_least(("checkpoint", "every"), c.every, 1)
    at_least(("checkpoint", "keep"), c.keep, 1)
    at_least(("checkpoint", "log_every"), c.log_every, 1)
    if c.sample_every is not None:
        at_least(("checkpoint", "sample_every"), c.sample_every, 0)
    checks.append((("checkpoint", "samples"), isinstance(c.samples, int) and 1 <= c.samples <= 256, "in [1, 256]"))
    checks.append((("checkpoint", "swd_images"), isinstance(c.swd_images, int) and not isinstance(c.swd_images, bool)
                   and (c.swd_images == 0 or c.swd_images >= CHECKPOINT_SWD_MIN_IMAGES),
                   f"0 (none) or >= {CHECKPOINT_SWD_MIN_IMAGES}"))
    for key, ok, must in checks:
        if not ok:
            raise _bad(key, getattr(getattr(options, key[0]), key[1]), must)
    if t.schedule_units not in SCHEDULE_UNITS:  # set by the run folder alone, never by a flag
        raise ConfigError(f"training.schedule_units must be one of {', '.join(SCHEDULE_UNITS)}, "
                          f"got {t.schedule_units!r}")

    try:
        get_config(t.preset)
    except ValueError as err:
        raise ConfigError(f"--preset (training.preset): {err}") from None
    try:
        get_recipe(t.recipe or preset_recipe(t.preset))
    except ValueError as err:
        raise ConfigError(f"--recipe (training.recipe): {err}") from None
    try:
        _ = t.model  # the preset with its recipe and the network flags (MODEL_CHOICES), validated by ModelConfig
    except ValueError as err:
        keys = sorted(MODEL_CHOICES)
        raise ConfigError(f"{'/'.join(map(_flag, keys))} ({'/'.join(f'{a}.{b}' for a, b in keys)}): {err}") from None
    ds = t.deepspeed
    end = schedule_end(ds)
    if end is not None and t.schedule_units == "training-steps":
        kind, warmup = ds["scheduler"]["type"], ds["scheduler"]["params"]["warmup_num_steps"]
        if t.steps > end:
            raise ConfigError(f"--steps (training.steps) {t.steps} goes past the end of the learning-rate schedule "
                              f"(scheduler.params.total_num_steps {end}), after which {kind} holds its end rate; "
                              f"train at most {end} steps, or start a new run whose schedule ends later")
        if warmup > end:
            raise ConfigError(f"scheduler.params.warmup_num_steps {warmup} is past the schedule's end (total_num_steps "
                              f"{end}): {kind} would never decay; shorten the warmup or end the schedule later")
    if t.loss == "wgan-clip" and (ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")):
        raise ConfigError("--loss wgan-clip clips the fp32 weights the optimizer owns only in fp32; "
                          "use a config without bf16/fp16 or --loss wgan-gp")
    if t.compile:
        _check_compile(t)


def _check_compile(t: TrainingConfig) -> None:
    """Refuse ``--compile`` where the functional critic step (``brats_gan.compiled_critic``) does not apply."""
    if t.loss != "wgan-gp":
        raise ConfigError(f"--compile (training.compile) compiles WGAN-GP's critic step; --loss {t.loss} has none")
    if t.gp_every != 1:
        raise ConfigError(f"--compile (training.compile) compiles the critic step with its penalty on every step; "
                          f"--gp-every {t.gp_every} skips it on some: use one of the two")
    with torch.device("meta"):
        critic = Critic(t.model)
    reason = unsupported(critic, torch.float16 if t.deepspeed.get("fp16", {}).get("enabled") else torch.float32)
    if reason:
        raise ConfigError(f"--compile (training.compile): {reason}; train without --compile")


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_deepspeed_config(path: str | None, preset: str, world_size: int, recipe: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config both engines get: the file's (validated), or :func:`default_deepspeed`'s.

    DeepSpeed ignores unknown top-level fields and checks the rest only inside ``initialize`` (after
    the process group is up); here a typo is refused by name before any rank starts.
    """
    if path is None:
        return default_deepspeed(preset, recipe)
    where = f"--deepspeed-config {path}"
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory; name a JSON file (e.g. deepspeed_configs/paper.json)") from None
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
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage == 1 and not config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"{where}: field 'zero_optimization.stage' 1 is for bf16 only (DeepSpeed's bf16 "
                          "optimizer); use 0, or enable bf16")
    if stage not in (0, 1):
        raise ConfigError(f"{where}: field 'zero_optimization.stage' must be 0 (or 1 with bf16): the networks "
                          "are small and replicated; ZeRO partitioning would only add communication")
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
    _check_scheduler(config, where)
    from deepspeed.runtime.config import DeepSpeedConfig

    probe = {k: v for k, v in config.items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(copy.deepcopy(probe))
    except Exception as err:  # noqa: BLE001  (pydantic and assertion errors; both name the field)
        raise ConfigError(f"{where}: {' '.join(str(err).split())}") from None
    _check_autocast(config, where)
    _check_precision(config, where)
    return config


def _check_scheduler(config: dict[str, Any], where: str) -> None:
    """Refuse by name what DeepSpeed would reject only inside ``initialize``, on every rank, and record the
    warmup it would default, so that the critic's is scaled too."""
    import inspect

    from deepspeed.runtime import lr_schedules

    scheduler = config.get("scheduler")
    if scheduler is None:
        return
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULES:
        kind = scheduler.get("type") if isinstance(scheduler, dict) else scheduler
        raise ConfigError(f"{where}: field 'scheduler.type' must be one of {', '.join(SCHEDULES)} (their step counts "
                          f"are scaled for the critic's n_critic updates a step), got {kind!r}")
    params = scheduler.setdefault("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: field 'scheduler.params' must be an object, got {params!r}")
    known = sorted(set(inspect.signature(getattr(lr_schedules, scheduler["type"])).parameters)
                   - {"optimizer", "last_batch_iteration"})
    for key in params:
        if key not in known:
            raise ConfigError(f"{where}: unknown field 'scheduler.params.{key}'{_suggest(key, known)}; "
                              f"{scheduler['type']} takes {', '.join(known)}")
    params.setdefault("warmup_num_steps", DEFAULT_WARMUP_STEPS)
    for name in SCHEDULES[scheduler["type"]]:
        value = params.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: field 'scheduler.params.{name}' must be an int >= 1 (training steps), "
                              f"got {value!r}")


def _ends(scheduler: Any) -> bool:
    """Whether ``scheduler`` (a config's block) is a schedule with an end (WarmupDecayLR, WarmupCosineLR)."""
    return isinstance(scheduler, dict) and "total_num_steps" in SCHEDULES.get(scheduler.get("type"), ())


def schedule_end(config: dict[str, Any]) -> int | None:
    """The training step at which the config's learning-rate schedule ends, if it has an end."""
    scheduler = config.get("scheduler")
    return (scheduler.get("params") or {}).get("total_num_steps") if _ends(scheduler) else None


def _default_schedule_end(config: dict[str, Any], steps: int | None) -> None:
    """Give a schedule that ends without ``total_num_steps`` the run's ``steps``."""
    if _ends(config.get("scheduler")) and steps is not None:
        config["scheduler"]["params"].setdefault("total_num_steps", steps)


def engine_deepspeed(t: TrainingConfig, engine: str) -> dict[str, Any]:
    """The DeepSpeed config of the ``generator`` or ``critic`` engine: the schedule's step counts
    (:data:`SCHEDULES`), given in training steps, scaled to the engine's updates a step (the critic's
    n_critic); a run recorded in DeepSpeed's own counts (``schedule_units`` "updates") gets them as recorded."""
    config = copy.deepcopy(t.deepspeed)
    scheduler = config.get("scheduler")
    updates_per_step = t.n_critic if engine == "critic" and t.schedule_units == "training-steps" else 1
    if scheduler is not None and updates_per_step != 1:
        params = scheduler.setdefault("params", {})
        for name in SCHEDULES[scheduler["type"]]:
            if name in params:
                params[name] *= updates_per_step
    return config


def autocast_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype of ``torch_autocast`` (fp32 weights, each forward's arithmetic in this dtype) where the config
    enables it, else None. DeepSpeed autocasts only its engines' forwards; the trainer's own calls of the
    networks (the penalty's interpolates, the generator step's critic) follow this too (``brats_gan.loss``)."""
    from deepspeed.runtime.config import (
        get_torch_autocast_dtype,
        get_torch_autocast_enabled,
    )

    return get_torch_autocast_dtype(config) if get_torch_autocast_enabled(config) else None


def _check_autocast(config: dict[str, Any], where: str) -> None:
    """``torch_autocast`` in bf16 only, and alone: fp16 autocast would step through a GradScaler, which reads
    its overflow flag on the host every step; and it is another precision than ``bf16``/``fp16``, not a layer
    on top of them."""
    if not config.get("torch_autocast", {}).get("enabled"):
        return
    if autocast_dtype(config) != torch.bfloat16:
        raise ConfigError(f"{where}: field 'torch_autocast.dtype' must be \"bf16\" (unset, DeepSpeed leaves torch its "
                          f"device's default; fp16 autocast steps through a loss scaler that reads the host every "
                          f"step: use deepspeed_configs/paper_fp16.json), got {config['torch_autocast'].get('dtype')!r}")
    for other in ("bf16", "fp16"):
        if config.get(other, {}).get("enabled"):
            raise ConfigError(f"{where}: fields 'torch_autocast' and '{other}' are both enabled: keep one (torch_autocast "
                              f"keeps fp32 weights and autocasts each forward; {other} trains {other} weights)")


def precision_supported(dtype: str) -> bool:
    """Whether DeepSpeed's accelerator on this machine trains in ``dtype`` ("fp16" or "bf16"). Its CPU
    accelerator reports fp16 where oneDNN has it (AVX512-FP16 or AMX-FP16, e.g. Sapphire Rapids), and
    oneDNN's own switch ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` hides it."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return bool(accelerator.is_fp16_supported() if dtype == "fp16" else accelerator.is_bf16_supported())


def _check_precision(config: dict[str, Any], where: str) -> None:
    """Refuse a mixed precision this machine's accelerator lacks (fp16 on most CPUs), which DeepSpeed would
    only report inside ``initialize``, as a traceback on every rank."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    # (config field, the precision it needs, what it trains in, the alternative to name)
    for section, needs, what, instead in (("fp16", "fp16", "fp16", "bf16 (deepspeed_configs/paper_bf16.json)"),
                                          ("bf16", "bf16", "bf16", "fp16 or fp32"),
                                          ("torch_autocast", "bf16", "bf16 autocast", "fp16")):
        if config.get(section, {}).get("enabled") and not precision_supported(needs):
            why = " (DeepSpeed offers fp16 on CPUs with AVX512-FP16 or AMX-FP16 only)" if device == "cpu" else ""
            raise ConfigError(f"{where}: field '{section}.enabled': this machine's accelerator ({device}) does not "
                              f"support {what} training{why}; use {instead} or fp32 (deepspeed_configs/paper.json)")


def build_options(given: dict[tuple[str, str], Any], out: str | Path, resume: bool, world_size: int) -> Options:
    """Options for a new run from what the user set (``given``, keyed by :data:`FLAGS`' (section, field)), or
    for a resume from ``RUN/training_options.json`` plus the changes a resume allows."""
    given = dict(given)
    if ("training", "augment") in given:
        try:
            given[("training", "augment")] = parse_policy(given[("training", "augment")])
        except ValueError as err:
            raise ConfigError(f"--augment: {err}") from None
    if ("data", "store") in given:  # recorded absolute: generate and resumes may run from another folder
        given[("data", "store")] = str(Path(given[("data", "store")]).absolute())
    out = Path(out)
    schema.check_outside_stores(out, "--out", ConfigError)  # a store's rewrite would delete the run
    given[("checkpoint", "out")] = str(out)
    given[("checkpoint", "resume")] = bool(resume)
    if resume:
        try:
            saved = read_options(out)
        except RunFolderError as err:
            raise ConfigError(f"--resume: {err}; --out names the run to continue") from None
        sections = {name: dict(saved[name]) for name in ("data", "training", "checkpoint")}
        sections["training"].setdefault("recipe", "poster")  # runs from before recipes had the poster's
        sections["training"].setdefault("schedule_units", "updates")  # runs from before SCHEDULES: as they trained
        if ("training", "deepspeed_config") in given:
            fresh = load_deepspeed_config(given.pop(("training", "deepspeed_config")),
                                          sections["training"]["preset"], world_size)
            _default_schedule_end(fresh, schedule_end(sections["training"]["deepspeed"]))
            if fresh != sections["training"]["deepspeed"]:
                raise ConfigError("--resume: --deepspeed-config differs from the config the run was started "
                                  "with (saved in training_options.json); start a new run to change it")
        for key, value in given.items():
            old = sections[key[0]].get(key[1])
            if old is None and key in MODEL_CHOICES:  # the preset's, saved in the run's network
                old = saved.get("model", {}).get(key[1])
            old = tuple(old) if isinstance(old, list) else old
            if key not in RESUMABLE_CHANGES and key[1] not in ("out", "resume") and value != old:
                raise ConfigError(f"--resume: {_flag(key)} {value!r} differs from the run's {old!r}; "
                                  "a resumed run keeps its settings (start a new run to change them)")
            sections[key[0]][key[1]] = value
        check_resumed_store(saved, sections["data"]["store"], ("data", "store") in given)
        if sections["data"].get("channels") is not None:
            sections["data"]["channels"] = tuple(sections["data"]["channels"])
        sections["training"]["augment"] = tuple(sections["training"].get("augment", ()))
    else:
        if ("data", "store") not in given:
            raise ConfigError("--store is required for a new run")
        sections = {"data": {}, "training": {}, "checkpoint": {}}
        for key, value in given.items():
            sections[key[0]][key[1]] = value
        training = sections["training"]
        preset = str(training.get("preset", TrainingConfig.preset))
        training.setdefault("recipe", preset_recipe(preset))
        try:
            for name, value in get_recipe(training["recipe"]).training.items():
                training.setdefault(name, value)  # a flag given wins over the recipe
        except ValueError as err:
            raise ConfigError(f"--recipe (training.recipe): {err}") from None
        training["deepspeed"] = load_deepspeed_config(training.get("deepspeed_config"), preset, world_size,
                                                      training["recipe"])
        _default_schedule_end(training["deepspeed"], training.get("steps", TrainingConfig.steps))
    try:
        options = Options(DataConfig(**sections["data"]), TrainingConfig(**sections["training"]),
                          CheckpointConfig(**sections["checkpoint"]))
    except TypeError as err:
        raise ConfigError(f"{out / OPTIONS_FILE}: {err}") from None
    validate(options)
    return options


def store_identity(summary: schema.StoreSummary) -> dict[str, Any]:
    """What makes a store the one a run trained on, recorded in ``training_options.json``: its channels, its
    image shape and a digest of its shard checksums (the pixels as written), or, for a store written
    without checksums, when it was created. A copy or a move keeps all of them; preprocessing again with
    other data or channels changes them."""
    crc = summary.attrs.get("shard_crc32")
    digest = hashlib.sha256(json.dumps([int(c) for c in crc]).encode()).hexdigest() if crc else None
    return {"channels": list(summary.channels), "shape": list(summary.image_shape), "shard_crc32_sha256": digest,
            "created": summary.attrs.get("created")}


def _channels(names: list[str]) -> str:
    return f"{len(names)} channel{'' if len(names) == 1 else 's'} ({', '.join(names)})"


def _samples(shape: Any) -> str:
    n, _, y, x = shape
    return f"{n} samples of {y}x{x}"


def store_difference(recorded: dict[str, Any], summary: schema.StoreSummary) -> str | None:
    """How the store of ``summary`` differs from the one a run recorded (:func:`store_identity`); None if
    it is the same."""
    now = store_identity(summary)
    had = [str(c) for c in recorded.get("channels", [])]
    if had != now["channels"]:
        return (f"the run trained on a store of {_channels(had)}; {summary.path} holds {_channels(now['channels'])}")
    if list(recorded.get("shape", [])) != now["shape"]:
        return f"the run's store held {_samples(recorded.get('shape'))}; {summary.path} holds {_samples(now['shape'])}"
    if recorded.get("shard_crc32_sha256") and now["shard_crc32_sha256"]:
        if recorded["shard_crc32_sha256"] != now["shard_crc32_sha256"]:
            return f"{summary.path} holds other pixels (its shard checksums differ from those of the run's store)"
        return None
    if recorded.get("created") != now["created"]:
        return f"{summary.path} was created at {now['created']}, the run's store at {recorded.get('created')}"
    return None


def check_resumed_store(saved: dict[str, Any], store: str, given: bool) -> None:
    """Refuse to resume a run on another store than the one it trained on: given by ``--store`` (``given``)
    or changed in place (preprocessed again, other channels). A store moved or copied elsewhere is the same
    store when it matches the identity the run recorded (:func:`store_identity`); a run from before runs
    recorded one is compared with the store at its recorded path, which must then still be there."""
    old = str(saved["data"]["store"])
    try:
        summary = schema.read_summary(store)
    except schema.StoreError as err:
        if given:
            raise ConfigError(f"--store: {err}") from None
        raise ConfigError(f"--resume: the run's store {err}; if it moved, pass its new place with --store") from None
    same_path = Path(store).resolve() == Path(old).resolve()
    recorded = saved.get(STORE_IDENTITY)
    if not isinstance(recorded, dict):
        if same_path:
            return  # a run from before the identity was recorded: nothing to compare with
        try:
            recorded = store_identity(schema.read_summary(old))
        except schema.StoreError:
            raise ConfigError(f"--resume: --store {store} is not the path of the run's store {old}, which is gone, "
                              "and this run (from before runs recorded their store's checksums) cannot tell whether "
                              f"it is the same store: put it back at {old} (a symlink will do) and resume without "
                              f"--store, or start a new run in a new --out folder to train on {store}") from None
    difference = store_difference(recorded, summary)
    if difference is None:
        if not same_path:
            log.info("--store %s holds the run's store %s (same channels, shape and shard checksums): resuming on it",
                     store, old)
        return
    if same_path:
        raise ConfigError(f"--resume: the run's store {old} has changed since the run started: {difference}; a "
                          "resumed run continues on the data it started with: restore that store, or start a new "
                          "run in a new --out folder to train on this one")
    keep = (f"leave --store out (or pass --store {old})" if Path(old).exists()
            else f"pass --store with the store it trained on (no longer at {old})")
    raise ConfigError(f"--resume: --store {store} is not the run's store {old}: {difference}; a resumed run keeps "
                      f"its store: {keep}, or start a new run in a new --out folder to train on {store}")


def _unloadable(flag: str, out: Path, problems: list[str], instead: str) -> ConfigError:
    return ConfigError(f"{flag}: none of the checkpoints of {out} can be loaded ({'; '.join(problems)}); nothing "
                       f"was moved or changed: restore them (e.g. copy them again) and resume, or {instead}")


def resolve_resume_auto(out: str | Path, resume: bool | str, has_store: bool) -> tuple[bool, bool]:
    """``--resume auto`` as a plain resume or a fresh start (``checkpoints.resume_plan``): (resume, move aside),
    the second True when the existing folder is to be moved aside first (rank 0 does it once the process
    group is up, so that every rank decided on the same folder). A run whose checkpoints were all damaged
    is refused, not started again: it is for its user to restore them or to give the run up."""
    if resume != "auto":
        return bool(resume), False
    plan, problems = resume_plan(out)
    if plan == "refuse":
        what = ("is a file, not a training run folder" if Path(out).exists() and not Path(out).is_dir()
                else "exists and is not a training run folder")
        raise ConfigError(f"--resume auto: --out {out} {what}; choose another")
    if plan == "damaged":
        raise _unloadable("--resume auto", Path(out), problems, f"move {out} away to start a new run")
    if plan != "resume" and not has_store:
        raise ConfigError(f"--resume auto: {out} holds no checkpoint to resume, and a new run needs --store")
    return plan == "resume", plan == "move-aside"


def check_run_folder(options: Options, world_size: int, moving_aside: bool = False) -> int | None:
    """Refuse to overwrite a run, or to resume one without a complete checkpoint; the step to resume from."""
    out = Path(options.checkpoint.out)
    if not options.checkpoint.resume:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file, not a run folder; choose a new folder")
        if out.exists() and not moving_aside and any(out.iterdir()):
            raise ConfigError(f"--out {out} already exists; pass --resume to continue it, or choose a new folder "
                              "(a run is never overwritten)")
        problem = unwritable(out, replacing=moving_aside)
        if problem:
            raise ConfigError(f"--out {out}: {problem}; choose a folder you can write" if not moving_aside else
                              f"--resume auto: {out} never finished a checkpoint, but it cannot be moved aside to "
                              f"start again: {problem}")
        return None
    step, passed_over = usable_checkpoint(out)
    if step is None:
        if passed_over:
            raise _unloadable("--resume", out, passed_over, "start a new run in a new --out folder")
        raise ConfigError(f"--resume: {out / CHECKPOINTS / LATEST} names no complete checkpoint (the run was "
                          "stopped before its first one); start it again in a new folder")
    for warning in passed_over:
        log.warning("%s; resuming from an older one", warning)
    problem = unwritable(out)
    if problem:
        raise ConfigError(f"--resume: {problem}; a resumed run writes in {out} (checkpoints, samples, logs) and "
                          "takes its lock beside it: make them writable, or copy the run to a writable folder and "
                          "resume the copy (--out COPY --resume); nothing was changed")
    state = json.loads((out / CHECKPOINTS / str(step) / TRAINER_STATE).read_text())
    if state["world_size"] != world_size:
        raise ConfigError(f"--resume: checkpoint {step} was written by {state['world_size']} rank(s), this "
                          f"launch has {world_size}; resume with the same number of ranks so that data "
                          "order and random streams continue exactly")
    return step
