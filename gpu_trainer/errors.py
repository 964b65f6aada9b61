"""The one exception type the trainer turns into a single clear error line and a non-zero exit."""

from __future__ import annotations


class TrainerError(Exception):
    """A problem with the trainer's inputs (data, options, checkpoints) the user must fix.

    ``main()`` prints it as one line (``gpu_trainer: error: ...``) and exits with status 2, so the
    Airflow task log shows the cause instead of a traceback.
    """


def one_line(err: BaseException) -> str:
    """The error's message on one line (library messages, e.g. torch's, span several)."""
    return " ".join(str(err).split())
