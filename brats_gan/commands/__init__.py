"""The command-line layer: `brats-gan` / `python -m brats_gan`, one module per subcommand.

Each module in this package exposes ``configure_parser(parser)`` and ``run(args) -> int``; it is the only
code that parses arguments, prints for people and turns the library's exceptions (``brats_gan.errors``)
into exit statuses. The library never imports this package. Modules are imported only when their
subcommand runs, so `brats-gan preprocess` never imports torch. ``python -m brats_gan.train`` (what the
DeepSpeed launcher runs on every rank) is :func:`brats_gan.commands.train.main`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import signal
import sys

from brats_gan.errors import UserError, one_line
from brats_gan.stopping import stop_on_sigterm

# subcommand (and module of this package) -> one-line help
COMMANDS: dict[str, str] = {
    "preprocess": "slice and normalise a BraTS folder into a Zarr store (Dask)",
    "info": "print a store's schema, counts and parameters",
    "preview": "draw a contact sheet PNG of stored slices",
    "demo": "write brain phantoms in a BraTS layout and run the pipeline on them",
    "models": "print the generator and critic of a preset as tables",
    "train": "train the WGAN in one process (use the deepspeed launcher for several)",
    "generate": "write synthetic slices from a checkpoint into a store",
    "evaluate": "compare synthetic with real slices: SWD, FID/KID, memorisation, grid, diversity",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """All subcommands with their help; only the one named in ``argv`` imports its module for options."""
    from brats_gan import __version__

    parser = argparse.ArgumentParser(prog="brats-gan",
                                     description="`brats-gan` / `python -m brats_gan`: one subcommand per stage.")
    parser.add_argument("--version", action="version", version=f"brats_gan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"{__name__}.{name}")
            module.configure_parser(p)
            p.set_defaults(_run=module.run)
    return parser


#: the exit status of a command whose output could not be written (a full disk, a quota): train, generate
EXIT_UNSAVED = 5

#: the exit status of a command whose reader closed its standard output (`brats-gan info STORE | head`):
#: 128 + SIGPIPE, what a shell reports for a Unix tool that the same closed pipe stopped
STDOUT_CLOSED = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a reader that stops reading (``| head``) ends it quietly, as it ends Unix tools."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be caught, not at the interpreter's exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _stdout_gone()


def _stdout_closed() -> bool:
    """True when standard output is a pipe whose reader has gone (poll reports an error on it), so that a
    broken pipe elsewhere (a socket, a child process) is not mistaken for it."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _stdout_gone() -> int:
    """Python's recipe for SIGPIPE: point standard output at /dev/null so that the interpreter's last flush
    at exit does not fail again, and exit quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return STDOUT_CLOSED


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with stop_on_sigterm():
            return int(args._run(args) or 0)
    except UserError as err:
        print(f"brats-gan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # SIGINT, or a stop by another signal that carries its exit status
        status = getattr(err, "exit_status", 130)
        print(f"brats-gan {args.command}: {'interrupted' if status == 130 else f'stopped by {err}'}", file=sys.stderr)
        return status
    except Exception as err:
        if isinstance(err, BrokenPipeError) and _stdout_closed():
            return _stdout_gone()
        if args.verbose:
            raise
        print(f"brats-gan {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
