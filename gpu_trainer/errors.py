"""The one exception type the trainer turns into a single clear error line and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class TrainerError(Exception):
    """A problem with the trainer's inputs (data, options, checkpoints) the user must fix.

    ``main()`` prints it as one line (``gpu_trainer: error: ...``) and exits with status 2, so the
    Airflow task log shows the cause instead of a traceback.
    """


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
