"""Operators per WGAN iteration, counted on any machine: what a GPU would launch, and where the host waits.

On a GPU the loop is bound by launching operators, not by arithmetic (issue 18: 1.6 % of an H200), and
each operator that does work is at least one kernel launch, 10-20 µs of host time in eager PyTorch. So
the iteration's cost on a GPU can be read off a count of its aten operators, which any CPU can make: a
``TorchDispatchMode`` (as torch's ``FlopCounterMode`` and ``brats_gan.models.FlopCount``) sees every
operator that reaches the dispatcher below autograd, forward, backward and double backward alike.

Sides, each warmed up for one iteration (the optimisers build their state lazily), then one iteration
counted:

- ``trainer``: one call of ``Trainer.train_step`` on a real :class:`brats_gan.train.Trainer` (rank 0 of 1,
  as ``train_step.py`` joins the process group), over a small random store written through
  ``brats_gan.store_writer`` at the model's size: the preset's recipe (or ``--recipe``), so DiffAugment and
  ``n_critic`` as a run of that preset has them, the critic's instance noise, the averaged generator's
  update, without the figures' readout, which the trainer does once per ``--log-every`` steps (counted
  apart, for one step's figures: ``per_read``). Its micro-batches are the loader's (one float16
  channel, as stored), read before counting: the loader's work runs on the host (in workers on a GPU
  node); ``to_model``'s copy to the device, cast and channel repeat are counted, as a GPU pays them.
- ``deepspeed`` and ``torch``: the bare sides of ``benchmarks/train_step.py`` (WGAN-GP, no DiffAugment,
  no averaged generator, ``n_critic`` 5 unless ``--n-critic``).

What is reported per preset, dtype and side:

- ``ops``: every operator dispatched.
- ``launching_ops``: those that launch work on a GPU: all but :data:`NO_LAUNCH` (views, aliases and
  allocations: a new tensor header or uninitialised memory; header queries and the profiler's range
  markers: host work; no kernel in any of them), the host reads of
  :data:`READ_OPS` that only copy a value back, and ``host_ops``. One operator counts one launch: a
  ``_foreach`` operator launches one kernel per chunk of ~100 tensors, cuDNN's convolutions sometimes
  two or three, so the count is a floor on CUDA's launches.
- ``host_ops``: operators on tensors a CUDA run keeps on the host (see below): no launch.
- ``host_reads``: the host reading tensor values, by kind, split into ``device`` (the tensor lives on the
  GPU in a CUDA run: a device-to-host copy that waits for every queued kernel, a synchronisation) and
  ``host`` (it lives on the host there: no synchronisation). Kinds: ``item``, ``bool``, ``float``,
  ``int``, ``index`` (``__index__``), ``tolist``, ``cpu``, ``numpy`` (hooks on ``torch.Tensor`` while
  counting: ``tolist`` and a CPU tensor's ``cpu()`` never reach the dispatcher), and the operators of
  :data:`READ_OPS` reached otherwise (``nonzero``, ``masked_select``, indexing by a mask, ...: their
  output's size depends on values, so the host waits for them; these also launch work). What a read
  method dispatches itself (on CUDA, ``tolist``'s copy to the host) is part of the read, not a launch.
- ``phases``: the launching operators of each phase (:data:`PHASES`; a share is the count over
  ``launching_ops``), attributed by thin wrappers that the benchmark sets on the instances it counts
  (``WGANLoss``'s methods and callables, the critic engine's ``backward``, ``Tensor.backward``, the
  averaged generator's ``update``); the library is not changed for it.

On a CPU every tensor is on the CPU, so which ones a CUDA run keeps on the host is known from the code:
torch's Adam keeps its per-parameter ``step`` counters on the host unless it is ``capturable`` or
``fused`` (``torch.optim.adam``: ``_init_group``), and reads them with ``.item()`` for the bias
corrections; ``_foreach_add_`` bumps them there. The counter seeds its set of host tensors with those
counters, and an operator whose tensor arguments are host tensors or 0-dim ones runs on the host, its
outputs joining the set. Everything else (networks, optimiser moments, data, noise, losses) lives on
the device.

The optimiser counted is the implementation a GPU run uses, not the per-tensor loop a CPU run gets:
``"torch_adam": true`` (every config in ``deepspeed_configs``) makes DeepSpeed build ``torch.optim.Adam``
with ``foreach`` unset, which torch resolves at each step to the ``foreach`` implementation for CUDA
tensors and to the for-loop for CPU ones (``torch.optim.optimizer._default_to_fused_or_foreach``); for
bf16 at ZeRO stage 0 DeepSpeed wraps it in ``FP16_UnfusedOptimizer``, which steps that same Adam on fp32
master copies. ``--optimizer foreach`` (the default) sets ``foreach`` in the param groups of every torch
optimiser of the counted side (DeepSpeed's inner one, and ``train_step.py``'s baseline's) before the
warm-up, so this CPU runs the operators a CUDA run does; ``for-loop`` counts what a CPU run does,
``fused`` what ``fused=True`` would (its ``step`` counters then live on the device).

What differs from a CUDA run: DeepSpeed's CPU accelerator takes its CPU paths (gloo for the all-reduce;
on CUDA, NCCL: one operator either way), and a tensor created from Python data on the device
(``torch.tensor(..., device="cuda")``) is a host-to-device copy on CUDA but an alias here
(``lift_fresh``, a view). Counts do not depend on timing or on the data: DiffAugment and instance
noise draw the same operators whatever their random values, and every side starts from a fixed seed.

``--compile`` counts the critic step of ``--compile`` (``brats_gan.compiled_critic``: forwards, penalty and
both backwards as one function of the critic's weights) on every side, ``torch.compile``'d (``inductor``, the
default) or not (``eager``: torch's ``TORCHDYNAMO_DISABLE``). Eager, the counter sees its operators as any
others (phase ``functional``). Compiled, a ``TorchDispatchMode`` would not see inside inductor's kernels, and
an active one makes the compiled function run uncompiled; so the compiled call runs with the counter's mode
suspended, and what counts is what the compiled graph's generated wrapper (its ``call``) calls, traced with
``sys.setprofile``: each inductor kernel (C++ on a CPU, Triton on CUDA), each extern kernel (convolutions,
matrix products) and each aten operator it falls back to is one launch; its allocations
(``empty_strided``), views (``reinterpret_tensor``) and checks (``assert_size_stride``, ...) are not
(:data:`WRAPPER_NO_LAUNCH`). The compile happens in the warm-up iteration. ``--record`` refuses ``--compile``.

``--record`` writes the results into ``benchmarks/dispatch_counts.json`` (merged by preset, dtype and
side, with the commit measured), the figures ``benchmarks/README.md`` reports and ``tests/test_dispatch.py``
checks; ``--markdown`` prints them as that README's table rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import logging
import subprocess
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from train_step import (
    DTYPES,
    Batches,
    DeepSpeedSide,
    TorchLoop,
    cycle,
    deepspeed_config,
    make_batches,
    stdout_to_stderr,
)

from brats_gan.data import Position, SliceStream, iterate_batches
from brats_gan.distributed import DistEnv, init_distributed, shutdown_distributed
from brats_gan.loss import WGANLoss
from brats_gan.models import PRESETS, get_config
from brats_gan.recipes import RECIPES
from brats_gan.train_config import TrainingConfig, autocast_dtype, build_options, load_deepspeed_config

HERE = Path(__file__).resolve().parent
RECORD = HERE / "dispatch_counts.json"
SIDES = ("trainer", "deepspeed", "torch")
OPTIMIZERS = ("foreach", "for-loop", "fused")

# ------------------------------------------------------------------------------------ what launches

# A view or alias: a new tensor header (sizes, strides, offset) over the same storage, no kernel.
# (``reshape``, ``flatten``, ``chunk``, ``contiguous`` and the like are composite: they reach the
# dispatcher as these views, or as a ``clone`` when they must copy, which launches.)
_VIEWS = ("aten::view", "aten::_unsafe_view", "aten::_reshape_alias", "aten::alias", "aten::as_strided",
          "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze",
          "aten::slice", "aten::select", "aten::split", "aten::split_with_sizes", "aten::unbind",
          "aten::chunk", "aten::narrow", "aten::diagonal", "aten::unfold", "aten::view_as_real",
          "aten::view_as_complex", "aten::detach", "aten::lift_fresh", "aten::_conj", "aten::_neg_view",
          "aten::resolve_conj", "aten::resolve_neg")
# The same in place: only the tensor's header changes.
_VIEWS_IN_PLACE = ("aten::unsqueeze_", "aten::squeeze_", "aten::t_", "aten::transpose_", "aten::as_strided_",
                   "aten::detach_", "aten::set_")
# Memory from the caching allocator, not initialised: no kernel.
_ALLOCATIONS = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                "aten::new_empty_strided", "aten::resize_")
# Questions answered on the host: about a tensor's header, or (DeepSpeed's CPU accelerator) the CPU's features.
_QUERIES = ("aten::is_same_size", "aten::_has_compatible_shallow_copy_type", "aten::is_contiguous",
            "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
            "mkldnn::_is_mkldnn_fp16_supported", "mkldnn::_is_mkldnn_bf16_supported")
# The profiler's range markers (``torch.optim`` wraps every ``step`` in ``record_function``): host bookkeeping.
_MARKERS = ("profiler::_record_function_enter", "profiler::_record_function_enter_new",
            "profiler::_record_function_exit")
NO_LAUNCH = frozenset(_VIEWS + _VIEWS_IN_PLACE + _ALLOCATIONS + _QUERIES + _MARKERS)

# Operators whose result the host needs before it can go on: ``_local_scalar_dense`` is the copy of one
# value behind item/bool/float/int (a read, no launch); the others launch work whose output size depends
# on values, so the host waits for it (a read and a launch).
READ_OPS = {"aten::_local_scalar_dense": "item", "aten::nonzero": "nonzero", "aten::masked_select": "masked_select",
            "aten::_unique": "unique", "aten::_unique2": "unique", "aten::unique_dim": "unique",
            "aten::unique_consecutive": "unique", "aten::equal": "equal", "aten::allclose": "allclose",
            "aten::is_nonzero": "bool"}
# Tensor methods that read values on the host, and the kind each counts as.
READ_METHODS = {"item": "item", "tolist": "tolist", "__bool__": "bool", "__float__": "float", "__int__": "int",
                "__index__": "index", "cpu": "cpu", "numpy": "numpy"}

# Phases of an iteration, in the order they run (see _instrument for what each wraps).
PHASES = ("fakes", "augment", "critic_forward", "penalty", "functional", "backward", "optimiser", "generator", "ema",
          "readout")
PHASE_HELP = {
    "fakes": "noise and the generator's no-grad forward that make a critic step's fakes",
    "augment": "DiffAugment of the critic's inputs (its backward is in the backward that differentiates it)",
    "critic_forward": "the critic engine's forwards on the real and fake images (instance noise included), the "
                      "micro-batch's copy to the model and the critic loss around them",
    "penalty": "the gradient penalty: interpolates, the critic's forward on them, autograd.grad with "
               "create_graph, the norm",
    "functional": "--compile's critic step: forwards, penalty and both backwards in one function (compiled: the "
                  "kernels its generated wrapper calls)",
    "backward": "the critic loss's backward (through the penalty's double backward) and DeepSpeed's gradient "
                "all-reduce",
    "optimiser": "the critic's optimiser step: Adam, and DeepSpeed's or the baseline's work around it",
    "generator": "the whole generator step: noise, forward through the frozen critic, backward, Adam",
    "ema": "the averaged generator's update",
    "readout": "the step's figures stacked on the device (all-reduced and read back once per --log-every steps: "
               "per_read)",
}
STICKY = frozenset({"generator", "ema"})  # everything inside them stays theirs


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside, by phase, and the host's reads of tensor values (see the
    module docstring); ``host_tensors`` are those a CUDA run keeps on the host."""

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.current = PHASES[-1]
        self.ops = 0
        self.host_ops = 0
        self.launching: Counter[str] = Counter()
        self.by_op: Counter[str] = Counter()
        self.reads: dict[str, Counter[str]] = {"device": Counter(), "host": Counter()}
        self._host: dict[int, weakref.ref] = {}
        self._reading = False
        for t in host_tensors:
            self._mark_host(t)

    # -------------------------------------------------------------- where tensors live

    def _mark_host(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            self._host[ptr] = weakref.ref(t)

    def on_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(t.untyped_storage().data_ptr())
        return ref is not None and ref() is not None

    def _runs_on_host(self, tensors: list[torch.Tensor]) -> bool:
        """An operator on host tensors and 0-dim ones (scalars, which CUDA operators take from the host too)."""
        host = [self.on_host(t) for t in tensors]
        return any(host) and all(h or t.dim() == 0 for h, t in zip(host, tensors))

    # -------------------------------------------------------------- counting

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous = self.current
        if previous not in STICKY:
            self.current = name
        try:
            yield
        finally:
            self.current = previous

    def read(self, kind: str, t: torch.Tensor) -> None:
        self.reads["host" if self.on_host(t) else "device"][kind] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops += 1
        if self._reading:  # the copy behind a read method (on CUDA, tolist's and cpu()'s to the host): the read
            return out
        if name in READ_OPS or _indexes_by_mask(name, args):
            if tensors:
                self.read(READ_OPS.get(name, "index by mask"), tensors[0])
            if name == "aten::_local_scalar_dense":
                return out
        if name in NO_LAUNCH:
            return out
        if self._runs_on_host(tensors):
            self.host_ops += 1
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._mark_host(t)
            return out
        self.launching[self.current] += 1
        self.by_op[name] += 1
        return out

    def result(self) -> dict[str, Any]:
        return {"ops": self.ops, "launching_ops": sum(self.launching.values()), "host_ops": self.host_ops,
                "host_reads": {where: dict(sorted(c.items())) for where, c in self.reads.items()},
                "phases": {p: self.launching[p] for p in PHASES}}


# What a compiled graph's generated wrapper calls that launches nothing: allocations, views, checks, streams.
WRAPPER_NO_LAUNCH = ("empty_strided", "reinterpret_tensor", "assert_size_stride", "assert_alignment", "list.clear",
                     "get_raw_stream", "DeviceGuard", "device_guard", "_cuda_getCurrentRawStream")


def _inductor_wrapper(code: Any) -> bool:
    return code.co_name == "call" and "inductor" in code.co_filename


@contextlib.contextmanager
def counting_compiled(counter: OpCounter) -> Iterator[None]:
    """Inside: no dispatch mode (the compiled code runs compiled), and each call the generated wrapper of a
    compiled graph makes is counted as a launch of ``counter``'s current phase, unless it is one of
    :data:`WRAPPER_NO_LAUNCH` (see the module docstring)."""
    from torch.utils._python_dispatch import _disable_current_modes

    def name(frame: Any, event: str, arg: Any) -> str | None:
        if event == "c_call" and _inductor_wrapper(frame.f_code):
            return getattr(arg, "__qualname__", None) or getattr(arg, "__name__", "?")
        if event == "call" and frame.f_back is not None and _inductor_wrapper(frame.f_back.f_code):
            target = frame.f_locals.get("self")
            op = getattr(target, "_name", None) or getattr(target, "__name__", None)
            return f"{frame.f_code.co_qualname} {op}" if op else frame.f_code.co_qualname
        return None

    def profile(frame: Any, event: str, arg: Any) -> None:
        called = name(frame, event, arg)
        if called is None or any(part in called for part in WRAPPER_NO_LAUNCH):
            return
        counter.ops += 1
        counter.launching[counter.current] += 1
        counter.by_op[f"inductor: {called}"] += 1

    with _disable_current_modes():
        previous = sys.getprofile()
        sys.setprofile(profile)
        try:
            yield
        finally:
            sys.setprofile(previous)


def _indexes_by_mask(name: str, args: tuple) -> bool:
    """``x[mask]`` (``index``/``index_put_`` with a boolean index): the kernel finds the mask's true places first."""
    if name not in ("aten::index", "aten::index_put_", "aten::_index_put_impl_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


@contextlib.contextmanager
def counting(counter: OpCounter) -> Iterator[OpCounter]:
    """``counter`` active, with ``torch.Tensor``'s value-reading methods reporting to it and
    ``Tensor.backward`` marking the backward phase; everything restored after."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in (*READ_METHODS, "backward")}

    def reading(name: str, kind: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._reading:
                return original(self, *args, **kwargs)
            counter.read(kind, self)
            counter._reading = True
            try:
                return original(self, *args, **kwargs)
            finally:
                counter._reading = False

        return read

    backward = torch.Tensor.backward

    @functools.wraps(backward)
    def marked_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with counter.phase("backward"):
            return backward(self, *args, **kwargs)

    try:
        for name, kind in READ_METHODS.items():
            setattr(torch.Tensor, name, reading(name, kind))
        torch.Tensor.backward = marked_backward
        with counter:
            yield counter
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def _instrument(counter: OpCounter, phases: WGANLoss, critic_engine: Any = None, ema: Any = None) -> Iterator[None]:
    """Phase wrappers on these instances for the counted call (the innermost phase wins, except inside
    :data:`STICKY` ones); removed after."""
    wrapped: list[tuple[Any, str, Any, bool]] = []

    def wrap(obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)
        own = name in vars(obj)

        def call(*args: Any, **kwargs: Any) -> Any:
            with counter.phase(phase):
                return original(*args, **kwargs)

        setattr(obj, name, call)
        wrapped.append((obj, name, original, own))

    for name, phase in (("iteration", "readout"), ("critic_step", "critic_forward"), ("critic", "critic_forward"),
                        ("noise", "fakes"), ("generator_module", "fakes"), ("augment", "augment"),
                        ("gradient_penalty", "penalty"), ("update_critic", "optimiser"),
                        ("generator_step", "generator")):
        wrap(phases, name, phase)
    step = getattr(phases, "functional_step", None)
    if step is not None:
        wrap(step, "_step", "functional")
        if step.compiled and not torch._dynamo.config.disable:
            counted = step._step

            def compiled(*args: Any, **kwargs: Any) -> Any:
                with counting_compiled(counter):
                    return counted(*args, **kwargs)

            step._step = compiled
    if critic_engine is not None:
        wrap(critic_engine, "backward", "backward")
    if ema is not None:
        wrap(ema, "update", "ema")
    try:
        yield
    finally:
        for obj, name, original, own in reversed(wrapped):
            if own:
                setattr(obj, name, original)
            else:
                delattr(obj, name)


# ------------------------------------------------------------------------------------ the sides


def torch_optimizers(side: Any) -> list[torch.optim.Optimizer]:
    """The torch optimisers that step a side's networks (DeepSpeed's basic optimiser under any wrapper)."""
    if isinstance(side, TorchLoop):
        return list(side.optimizers.values())
    return [engine.basic_optimizer for engine in (side.generator, side.critic)]


def choose_optimizer(optimizers: list[torch.optim.Optimizer], implementation: str) -> None:
    """Set the Adam implementation of every param group (before its first step: ``fused`` decides where the
    step counters are made)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["foreach"] = implementation == "foreach"
            group["fused"] = implementation == "fused"


def host_step_counters(optimizers: list[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Adam's ``step`` counters that a CUDA run keeps on the host (neither capturable nor fused)."""
    counters = []
    for opt in optimizers:
        for group in opt.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    counters.append(step)
    return counters


def write_random_store(path: Path, image_size: int, samples: int, seed: int) -> Path:
    """A complete one-channel store (float16, at the model's size) of random slices in [-1, 1]."""
    import zarr

    from brats_gan import schema, store_writer
    from brats_gan.verify import shard_checksum

    image = (np.random.default_rng(seed).uniform(-1, 1, (samples, 1, image_size, image_size))).astype(np.float16)
    store_writer.write_skeleton(str(path), channels=("flair",), size=image_size, shard=samples,
                                subject=["BENCH-00000"] * samples,
                                attrs=store_writer.new_attrs(params={"benchmark": "dispatch.py"}, synthetic=True))
    zarr.open_group(str(path), mode="r+", use_consolidated=False)[schema.IMAGE][:] = image
    store_writer.seal(str(path), shard_crc32=[shard_checksum(image)])
    return path


def build_trainer(args: argparse.Namespace, dtype_name: str, device: str, work: Path) -> tuple[Any, Batches, int]:
    """A real Trainer of the preset as ``brats-gan train`` builds it, over a random store; its micro-batches
    as its loader delivers them, read into memory; and its ``n_critic``."""
    from brats_gan.train import Trainer

    size = get_config(args.preset).image_size
    samples = max(16, 2 * args.batch_size)
    store = write_random_store(work / "store.zarr", size, samples, args.seed)
    config_path = work / "deepspeed.json"
    config_path.write_text(json.dumps(deepspeed_config(args.preset, dtype_name, args.batch_size, recipe=args.recipe)))
    given: dict[tuple[str, str], Any] = {
        ("data", "store"): str(store), ("data", "cache"): "memory", ("data", "verify"): False,
        ("training", "preset"): args.preset, ("training", "seed"): args.seed,
        ("training", "deepspeed_config"): str(config_path),
        ("checkpoint", "swd_images"): 0, ("checkpoint", "sample_every"): 0}
    if args.recipe is not None:
        given[("training", "recipe")] = args.recipe
    if args.n_critic is not None:
        given[("training", "n_critic")] = args.n_critic
    if args.compile is not None:
        given[("training", "compile")] = True
    options = build_options(given, work / "run", resume=False, world_size=1)
    t = options.training
    stream = SliceStream(options.data.store, batch_size=t.micro_batch, image_size=t.model.image_size, seed=t.seed,
                         channels=options.data.channels, cache=options.data.cache)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    trainer = Trainer(options, env, device, stream, resume_step=None)
    loaded = iterate_batches(stream)
    batches = [next(loaded) for _ in range(stream.batches_per_epoch)]
    loaded.close()
    return trainer, endless(batches), t.n_critic


def endless(batches: list[tuple[Position, torch.Tensor]]) -> Batches:
    while True:
        yield from batches


def count_side(args: argparse.Namespace, side: str, dtype_name: str, device: str) -> dict[str, Any]:
    """Build ``side``, warm it up one iteration, count the next."""
    n_critic = args.n_critic if args.n_critic is not None else 5
    config = deepspeed_config(args.preset, dtype_name, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="dispatch_") as tmp, contextlib.ExitStack() as stack:
        ema = None
        if side == "trainer":
            owner, batches, n_critic = build_trainer(args, dtype_name, device, Path(tmp))
            stack.callback(lambda: owner.metrics and owner.metrics.close())
            ema = owner.ema
            step: Callable[[], Any] = lambda: owner.train_step(batches)  # noqa: E731
        else:
            if side == "deepspeed":
                owner = DeepSpeedSide(args.preset, config, device, n_critic, args.batch_size, args.seed,
                                      compile=args.compile is not None)
            else:
                owner = TorchLoop(args.preset, config["optimizer"]["params"], device, DTYPES[dtype_name], n_critic,
                                  TrainingConfig(preset=args.preset).gp_lambda, args.batch_size, args.seed,
                                  compile=args.compile is not None, autocast=autocast_dtype(config))
            data = make_batches(args, get_config(args.preset).image_size, owner.phases.channels, device, 2 * n_critic)
            batches = cycle(data)
            step = lambda: owner.train_step(batches)  # noqa: E731
        engines = owner if side != "torch" else None
        optimizers = torch_optimizers(owner)
        choose_optimizer(optimizers, args.optimizer)
        torch.manual_seed(args.seed + 1)
        step()
        if side == "trainer":
            owner.read_out()
        counter = OpCounter(host_step_counters(optimizers))
        torch.manual_seed(args.seed + 2)
        with _instrument(counter, owner.phases, engines.critic if engines else None, ema), counting(counter):
            step()
        per_read = None
        if side == "trainer":
            reading = OpCounter()
            with counting(reading):
                owner.read_out()
            per_read = {"launching_ops": sum(reading.launching.values()),
                        "host_reads": {w: dict(sorted(c.items())) for w, c in reading.reads.items()}}
        wrapper = type(engines.critic.optimizer).__name__ if engines else "Adam"
        result = {"preset": args.preset, "dtype": dtype_name, "side": side, "n_critic": n_critic,
                  "critic_step": {None: "autograd", "eager": "functional, eager"}.get(args.compile,
                                                                                   "functional, compiled"),
                  "batch_size": args.batch_size, "augment": list(owner.phases.augment_policies),
                  "optimizer": f"{wrapper} ({args.optimizer})" if wrapper == "Adam"
                  else f"{wrapper} over Adam ({args.optimizer})",
                  **counter.result()}
        if per_read is not None:
            result["per_read"] = per_read
        if args.top:
            result["top_ops"] = dict(counter.by_op.most_common(args.top))
    del owner
    gc.collect()
    return result


# ------------------------------------------------------------------------------------ reporting


def commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(results: list[dict[str, Any]], path: Path = RECORD) -> None:
    """Merge ``results`` into the record by (preset, dtype, side), each stamped with the commit and versions."""
    import deepspeed

    saved = json.loads(path.read_text())["results"] if path.exists() else []
    stamp = {"commit": commit(), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
             "deepspeed": deepspeed.__version__}
    fresh = {(r["preset"], r["dtype"], r["side"]): {**r, **stamp} for r in results}
    merged = [r for r in saved if (r["preset"], r["dtype"], r["side"]) not in fresh] + list(fresh.values())
    merged.sort(key=lambda r: (list(PRESETS).index(r["preset"]), list(DTYPES).index(r["dtype"]),
                               SIDES.index(r["side"])))
    note = ("Written by `python benchmarks/dispatch.py --record`: operators per iteration (benchmarks/README.md, "
            "'Operators per iteration'); tests/test_dispatch.py checks the tiny entries. Re-record after a change "
            "that is meant to change them.")
    path.write_text(json.dumps({"_comment": note, "results": merged}, indent=1) + "\n")


def reads_text(reads: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in reads.items()) or "none"


def markdown(results: list[dict[str, Any]]) -> str:
    """``benchmarks/README.md``'s two tables: totals and reads, then each phase's launching operators."""
    head = "| preset | dtype | side | micro-batch | n_critic |"

    def lead(r: dict[str, Any]) -> str:
        return f"| {r['preset']} | {r['dtype']} | {r['side']} | {r['batch_size']} | {r['n_critic']} |"

    lines = [f"{head} ops | launching | on host | reads of device tensors (syncs) | reads of host tensors |",
             "| --- " * 10 + "|"]
    for r in results:
        lines.append(f"{lead(r)} {r['ops']:,} | {r['launching_ops']:,} | {r['host_ops']:,} | "
                     f"{reads_text(r['host_reads']['device'])} | {reads_text(r['host_reads']['host'])} |")
    lines += ["", f"{head} " + " | ".join(PHASES) + " |", "| --- " * (5 + len(PHASES)) + "|"]
    for r in results:
        share = [f"{r['phases'][p]:,} ({r['phases'][p] / max(r['launching_ops'], 1):.0%})"
                 if r["phases"].get(p) else "-" for p in PHASES]
        lines.append(f"{lead(r)} " + " | ".join(share) + " |")
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        launching = r["launching_ops"]
        lines.append(f"{r['preset']} {r['dtype']} {r['side']} ({r.get('critic_step', 'autograd')} critic step, "
                     f"n_critic {r['n_critic']}, micro-batch "
                     f"{r['batch_size']}, augment {','.join(r['augment']) or 'none'}, {r['optimizer']}): "
                     f"{r['ops']:,} ops, {launching:,} launching, {r['host_ops']:,} on the host")
        lines.append(f"    reads of device tensors (synchronisations): {reads_text(r['host_reads']['device'])}; "
                     f"of host tensors: {reads_text(r['host_reads']['host'])}")
        lines.append("    " + ", ".join(f"{p} {n:,} ({n / max(launching, 1):.0%})"
                                        for p, n in r["phases"].items() if n))
        if "per_read" in r:
            read = r["per_read"]
            lines.append(f"    and once per --log-every steps, the figures' read: {read['launching_ops']} launching, "
                         f"reads of device tensors: {reads_text(read['host_reads']['device'])}")
        for op, n in r.get("top_ops", {}).items():
            lines.append(f"      {n:6,}  {op}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1)
    device = init_distributed(env)
    if args.batch_size is None:
        args.batch_size = int(load_deepspeed_config(None, args.preset, 1)["train_micro_batch_size_per_gpu"])
    args.store = None  # make_batches: random micro-batches
    if args.compile == "eager":
        torch._dynamo.config.disable = True  # what TORCHDYNAMO_DISABLE=1 sets: compiled functions run as written
    try:
        return [count_side(args, side, dtype, device) for dtype in args.dtype for side in args.side]
    finally:
        shutdown_distributed(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model preset")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"], help="one or more")
    parser.add_argument("--side", nargs="+", choices=SIDES, default=list(SIDES), help="one or more")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro-batch (default: the preset's DeepSpeed recipe: 8 paper, 4 tiny)")
    parser.add_argument("--n-critic", type=int, default=None,
                        help="critic steps per iteration (default: the recipe's for the trainer, 5 for the bare "
                             "sides as in train_step.py)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="the trainer side's recipe (default: the preset's)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="foreach",
                        help="the torch Adam implementation counted (foreach: what a CUDA run gets)")
    parser.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "eager"], default=None,
                        help="count the trainer's --compile critic step, torch.compile'd (inductor) or not (eager)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=0, help="also list the N most frequent launching operators")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (counts do not depend on it)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON line")
    output.add_argument("--markdown", action="store_true", help="print benchmarks/README.md's table rows")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--record", action="store_true", help=f"merge the results into {RECORD.name}")
    what.add_argument("--from-record", action="store_true",
                      help=f"measure nothing: print what {RECORD.name} holds (all presets)")
    args = parser.parse_args()
    if args.n_critic is not None and args.n_critic < 1:
        parser.error(f"--n-critic must be at least 1, got {args.n_critic}")
    if args.batch_size is not None and args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (batch norm needs two samples), got {args.batch_size}")
    if args.record and args.compile:
        parser.error("--record keeps the default critic step's counts; --compile's are not recorded")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.from_record:
        results = json.loads(RECORD.read_text())["results"]
    else:
        with stdout_to_stderr(args.json or args.markdown):
            results = run(args)
    if args.record:
        record(results)
    if args.json:
        print(json.dumps({"results": results}))
    elif args.markdown:
        print(markdown(results))
    else:
        print(table(results))


if __name__ == "__main__":
    sys.exit(main())
