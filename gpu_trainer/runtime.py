"""Process runtime: torchrun/DDP setup, device and precision choice, seeding, RNG state capture."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import random
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np
import torch

from gpu_trainer.errors import TrainerError

log = logging.getLogger("gpu_trainer")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(environ: Mapping[str, str]) -> DistInfo:
    """Read torchrun's ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``."""
    return DistInfo(
        rank=int(environ.get("RANK", "0")),
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        world_size=int(environ.get("WORLD_SIZE", "1")),
    )


def pick_device(requested: str, info: DistInfo) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (or requested), else CPU.

    :param requested: ``auto``, ``cpu`` or ``cuda``.
    :param info: this process's place in the job.
    :raises TrainerError: when CUDA is requested but not available.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainerError("--device cuda requested but CUDA is not available on this machine")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the torchrun process group: nccl on CUDA, gloo on CPU."""
    if info.distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The concrete precision: ``auto`` is bf16 on CUDA with bf16 support, else fp32.

    :param requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
    :param device: the training device.
    :raises TrainerError: fp16 off CUDA (the GradScaler path is CUDA-only here).
    """
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise TrainerError("--precision fp16 needs CUDA (use bf16 or fp32 on CPU)")
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision, None for fp32 (autocast off)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def configure_cuda() -> None:
    """TF32 for fp32 matmuls/convolutions on Ampere+ (a free ~8x over strict fp32, ample precision)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A per-(epoch, rank) seed: ranks differ, and a run resumed at an epoch boundary replays exactly."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state: Any = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_logging(info: DistInfo) -> None:
    """Plain timestamped lines on stdout; ranks other than 0 only report warnings."""
    handler = logging.StreamHandler(sys.stdout)
    prefix = f"[rank {info.rank}] " if info.distributed else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s gpu_trainer: {prefix}%(message)s"))
    logger = logging.getLogger("gpu_trainer")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO if info.is_main else logging.WARNING)


def exit_now(status: int) -> NoReturn:
    """End the process with ``status``: at-exit handlers run, the interpreter's teardown does not.

    When a command has written its result nothing is left to do, yet tearing down an interpreter that
    imported torch, MLflow, pandas and matplotlib takes seconds (every module's globals and their object
    graphs are released one by one): 2 to 6 s between the trainer's ``done:`` line and its exit on 2 cores,
    time the Airflow task waits for (``tests/benchmarks/bench_training_task.py``). Handlers registered
    with :mod:`atexit` (MLflow ends active runs there) still run, and output is flushed first.

    :param status: the exit status.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe must not change the status
            stream.flush()
    os._exit(status)
