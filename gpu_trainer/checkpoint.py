"""Checkpoints that survive a SIGKILL: written atomically, the last K kept, the newest valid one resumed.

A checkpoint is one ``torch.save`` file holding the model, optimizer and grad-scaler states, the position
(epoch, step within it, global step), every RNG state, the metric history, the resolved config and the
MLflow run id. It holds only tensors and plain Python values so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from gpu_trainer.config import MATH_FIELDS
from gpu_trainer.errors import TrainerError

log = logging.getLogger("gpu_trainer")

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


def checkpoint_name(global_step: int) -> str:
    """File name for a checkpoint at ``global_step`` (zero-padded so names sort by step)."""
    return f"ckpt-{global_step:09d}.pt"


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint paths in ``directory``, newest (highest step) first."""
    if not os.path.isdir(directory):
        return []
    names = [name for name in os.listdir(directory) if _NAME.match(name)]
    return [os.path.join(directory, name) for name in sorted(names, reverse=True)]


def save_checkpoint(directory: str, state: Mapping[str, Any], *, global_step: int, keep: int) -> str:
    """Write ``state`` atomically (temp file, fsync, rename) and prune all but the newest ``keep``.

    A crash mid-write leaves only a ``.tmp`` file that is never mistaken for a checkpoint.

    :param directory: the checkpoint directory (created if needed).
    :param state: the checkpoint dict.
    :param global_step: optimizer steps so far; orders checkpoints.
    :param keep: how many checkpoints to keep.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, checkpoint_name(global_step))
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state, format_version=FORMAT_VERSION), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in list_checkpoints(directory)[keep:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    return final


def snapshot(value: Any, pinned: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """A host-memory copy of ``value`` (tensors copied, containers rebuilt) that training cannot mutate.

    ``state_dict()`` returns the live parameter and optimizer tensors; the next optimizer step would
    change them under a background writer.

    :param value: the state (nested dicts, lists, tuples, tensors, plain values).
    :param pinned: reusable page-locked buffers for CUDA tensors, keyed by position, shape and dtype. A
        device-to-host copy into pinned memory runs at full PCIe/NVLink speed and asynchronously; into
        fresh pageable memory it is several times slower. The caller synchronizes once at the end.
    """

    def copy(item: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(item, torch.Tensor):
            if pinned is None or item.device.type != "cuda":
                return item.detach().to("cpu", copy=True)
            key = (path, tuple(item.shape), item.dtype)
            buffer = pinned.get(key)
            if buffer is None:
                buffer = pinned[key] = torch.empty(item.shape, dtype=item.dtype, pin_memory=True)
            return buffer.copy_(item.detach(), non_blocking=True)
        if isinstance(item, Mapping):
            return {key: copy(sub, (*path, key)) for key, sub in item.items()}
        if isinstance(item, list | tuple):
            items = [copy(sub, (*path, i)) for i, sub in enumerate(item)]
            return items if isinstance(item, list) else tuple(items)
        return item  # numbers, strings, None: immutable

    return copy(value, ())


class CheckpointWriter:
    """Writes checkpoints on a background thread so training does not wait for the disk.

    ``submit`` copies the state to host memory (milliseconds; a D2H copy on CUDA), then the write
    (serialize, fsync, rename, prune: seconds for a large model) overlaps the next training steps. One
    write is in flight at a time: ``submit`` first waits for the previous one, so checkpoints land in
    order and host memory holds at most one extra copy. A failed write is raised from the next
    ``submit`` or ``wait``: training never carries on believing a checkpoint exists when it does not.
    Atomicity is unchanged: a kill mid-write leaves the previous checkpoint as the newest valid one.

    :param directory: the checkpoint directory.
    :param keep: how many checkpoints to keep.
    :param on_saved: called on the writer thread with the path and the state once a checkpoint is on disk.
    """

    def __init__(
        self, directory: str, *, keep: int, on_saved: Callable[[str, Mapping[str, Any]], None] | None = None
    ) -> None:
        self.directory = directory
        self.keep = keep
        self.on_saved = on_saved
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Reused for every checkpoint: safe because a snapshot is only taken once the previous write
        # (the only reader of these buffers) has finished.
        self._pinned: dict[tuple[Any, ...], torch.Tensor] | None = {} if torch.cuda.is_available() else None

    def submit(self, state: Mapping[str, Any], *, global_step: int) -> None:
        """Snapshot ``state`` now and write it in the background.

        :param state: the checkpoint dict (live tensors are fine: they are copied here).
        :param global_step: optimizer steps so far; orders checkpoints.
        """
        self.wait()
        frozen = snapshot(state, self._pinned)
        if self._pinned:
            torch.cuda.synchronize()  # the non-blocking copies above must land before the write reads them

        def write() -> None:
            try:
                path = save_checkpoint(self.directory, frozen, global_step=global_step, keep=self.keep)
                if self.on_saved is not None:
                    self.on_saved(path, frozen)
            except BaseException as err:  # re-raised on the training thread
                self._error = err

        self._thread = threading.Thread(target=write, name="gpu_trainer-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise TrainerError(
                f"writing a checkpoint to {self.directory} failed: {type(err).__name__}: {err}"
            ) from err


def _load(path: str) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "model" not in state:
        raise ValueError("not a gpu_trainer checkpoint (missing format_version/model)")
    return state


def load_latest(directory: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that loads, falling back past corrupt ones with a warning.

    :param directory: the checkpoint directory.
    :returns: ``(path, state)``, or None when the directory holds no checkpoint at all.
    :raises TrainerError: when checkpoints exist but none can be read.
    """
    paths = list_checkpoints(directory)
    errors = []
    for path in paths:
        try:
            state = _load(path)
        except Exception as err:  # truncated zip, bad pickle, permission: all mean "unusable"
            first = (str(err).strip().splitlines() or [""])[0]
            errors.append(f"{os.path.basename(path)}: {type(err).__name__}: {first}")
            log.warning(
                "checkpoint %s is unreadable (%s: %s); trying the previous one",
                path,
                type(err).__name__,
                first,
            )
            continue
        return path, state
    if paths:
        raise TrainerError(
            f"no readable checkpoint in {directory} ({len(paths)} found, all unreadable: {'; '.join(errors)[:500]}); "
            "remove them to start fresh"
        )
    return None


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: str) -> None:
    """Refuse to resume a checkpoint written under a different configuration.

    Only fields that change the math are compared (:data:`gpu_trainer.config.MATH_FIELDS` and the data
    signature); epochs may grow and paths, logging and workers may change.

    :param saved: the checkpoint's ``config`` entry.
    :param current: this run's ``config`` entry.
    :param path: the checkpoint, for the message.
    :raises TrainerError: listing every differing field.
    """
    keys = [*MATH_FIELDS, "data_signature"]
    diffs = [
        f"{key}: checkpoint={saved.get(key)!r} now={current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise TrainerError(
            f"checkpoint {path} was written by a different configuration ({'; '.join(diffs)}); "
            "use a new --checkpoint-dir or restore the original settings"
        )
