"""Turn a failed or stuck training pod into an error that names the cause and the likely fix.

Each check reads only the pod object (status, conditions, container states) and the last log lines, so
the same triage serves the synchronous path, the deferrable path and the unit tests.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from airflow.exceptions import AirflowException

IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_CUDA_OOM = re.compile(r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError|CUDA error: out of memory")
_BUS_ERROR = re.compile(r"\bBus error\b|DataLoader worker \(pid \d+\) is killed by signal: Bus error", re.I)
# NCCL's own errors, and the watchdog/store timeouts of a collective that some rank never joined.
_NCCL_ERROR = re.compile(
    r"NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError|ncclRemoteError|NCCL WARN|"
    r"Watchdog caught collective operation timeout|NCCL communicator was aborted|"
    r"ProcessGroupNCCL.*(?:timed out|[Tt]imeout)|DistStoreError|RendezvousTimeoutError"
)
_COLLECTIVE_CAUSE = "Training failed in a collective operation"


class GPUTrainingFailure(AirflowException):
    """A training pod failed for a cause we recognised; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class TriageContext:
    """What the operator asked for, to phrase the fix.

    :param gpus: GPUs requested.
    :param gpu_resource: the extended resource name.
    :param gpu_type: accepted GPU products.
    :param gpu_type_label: node label key holding the product.
    :param image: the container image.
    :param memory: the memory limit, if any.
    :param shm_size: the /dev/shm size, if any.
    """

    gpus: int
    gpu_resource: str
    gpu_type: Sequence[str]
    gpu_type_label: str
    image: str | None
    memory: str | None
    shm_size: str | None


def unschedulable_message(pod: Any) -> str | None:
    """The scheduler's message when the pod is ``PodScheduled=False`` with reason ``Unschedulable``."""
    status = getattr(pod, "status", None)
    for condition in (status.conditions if status else None) or []:
        if (
            condition.type == "PodScheduled"
            and condition.status == "False"
            and condition.reason == "Unschedulable"
        ):
            return str(condition.message or "pod is unschedulable")
    return None


def explain_unschedulable(message: str, ctx: TriageContext) -> str:
    fixes: list[str] = []
    if f"Insufficient {ctx.gpu_resource}" in message:
        fixes.append(
            f"no node has {ctx.gpus} free '{ctx.gpu_resource}': lower gpus=, wait for running jobs to finish, "
            "add GPU nodes (or let the cluster autoscaler do so), and check the device plugin advertises "
            f"'{ctx.gpu_resource}' (kubectl describe node | grep {ctx.gpu_resource})"
        )
    if "Insufficient cpu" in message or "Insufficient memory" in message:
        fixes.append("no node has the requested cpu=/memory= free: lower them or use larger nodes")
    if "node affinity" in message or "node selector" in message:
        if ctx.gpu_type:
            fixes.append(
                f"no node has label {ctx.gpu_type_label} in {list(ctx.gpu_type)}: compare gpu_type= with "
                f"`kubectl get nodes -L {ctx.gpu_type_label}` (or set gpu_type_label= if your nodes use "
                "another label)"
            )
        else:
            fixes.append("no node matches the pod's node_selector/affinity: check the node labels")
    if "untolerated taint" in message or "had taint" in message:
        fixes.append("the candidate nodes carry a taint the pod does not tolerate: add it to tolerations=")
    if not fixes:
        fixes.append("see the scheduler message above and `kubectl describe pod`")
    return f"Training pod cannot be scheduled: {message.strip()}\nLikely fix: " + "; ".join(fixes)


def _container_status(pod: Any, container: str) -> Any:
    status = getattr(pod, "status", None)
    for cs in (status.container_statuses if status else None) or []:
        if cs.name == container:
            return cs
    return None


def image_pull_problem(pod: Any, container: str, ctx: TriageContext) -> str | None:
    cs = _container_status(pod, container)
    waiting = cs.state.waiting if cs is not None and cs.state is not None else None
    if waiting is None or waiting.reason not in IMAGE_PULL_REASONS:
        return None
    return (
        f"Training image {ctx.image!r} cannot be pulled ({waiting.reason}: {waiting.message or 'no detail'})\n"
        "Likely fix: check the image name and tag exist in the registry, and that image_pull_secrets= "
        "names a Secret with credentials for it."
    )


def triage(pod: Any, container: str, log_tail: Sequence[str], ctx: TriageContext) -> str | None:
    """Name the cause of a failed pod, or None when it is none of the known ones.

    :param pod: the pod as last read from the API.
    :param container: the trainer's container name.
    :param log_tail: the trainer's last log lines.
    :param ctx: what was asked for.
    """
    message = unschedulable_message(pod)
    if message is not None:
        return explain_unschedulable(message, ctx)
    pulled = image_pull_problem(pod, container, ctx)
    if pulled:
        return pulled
    text = "\n".join(log_tail)
    # CUDA OOM first: PyTorch prints it and exits 1, it is not a kernel OOM kill.
    if _CUDA_OOM.search(text):
        return (
            "Training ran out of GPU memory (CUDA out of memory in the trainer's last log lines).\n"
            "Likely fix: lower the batch size in hyperparameters=, enable mixed precision or gradient "
            "accumulation, or choose a GPU with more memory (gpu_type=)."
        )
    cs = _container_status(pod, container)
    terminated = cs.state.terminated if cs is not None and cs.state is not None else None
    if terminated is not None and terminated.reason == "OOMKilled":
        return (
            f"Training container was OOMKilled: it exceeded its memory limit ({ctx.memory or 'none set'}).\n"
            "Likely fix: raise memory=, or lower the DataLoader's num_workers / batch size in hyperparameters=."
        )
    if _NCCL_ERROR.search(text):
        return (
            f"{_COLLECTIVE_CAUSE} (NCCL error or timeout in the trainer's last log lines).\n"
            "Likely fix: when another node failed first, its own error is the cause; otherwise check that "
            "the nodes reach each other on every port (NetworkPolicy, the job's headless service), rerun "
            "with NCCL_DEBUG=INFO in env_vars=, and pin NCCL_SOCKET_IFNAME when nodes have several networks."
        )
    if _BUS_ERROR.search(text):
        return (
            f"Training crashed with 'Bus error' (shared memory /dev/shm is too small: {ctx.shm_size or 'none'}).\n"
            "Likely fix: raise shm_size= (PyTorch DataLoader workers pass batches through /dev/shm)."
        )
    return None


def is_collective_failure(cause: str) -> bool:
    """Whether a triage result is the NCCL one (often the echo of another node's failure)."""
    return cause.startswith(_COLLECTIVE_CAUSE)
