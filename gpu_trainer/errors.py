"""The one exception type the trainer turns into a single clear error line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class TrainerError(Exception):
    """A problem with the trainer's inputs (data, options, checkpoints) the user must fix.

    ``main()`` prints it as one line (``gpu_trainer: error: ...``) and exits with status 2, so the
    Airflow task log shows the cause instead of a traceback.
    """


class CliParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one :class:`TrainerError` line instead of usage plus
    error, so :func:`run_cli` prints it like every other input error. Shared by every entry point."""

    def error(self, message: str) -> NoReturn:
        raise TrainerError(f"{message} (see --help)")


def one_line(err: BaseException) -> str:
    """The error's message on one line (library messages, e.g. torch's, span several)."""
    return " ".join(str(err).split())


def run_cli(command: Callable[[], object]) -> int:
    """Run a command-line entry point: 0 on success, 2 with one ``gpu_trainer: error:`` line for the
    errors a user must fix (a :class:`TrainerError` or a contract violation); anything else propagates
    with its traceback, since that is a bug.

    :param command: the work to do.
    """
    from gpu_trainer.contract import ContractError

    try:
        command()
    except (TrainerError, ContractError) as err:
        print(f"gpu_trainer: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0
