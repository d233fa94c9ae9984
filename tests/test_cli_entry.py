"""The one command-line entry (`brats-gan`, ``brats_gan.commands.main``) as a shell runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import cli


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("args", [["info", "{store}"], ["info", "{store}", "--verify", "--json"], ["info", "--help"]])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly_with_141(store_factory, args, buffered) -> None:
    """`brats-gan info STORE | head`: the reader goes before the command writes. Unix tools stop there (by
    SIGPIPE: 141 in a shell), with no error line and no traceback; so does every subcommand."""
    store: Path = store_factory(subjects=2, slices=4, size=32)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cli(*(a.format(store=store) for a in args)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # before the command (still importing) has written a byte
    _, err = proc.communicate(timeout=120)
    assert err == "", "nothing on stderr: no 'error: BrokenPipeError', no 'Exception ignored', no traceback"
    # argparse's --help ignores a failed write itself, which only an unbuffered stdout makes at once
    assert proc.returncode == (0 if args[-1] == "--help" and not buffered else 141)
