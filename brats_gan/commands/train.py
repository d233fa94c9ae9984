"""`brats-gan train` and ``python -m brats_gan.train`` (what the DeepSpeed launcher runs on every rank).

On every rank, under the DeepSpeed launcher (one process per GPU, or per CPU slot with gloo)::

    deepspeed --num_gpus N --module brats_gan.train --store S.zarr --out RUN --preset paper \\
        --steps N --checkpoint-every K [--resume [auto]] [--deepspeed-config F] [--seed S]

or in one process without the launcher: ``brats-gan train ...``. The run itself is
:func:`brats_gan.train.run_training`; this module parses, logs per rank and turns its exceptions into exit
statuses: 2 a refused option, 3 diverged, 4 out of device memory, 5 a checkpoint not written, 128+N stopped
by signal N (its last checkpoint kept).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Any

from brats_gan.augment import POLICIES as AUGMENT_POLICIES
from brats_gan.commands import EXIT_UNSAVED
from brats_gan.data import CACHE_MODES
from brats_gan.errors import UserError, one_line
from brats_gan.models import GENERATOR_OUTPUTS, RESIZE_MODES, UPSAMPLES
from brats_gan.recipes import PRESET_RECIPES, RECIPES
from brats_gan.stopping import Stopped, stop_on_sigterm
from brats_gan.train_config import (
    FLAGS,
    LOSSES,
    CheckpointConfig,
    DataConfig,
    TrainingConfig,
)

log = logging.getLogger("brats_gan.train")

DESCRIPTION = "Train the WGAN of the poster with two DeepSpeed data-parallel engines, streaming from the slice store."
EXIT_DIVERGED = 3
EXIT_OUT_OF_MEMORY = 4
EVERY_RANK_ERROR_GRACE_S = 60.0  # how long a node's other ranks leave its first rank to report a shared setting


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``brats-gan train`` and ``python -m brats_gan.train``; defaults live in the dataclasses."""
    d, t, c = DataConfig(store=""), TrainingConfig(), CheckpointConfig(out="")
    run = parser.add_argument_group("run")
    run.add_argument("--store", help="complete slice store (Zarr) to train on")
    run.add_argument("--out", required=True, help="run folder; must not exist unless --resume")
    run.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                     help="continue RUN from RUN/checkpoints/latest; `--resume auto`: continue when RUN has a "
                          "checkpoint, start when it does not exist, move a run folder with no checkpoint aside "
                          "and start again (one command for a first start, a requeue and a resubmission)")
    run.add_argument("--preset", help=f"model preset (default {t.preset}; see `brats-gan models`)")
    run.add_argument("--recipe", choices=RECIPES,
                     help="optimizer and loss settings that go together (brats_gan/recipes.py; flags given here win): "
                          + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items())
                          + " (default: the preset's, " + ", ".join(f"{k}*: {v}" for k, v in PRESET_RECIPES.items()) + ")")
    run.add_argument("--steps", type=int, help=f"generator steps to reach in total (default {t.steps})")
    run.add_argument("--seed", type=int, help=f"seed of weights, noise and data order (default {t.seed})")
    run.add_argument("--upsample", choices=UPSAMPLES,
                     help="the generator's upsampling: transposed 4x4 convolutions (the poster's grid effect), "
                          "resize then 3x3 convolution (Odena et al. 2016), subpixel (3x3 convolution and pixel "
                          "shuffle, ICNR-initialised) or transposed-blur (StyleGAN2's 3x3 transposed convolution "
                          "and [1,3,3,1] filter) (default: the recipe's, else the preset's)")
    run.add_argument("--resize-mode", choices=RESIZE_MODES,
                     help="interpolation of --upsample resize (default: the preset's, nearest)")
    run.add_argument("--critic-mbstd", type=int, metavar="N",
                     help="end the critic with a minibatch standard-deviation feature over groups of N images "
                          "(Karras et al. 2018), against too little variety (default: the recipe's; 0: none)")
    run.add_argument("--generator-dropout", type=float, metavar="P",
                     help="dropout after each of the generator's upsampling layers, the poster's 0.1 (default: the "
                          "recipe's; 0: none). Sampling runs without it")
    run.add_argument("--generator-output", choices=tuple(GENERATOR_OUTPUTS),
                     help="the generator's last activation: tanh (Table I) or hardtanh, which reaches the real "
                          "slices' flat -1 background exactly (default: the recipe's, else tanh)")
    run.add_argument("--compile", action="store_true", default=None,
                     help="run each critic step (its forwards, gradient penalty and both backwards) as one "
                          "torch.compile'd function: far fewer operators per step, after a first compile of a "
                          "minute or more; WGAN-GP in fp32 or bf16, not with a batch-norm critic (the faithful "
                          "presets). Instance noise is drawn by the compiled code's own generator")
    run.add_argument("--deepspeed-config", metavar="JSON",
                     help="DeepSpeed config for both engines (default: the recipe's Adam in fp32, micro-batch 8; "
                          "the tiny presets use deepspeed_configs/tiny.json's micro-batch of 4); bf16: "
                          "deepspeed_configs/paper_bf16.json (bf16 weights) or paper_bf16_autocast.json (fp32 "
                          "weights, bf16 forwards, no host read per step)")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--loss", choices=LOSSES, help=f"default {t.loss}")
    loss.add_argument("--n-critic", type=int, help="critic steps per generator step (default: the recipe's)")
    loss.add_argument("--gp-lambda", type=float, help="gradient-penalty weight (default: the recipe's)")
    loss.add_argument("--gp-every", type=int,
                      help="lazy regularisation: the gradient penalty on every N-th critic step only, weighted N "
                           "times (StyleGAN2); its double backward is most of a step's work (default: the recipe's, 1)")
    loss.add_argument("--clip-value", type=float, help=f"wgan-clip weight bound (default {t.clip_value})")
    loss.add_argument("--augment", metavar="POLICIES",
                      help="DiffAugment of the critic's real and fake inputs: comma-separated "
                           f"{','.join(AUGMENT_POLICIES)}, or all, or none (the poster's own training) (default: the recipe's; "
                           "translation,cutout lowered the SWD on 384 phantom slices by 9-44%%, but leaves a faint 4 px grid)")
    loss.add_argument("--augment-p", type=float, metavar="P",
                      help="probability of each policy per image (default: the recipe's)")
    loss.add_argument("--ema-images", type=int, metavar="N",
                      help=f"half-life, in generated images, of the averaged generator used for samples, the "
                           f"checkpoint SWD, `best` and `generate` (default {t.ema_images}; 0: none, sample the "
                           "trained weights); it changes nothing that is trained")
    loss.add_argument("--ema-rampup", type=float, metavar="R",
                      help=f"the averaging half-life is at most R x the images generated so far, so early weights "
                           f"fade fast (default {t.ema_rampup}; 0: no ramp-up)")
    data = parser.add_argument_group("data")
    data.add_argument("--channels", nargs="+", metavar="NAME",
                      help="one stored channel (repeated to 3) or three (default: the store's only one or three)")
    data.add_argument("--cache", choices=CACHE_MODES,
                      help=f"keep the store in memory (auto: if <= 256 MiB) (default {d.cache})")
    data.add_argument("--no-verify-store", dest="verify_store", action="store_false", default=None,
                      help="skip the check of every shard at start (present, finite, in range, checksums): "
                           "for a store just verified with `brats-gan info --verify`")
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
    ck.add_argument("--log-every", type=int,
                    help=f"steps between the host's reads of the losses (metrics.csv gets every step's, in one "
                         f"read per this many steps: a GPU runs ahead until then); a stop by signal or a non-finite "
                         f"loss takes effect at such a step, and at every checkpoint and sample (default {c.log_every})")
    ck.add_argument("--checkpoint-on-signal", action="store_true", default=None,
                    help="on SIGTERM, SIGINT or SIGUSR1, checkpoint the step at which the run stops; without it "
                         "the run stops at that step boundary and keeps its last checkpoint (launch/train_slurm.sh: "
                         "--signal=B:USR1@300 requeues the job, whose SIGTERM then saves the step)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def given_options(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    """The options the user set, keyed by ``train_config.FLAGS``' (section, field); the rest keep the run's
    or the dataclasses' defaults."""
    given = {}
    for flag, key in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            given[key] = tuple(value) if isinstance(value, list) else value
    return given


def run(args: argparse.Namespace) -> int:
    """One rank's run: its log set up, the run trained or refused, and the exit status that says how it ended."""
    from brats_gan.distributed import DistEnv, configure_logging
    from brats_gan.train import (
        CheckpointError,
        DeviceOutOfMemory,
        TrainingDiverged,
        run_training,
        stopped_message,
    )

    env = DistEnv.from_environ(getattr(args, "local_rank", None))
    configure_logging(env, bool(getattr(args, "verbose", False)))
    try:
        trainer = run_training(given_options(args), args.out, args.resume, env)
    except TrainingDiverged as err:
        log.error("%s", err)
        return EXIT_DIVERGED
    except CheckpointError as err:
        log.error("%s", err)
        return EXIT_UNSAVED
    except DeviceOutOfMemory as err:
        log.error("%s", err)
        return EXIT_OUT_OF_MEMORY
    if trainer.stopped_by is not None:
        if trainer.is_main:
            log.warning("%s", stopped_message(trainer))
        return 128 + trainer.stopped_by
    log.info("done: %s at step %d", trainer.run_dir, trainer.step)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m brats_gan.train``: errors as one line prefixed with the rank that hit them (rank 0 bare)."""
    parser = argparse.ArgumentParser(prog="python -m brats_gan.train", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    configure_parser(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank not in (None, "0") else ""
    try:
        with stop_on_sigterm():
            return run(args)
    except UserError as err:
        local_rank = os.environ.get("LOCAL_RANK", str(args.local_rank or 0))
        if getattr(err, "every_rank", False) and local_rank != "0":
            # A launcher setting every rank shares (distributed.LaunchError): the node's first rank says it. Exiting
            # first would let the launcher kill that rank before it speaks, so wait for the launcher to end this
            # one, and speak only if it never does (not started by a launcher).
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(EVERY_RANK_ERROR_GRACE_S)
        print(f"brats_gan.train{where}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C twice, or SIGTERM before training started (stopping.Stopped)
        print(f"brats_gan.train: {'stopped by ' + str(err) if isinstance(err, Stopped) else 'interrupted'}",
              file=sys.stderr)
        return getattr(err, "exit_status", 130)
    except Exception as err:
        if args.verbose:
            raise
        print(f"brats_gan.train{where}: error: {one_line(err)}", file=sys.stderr)
        return 1
