"""Train the WGAN of the poster with two DeepSpeed data-parallel engines, streaming from the slice store.

Reading order: :class:`Trainer` (engines, the loop, checkpoints, watching), then :func:`run_training`, which
glues it to the options (:mod:`brats_gan.train_config`: everything that can be refused is refused there, on
every rank, before any rank initialises the process group or writes a file), the process group
(:mod:`brats_gan.distributed`) and the run folder (:mod:`brats_gan.checkpoints`). The phases of a step
(critic step, gradient penalty, generator step) are :class:`brats_gan.loss.WGANLoss`.

The loss (``--loss wgan-gp``, the default) is WGAN-GP, per generator step ``n_critic`` (5) critic steps on
fresh real micro-batches with ``lambda`` = 10; ``--loss wgan-clip`` is the original WGAN (the poster's
reference [4]), critic weights clipped to ``[-0.01, 0.01]``. The poster names the loss but neither variant.

A "step" is one generator update (with its ``n_critic`` critic updates); ``--steps`` counts those.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from brats_gan import locks, schema
from brats_gan.checkpoints import (
    BEST,
    CHECKPOINTS,
    LATEST,
    TRAINER_STATE,
    atomic_write_text,
    checkpoint_steps,
    ema_weights_path,
    move_aside,
    read_latest,
    recorded_swd,
    usable_checkpoint,
    write_options,
)
from brats_gan.data import Position, SliceStream, default_num_workers, iterate_batches
from brats_gan.distributed import (
    DistEnv,
    init_distributed,
    shutdown_distributed,
)
from brats_gan.ema import AveragedGenerator
from brats_gan.images import save_grid
from brats_gan.loss import WGANLoss
from brats_gan.metrics_log import MetricsLog
from brats_gan.models import build_models
from brats_gan.rng import rng_state, seed_rank, set_rng_state
from brats_gan.stopping import StopRequest
from brats_gan.train_config import (
    MONITORS,
    STORE_IDENTITY,
    ConfigError,
    Options,
    TrainingConfig,
    autocast_dtype,
    build_options,
    check_run_folder,
    engine_deepspeed,
    resolve_resume_auto,
    store_identity,
)

log = logging.getLogger(__name__)

class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and keeps its last good checkpoint."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): the run stops and keeps the previous one."""


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory; the message names the micro-batch that did not fit and the knob."""


# ==================================================================================== the trainer


def _weights_only_checkpoint_engine(engine: Any) -> None:
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False`` (arbitrary pickles); its
    checkpoints of these models hold only tensors and plain containers (and, from its bf16 optimizer, the
    ``fragment_address`` named tuples that map parameters into its flat buffers), so load them the safe way."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.utils.tensor_fragment import fragment_address

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    safe = WeightsOnly.__new__(WeightsOnly)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe


def build_engine(module: torch.nn.Module, name: str, deepspeed_config: dict[str, Any], run_dir: Path) -> Any:
    """A DeepSpeed engine for ``module`` (``generator`` or ``critic``): its own monitor job name under
    ``RUN/deepspeed_monitor``, checkpoints loaded the safe way. With one rank its gradient all-reduce is
    off: summing one rank's gradients and dividing by one changes nothing, but flattening, reducing and
    copying them back cost ~33 operators and, for the paper critic on a CPU core, ~60 ms per step."""
    import deepspeed

    config = copy.deepcopy(deepspeed_config)
    for monitor in MONITORS:
        if config.get(monitor, {}).get("enabled"):
            config[monitor]["job_name"] = f"{config[monitor].get('job_name', 'brats_gan')}_{name}"
            config[monitor].setdefault("output_path", str(run_dir / "deepspeed_monitor"))
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    _weights_only_checkpoint_engine(engine)
    if dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    return engine


def seed_with_loss_scale(loss: torch.Tensor, engine: Any) -> None:
    """Make the backward of ``loss`` start from the fp16 engine's loss scale, as a scaled loss would.

    DeepSpeed's fp16 optimizers divide the gradients by their loss scale in ``step`` and skip an update
    whose gradients overflowed (lowering the scale), but DeepSpeed 0.19 with ZeRO stage 0 never multiplies
    the loss by that scale in ``backward`` (deepspeedai/DeepSpeed#8393): every update was 65536 times too
    small (Adam's L2 weight decay as many times too strong), and fp16 gradients could underflow. Where
    DeepSpeed scales the loss itself, the gradient arriving here already is the scale, and this changes nothing.
    """
    scale = float(engine.optimizer.loss_scale)
    loss.register_hook(lambda grad: torch.full_like(grad, scale))


def as_engine_output(engine: Any, loss: torch.Tensor) -> None:
    """Prepare ``loss``, computed without calling ``engine`` (the functional critic step's hand-over), for
    ``engine.backward`` as ``engine.forward`` prepares its outputs (DeepSpeed 0.19): the optimizer's per-step
    backward state reset, and the backward prologue hooked on the loss (bf16's optimizer clears its
    low-precision gradients there)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.utils import register_output_backward_hooks

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()
    register_output_backward_hooks(loss, preprocess_once_fn=engine._backward_prologue,
                                   preprocess_per_tensor_fn=engine._backward_prologue_per_tensor)


def engine_loss(generator: Any, critic: Any, config: TrainingConfig, device: str) -> WGANLoss:
    """The WGAN phases (``brats_gan.loss``) on two DeepSpeed engines: each engine's own ``backward`` and
    ``step`` update it (in fp16, from the loss scale: :func:`seed_with_loss_scale`). With ``--compile`` the
    critic's loss comes from the functional step, not from the engine (:func:`as_engine_output`)."""

    def update(engine: Any, functional: bool = False) -> Callable[[torch.Tensor], None]:
        def apply(loss: torch.Tensor) -> None:
            if functional:
                as_engine_output(engine, loss)
            if engine.fp16_enabled():
                seed_with_loss_scale(loss, engine)
            engine.backward(loss)
            engine.step()

        return apply

    model = config.model
    return WGANLoss(critic=critic, critic_module=critic.module, generator=generator, generator_module=generator.module,
                    update_critic=update(critic, config.compile), update_generator=update(generator),
                    latent_dim=model.latent_dim,
                    channels=model.channels, device=device, dtype=next(generator.module.parameters()).dtype,
                    loss=config.loss, gp_lambda=config.gp_lambda, gp_every=config.gp_every, clip_value=config.clip_value,
                    augment_policies=config.augment, augment_p=config.augment_p,
                    functional="compiled" if config.compile else "off", autocast=autocast_dtype(config.deepspeed))


class Trainer:
    """Two DeepSpeed engines (generator, critic) and their phases (``self.phases``, a
    :class:`brats_gan.loss.WGANLoss`), the data stream, the run folder and what watches the run."""

    def __init__(self, options: Options, env: DistEnv, device: str, stream: SliceStream,
                 resume_step: int | None, stop: StopRequest | None = None) -> None:
        self.options, self.env, self.device, self.stream = options, env, device, stream
        self.stop = stop or StopRequest()
        self.stopped_by: int | None = None
        self.t, self.c = options.training, options.checkpoint
        self.run_dir = Path(self.c.out)
        self.is_main = env.rank == 0
        self.model_config = self.t.model

        torch.manual_seed(self.t.seed)
        generator, critic = build_models(self.model_config)
        self.generator = build_engine(generator, "generator", engine_deepspeed(self.t, "generator"), self.run_dir)
        self.critic = build_engine(critic, "critic", engine_deepspeed(self.t, "critic"), self.run_dir)
        self.phases = engine_loss(self.generator, self.critic, self.t, device)
        self.dtype = self.phases.dtype
        self.ema = (AveragedGenerator(self.generator.module, self.t.ema_images, self.t.ema_rampup)
                    if self.t.ema_images else None)
        self.generator_batch = self.stream.batch_size * env.world_size  # generated images per step, all ranks
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
                     STORE_IDENTITY: store_identity(schema.read_summary(options.data.store)),
                     "written": schema.now_utc()}
            write_options(self.run_dir, saved)
        self._barrier()
        self.metrics = MetricsLog(self.run_dir, self.step) if self.is_main else None
        self.skipped = self._skipped_updates()
        self._unread: list[tuple[torch.Tensor, int, Position]] = []  # steps not yet read back (read_out)
        self._window_start = time.perf_counter()


    def _barrier(self) -> None:
        dist.barrier()

    # ---------------------------------------------------------------- the loop

    def fit(self) -> None:
        """Steps until ``--steps``: train; every ``--log-every`` steps read the figures back and log them; every
        K steps checkpoint and draw samples (each after a read, so that no non-finite step is saved)."""
        if self.step >= self.t.steps:
            log.info("run is at step %d, --steps is %d: nothing to do", self.step, self.t.steps)
            if self.metrics:
                self.metrics.close()
            return
        batches = iterate_batches(self.stream, self.position, num_workers=self.num_workers,
                                  pin_memory=self.device != "cpu")
        sample_every = self.c.every if self.c.sample_every is None else self.c.sample_every
        log.info("training %s from step %d to %d on %d rank(s) (%s): micro-batch %d, %d micro-batches per rank "
                 "per epoch, %s data, %d loader worker(s), %d thread(s) per rank", self.t.preset, self.step,
                 self.t.steps, self.env.world_size, self.device, self.stream.batch_size, self.stream.batches_per_epoch,
                 "cached" if self.stream.cached else "streamed", 0 if self.stream.cached else self.num_workers,
                 torch.get_num_threads())
        bar = tqdm(total=self.t.steps, initial=self.step, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30)
        redirect = logging_redirect_tqdm() if self.is_main else contextlib.nullcontext()
        self._window_start = time.perf_counter()
        try:
            with bar, redirect:
                while self.step < self.t.steps and self.stopped_by is None:
                    self.train_step(batches)
                    bar.update(1)
                    last = self.step == self.t.steps
                    due_checkpoint = last or self.step % self.c.every == 0
                    due_sample = bool(sample_every) and (last or self.step % sample_every == 0)
                    if not (due_checkpoint or due_sample or self.step % self.c.log_every == 0):
                        continue
                    rows = self.read_out()
                    checkpoint = due_checkpoint or (self.stopped_by is not None and self.c.on_signal)
                    rows[-1]["swd"] = self.measure_swd() if checkpoint else None
                    if self.metrics:
                        for row in rows:
                            self.metrics.write(row)
                    bar.set_postfix(W=f"{rows[-1]['wasserstein']:.3f}", img_s=f"{rows[-1]['images_per_s']:.0f}",
                                    refresh=False)
                    if checkpoint:
                        self.save(rows[-1]["swd"])
                    if due_sample:
                        self.sample_grid()
                    self._window_start = time.perf_counter()
        finally:
            batches.close()
            if self.metrics:
                self.metrics.close()

    def train_step(self, batches: Iterator[tuple[Position, torch.Tensor]]) -> None:
        """``n_critic`` critic steps and one generator step. Nothing is read back to the host: the step's
        figures stay on the device, queued for :meth:`read_out`, so a GPU runs ahead of the Python loop."""
        figures, position = self.phases.iteration(batches, self.t.n_critic, self.stream.batch_size)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.generator.module, self.step * self.generator_batch, self.generator_batch)
        bpe = self.stream.batches_per_epoch
        self.position = (Position(position.epoch, position.batch + 1) if position.batch + 1 < bpe
                         else Position(position.epoch + 1, 0))
        self._unread.append((figures, self.step, self.position))

    def read_out(self) -> list[dict[str, Any]]:
        """The metrics rows of the steps since the last read, averaged over ranks: one all-reduce and one read
        by the host for all of them. A stop request rides along, so that every rank stops at the same step,
        and every rank sees the same non-finite value and stops there (``TrainingDiverged``).

        ``step_s`` is the window's wall time per step: a GPU's time is known only where the host waits for it.
        """
        unread, self._unread = self._unread, []
        asked = 0.0 if self.stop.signum is None else 1.0
        figures = torch.stack([f for f, _, _ in unread]).flatten()
        values = torch.cat([figures, figures.new_full((1,), asked)])
        dist.all_reduce(values)
        *flat, stops = values.tolist()
        if stops > 0:
            self.stopped_by = self.stop.signum or signal.SIGTERM
        self._report_skipped()
        step_s = (time.perf_counter() - self._window_start) / len(unread)
        real_images = self.stream.batch_size * self.env.world_size * self.t.n_critic
        bpe = self.stream.batches_per_epoch
        rows = []
        for i, (_, step, position) in enumerate(unread):
            c_loss, wasserstein, penalty, g_loss = (v / self.env.world_size for v in flat[4 * i:4 * i + 4])
            row = {"step": step, "epoch": round(position.epoch + position.batch / bpe, 4),
                   "critic_loss": c_loss, "generator_loss": g_loss, "wasserstein": wasserstein,
                   "gradient_penalty": penalty, "step_s": round(step_s, 5),
                   "images_per_s": round(real_images / step_s, 2), "time": round(time.time(), 3), "swd": None}
            if not all(math.isfinite(v) for v in (c_loss, wasserstein, penalty, g_loss)):
                if self.metrics:
                    for good in rows:
                        self.metrics.write(good)
                raise TrainingDiverged(self._diverged_message(row))
            rows.append(row)
        return rows

    def _skipped_updates(self) -> tuple[int, int]:
        """Updates DeepSpeed skipped so far (critic, generator): fp16 gradients that overflowed."""
        return self.critic.skipped_steps, self.generator.skipped_steps

    def _report_skipped(self) -> None:
        """Log the updates fp16's dynamic loss scaling skipped since the last read (:meth:`read_out`). An overflow is not divergence:
        DeepSpeed keeps the weights, lowers the loss scale and training goes on (the first steps overflow
        until the scale fits); only a non-finite loss stops the run."""
        skipped = self._skipped_updates()
        critic, generator = (now - before for now, before in zip(skipped, self.skipped))
        if critic or generator:
            log.info("step %d: fp16 gradients overflowed, so DeepSpeed skipped %d critic and %d generator update(s) "
                     "(loss scale now %g and %g; %d and %d skipped in all)", self.step, critic,
                     generator, self.critic.optimizer.loss_scale, self.generator.optimizer.loss_scale, *skipped)
        self.skipped = skipped

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
        """``RUN/checkpoints/<step>/{generator,critic}/`` (DeepSpeed), ``generator_ema.pt``, ``rng_rank<r>.pt``
        and ``trainer_state.json``; then, after a barrier proves every rank finished, ``latest``, and
        ``best`` when this checkpoint's SWD is the lowest so far."""
        folder = self.run_dir / CHECKPOINTS / str(self.step)
        if self.is_main and folder.exists():
            shutil.rmtree(folder)
        self._barrier()
        try:
            self.generator.save_checkpoint(str(folder), tag="generator", save_latest=False)
            self.critic.save_checkpoint(str(folder), tag="critic", save_latest=False)
            _save_atomic(rng_state(), folder / f"rng_rank{self.env.rank}.pt")
            if self.is_main:
                if self.ema is not None:
                    _save_atomic({"module": self.ema.state_dict()}, ema_weights_path(self.run_dir, self.step))
                state = {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch,
                         "world_size": self.env.world_size, "micro_batch": self.stream.batch_size,
                         "seed": self.t.seed, "preset": self.t.preset, "swd": swd, "ema": self.ema is not None,
                         "saved": schema.now_utc()}
                atomic_write_text(folder / TRAINER_STATE, json.dumps(state, indent=2) + "\n")
        except (OSError, RuntimeError) as err:  # a full disk; torch reports it as "unexpected pos ..."
            raise CheckpointError(self._unsaved_message(folder, err)) from err
        self._barrier()
        if self.is_main:
            atomic_write_text(self.run_dir / CHECKPOINTS / LATEST, f"{self.step}\n")
            if swd is not None and swd < self.best_swd:
                self.best_swd = swd
                atomic_write_text(self.run_dir / CHECKPOINTS / BEST, f"{self.step}\n")
            self._prune()
            log.info("step %d: checkpoint %s", self.step, folder)

    def _unsaved_message(self, folder: Path, err: BaseException) -> str:
        usage = shutil.disk_usage(self.run_dir)
        latest = read_latest(self.run_dir)
        kept = (f"{self.run_dir / CHECKPOINTS / LATEST} still names step {latest}; free space and continue with "
                "--resume" if latest is not None else "no earlier checkpoint exists")
        reason = " ".join(str(err).split())[:200]
        return (f"cannot write checkpoint {self.step} to {folder} ({type(err).__name__}: {reason}; "
                f"{usage.free / 2**30:.2f} GiB free there): training stopped; {kept}")

    def _repoint(self, step: int) -> None:
        """After resuming from ``step`` (an older checkpoint when the newest could not be loaded), ``latest``
        names it, and ``best`` the best loadable one left, so that a stop before the next save reports and
        resumes from what is really there."""
        root = self.run_dir / CHECKPOINTS
        if read_latest(self.run_dir) != step:
            atomic_write_text(root / LATEST, f"{step}\n")
        best, _ = usable_checkpoint(self.run_dir, BEST)
        if best is None:
            (root / BEST).unlink(missing_ok=True)
        elif read_latest(self.run_dir, BEST) != best:
            atomic_write_text(root / BEST, f"{best}\n")

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
        if self.ema is not None:
            saved_average = ema_weights_path(self.run_dir, step)
            if saved_average.is_file():
                self.ema.load_state_dict(torch.load(saved_average, map_location=self.device,
                                                    weights_only=True)["module"])
            else:
                log.warning("checkpoint %d holds no averaged generator (written without one): the average "
                            "starts from its weights", step)
                self.ema.load_state_dict(self.generator.module.state_dict())
        self.step = int(state["step"])
        self.phases.critic_steps = self.step * self.t.n_critic
        self.position = Position(int(state["epoch"]), int(state["batch"]))
        set_rng_state(torch.load(folder / f"rng_rank{self.env.rank}.pt", weights_only=True))
        self._barrier()
        if self.is_main:
            for stale in checkpoint_steps(self.run_dir, complete_only=False):
                if stale > step:
                    shutil.rmtree(self.run_dir / CHECKPOINTS / str(stale), ignore_errors=True)
            self._repoint(step)
        best = read_latest(self.run_dir, BEST)
        if best is not None and best <= step:
            saved = recorded_swd(self.run_dir, best)
            self.best_swd = math.inf if saved is None else saved
        log.info("resumed from step %d (epoch %d, micro-batch %d)", self.step, self.position.epoch,
                 self.position.batch)

    # ---------------------------------------------------------------- watching

    def measure_swd(self) -> float | None:
        """SWD (x1e3, mean over pyramid levels; ``brats_gan.metrics``) between a fixed noise batch's images
        (of the averaged generator, when there is one: what `generate` samples by default) and evenly spaced
        real images of the store, at model size (rank 0; None elsewhere or when off). Like the sample grid
        it runs in eval mode under a forked RNG, so it never changes training."""
        if not self.is_main or not self.swd_images:
            return None
        from brats_gan.metrics import swd_distance

        if self._swd_real is None:
            picks = np.linspace(0, self.stream.n_samples - 1, self.swd_images).round().astype(np.int64)
            self._swd_real = self.stream.transform(self.stream.read(picks)).float()
        fake = self.generate(self.swd_noise)
        return float(swd_distance(self._swd_real, fake, seed=self.t.seed)["mean"])

    def generate(self, noise: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """The sampled generator's images for ``noise`` (float32, on the CPU): the averaged one when there is
        one (kept in fp32), else the trained one; in eval mode and under a forked RNG, so that drawing
        samples or measuring them never changes the training's random stream."""
        module = self.generator.module if self.ema is None else self.ema.module
        dtype = self.dtype if self.ema is None else torch.float32
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            was_training = module.training
            module.eval()
            try:
                return torch.cat([module(z.to(self.device, dtype)).float().cpu() for z in noise.split(batch)])
            finally:
                module.train(was_training)

    def sample_grid(self) -> None:
        """The generator on the fixed noise batch -> ``RUN/samples/step_<step>.png`` (rank 0)."""
        if self.is_main:
            save_grid(self.generate(self.fixed_noise).numpy(), self.run_dir / "samples" / f"step_{self.step:07d}.png")


def _save_atomic(obj: Any, path: Path) -> None:
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _versions() -> dict[str, str]:
    import deepspeed

    from brats_gan import __version__

    return {"brats_gan": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}


# ==================================================================================== one run


def run_training(given: dict[tuple[str, str], Any], out: str, resume: bool | str, env: DistEnv) -> Trainer:
    """Validate everything on every rank, then join the process group, train and leave it; the Trainer as it
    ended (finished, or stopped by a signal: ``stopped_by``). ``given`` holds the options set by the user,
    keyed by ``train_config.FLAGS``' (section, field); ``resume`` is False, True or "auto". Raises
    ``ConfigError`` before any rank writes anything, then ``TrainingDiverged``, ``CheckpointError`` or
    ``DeviceOutOfMemory``."""
    resume, moving_aside = resolve_resume_auto(out, resume, ("data", "store") in given)
    options = build_options(given, out, resume, env.world_size)
    resume_step = check_run_folder(options, env.world_size, moving_aside)
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
        if moving_aside:
            if env.rank == 0:
                log.warning("--resume auto: %s never finished a checkpoint (the run stopped before its first); "
                            "moved to %s, starting again", options.checkpoint.out, move_aside(options.checkpoint.out))
            dist.barrier()
        if options.data.verify:
            check_store_on_ranks(options.data.store, env)
        with run_folder_lock(options.checkpoint.out, env), StopRequest() as stop:
            trainer = Trainer(options, env, device, stream, resume_step, stop)
            trainer.fit()
    except (TrainingDiverged, CheckpointError):
        raise
    except RuntimeError as err:  # torch.OutOfMemoryError, and cuBLAS/cuDNN allocation failures
        if not is_out_of_memory(err):
            raise
        raise DeviceOutOfMemory(out_of_memory_message(err, device, options.training.micro_batch)) from err
    finally:
        shutdown_distributed(env)
    return trainer


def stopped_message(trainer: Trainer) -> str:
    """What a stop by signal kept, and how to go on."""
    name = signal.Signals(trainer.stopped_by).name
    latest = read_latest(trainer.run_dir)
    if latest is None:
        kept = f"no checkpoint was written yet; move {trainer.run_dir} away and start again"
    elif latest == trainer.step:
        kept = f"checkpoint {latest} holds it; continue with --resume"
    else:
        kept = (f"{trainer.run_dir / CHECKPOINTS / LATEST} names step {latest}; continue with --resume "
                f"(steps {latest + 1}-{trainer.step} are redone)")
    return f"stopped by {name} after step {trainer.step}: {kept}"


@contextlib.contextmanager
def run_folder_lock(run_dir: str, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds the run folder's lock (``brats_gan.locks``) for the whole run; when another process
    holds it, every rank refuses together, naming that process."""
    with contextlib.ExitStack() as stack:
        refusal = [None]
        if env.rank == 0:
            try:
                stack.enter_context(locks.exclusive(run_dir, "brats_gan.train"))
            except locks.Busy as err:
                refusal = [str(err)]
        dist.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise ConfigError(f"--out {refusal[0]}")
        yield


def check_store_on_ranks(store: str, env: DistEnv) -> None:
    """Every shard of the store read and checked once before training (``brats_gan.verify``), each rank
    its own share, and the findings shared so that every rank refuses the same damaged store together."""
    from brats_gan.verify import check_store

    report = check_store(store, rank=env.rank, world_size=env.world_size,
                         threads=len(os.sched_getaffinity(0)) // max(1, env.local_world_size))
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, report.problems)
    report.problems = sorted(p for part in gathered for p in part)
    log.info("checked %s: %d shards on %d rank(s) in %.1f s (%s)", store, report.shards, env.world_size, report.seconds,
             "pixels and checksums" if report.checksums else "pixels; no checksums recorded")
    if not report.ok:
        raise ConfigError(f"--store {report.describe()}; `brats-gan info --verify {store}` lists every problem")


def is_out_of_memory(err: BaseException) -> bool:
    """The device ran out of memory: torch's own error, or a library's allocation failure that torch reports
    as a plain RuntimeError ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def out_of_memory_message(err: BaseException, device: str, micro_batch: int) -> str:
    """The device's out-of-memory error as a user can act on it: which micro-batch did not fit, and the knob."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    smaller = f" (e.g. {micro_batch // 2})" if micro_batch >= 4 else ""
    return (f"out of memory on {device} with a micro-batch of {micro_batch} per rank ({first}); lower "
            f"train_micro_batch_size_per_gpu in --deepspeed-config{smaller}, or use more ranks")
