"""Watch a training pod until it is scheduled, and fail fast when the scheduler says no node fits.

KubernetesPodOperator only knows "not started within schedule_timeout_seconds": a GPU request no node can
satisfy would sit there for the whole timeout. This watch reads the pod's ``PodScheduled`` condition
(and, when it matters, its events for the cluster autoscaler's ``TriggeredScaleUp``) and turns a lasting
"Unschedulable" into the triage's explanation. A pod Kueue holds behind its admission scheduling gate is
waiting for quota, not unschedulable: the watch says so and starts the unschedulable clock only once
Kueue has admitted it. Meanwhile it reads the pod's Workload (Kueue's pod integration creates one per pod):
Kueue's reason is logged, and a queue Kueue reports missing, stopped or inactive fails the task after
:data:`._kueue.QUEUE_GRACE_S` (see :mod:`._kueue`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.utils.pod_manager import PodPhase

from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators._manifests import ADMISSION_GATE, QUEUE_LABEL
from airflow_provider_mltrain.operators._triage import (
    GPUTrainingFailure,
    TriageContext,
    explain_unschedulable,
    unschedulable_message,
)

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
    from kubernetes.client import models as k8s

_log = logging.getLogger(__name__)


def await_scheduling(
    pod_manager: PodManager,
    pod: k8s.V1Pod,
    *,
    unschedulable_timeout_s: float,
    schedule_timeout_s: float,
    poll_interval_s: float,
    triage_context: TriageContext,
    before_deferral: bool = False,
    log: logging.Logger | logging.LoggerAdapter | None = None,
    workload_of: Callable[[k8s.V1Pod], Mapping[str, Any] | None] | None = None,
    queue_grace_s: float | None = None,
) -> None:
    """Return once the pod is scheduled (or the budget is spent); raise when no node can take it.

    :param pod_manager: KubernetesPodOperator's pod manager (``read_pod``, ``read_pod_events``).
    :param pod: the pod as created.
    :param unschedulable_timeout_s: fail after the scheduler has called the pod unschedulable for this
        long, unless the cluster autoscaler is scaling up.
    :param schedule_timeout_s: stop watching after this long (the caller reports its own schedule timeout).
    :param poll_interval_s: seconds between reads of the pod.
    :param triage_context: what was asked for, to phrase the fix.
    :param before_deferral: return (so the task defers) as soon as the autoscaler is adding a node, and
        after at most twice ``unschedulable_timeout_s``: a deferrable task should not hold a worker slot
        through a long wait; also as soon as the pod waits for Kueue admission (quota can take hours).
    :param log: where "waiting for admission" is said (the task log); default this module's logger.
    :param workload_of: reads the pod's Kueue Workload (None: not read); never raises.
    :param queue_grace_s: fail once Kueue reported a blocker this long (default :data:`._kueue.QUEUE_GRACE_S`);
        before a deferral the watch stays on the worker only while Kueue reports one.
    :raises GPUTrainingFailure: the pod stayed unschedulable and no node is on its way, or Kueue cannot
        admit it (a missing or stopped queue).
    """
    grace = kueue.QUEUE_GRACE_S if queue_grace_s is None else queue_grace_s
    log = log or _log
    said_pending = ""
    blocked_since: float | None = None
    budget = schedule_timeout_s
    if before_deferral:
        budget = min(budget, 2 * unschedulable_timeout_s)
    deadline = time.monotonic() + budget
    first_seen: float | None = None
    said_waiting = False
    while True:
        remote = pod_manager.read_pod(pod)
        if awaits_admission(remote):
            queue = ((remote.metadata.labels or {}) if remote.metadata else {}).get(QUEUE_LABEL)
            if not said_waiting:
                log.info(
                    "Pod %s: waiting for admission (Kueue queue %r holds it behind the %s scheduling gate "
                    "until its quota allows; this wait counts against schedule_timeout_seconds)",
                    getattr(remote.metadata, "name", None),
                    queue,
                    ADMISSION_GATE,
                )
                said_waiting = True
            workload = workload_of(remote) if workload_of is not None else None
            seen = kueue.view(workload) if workload is not None else None
            name = getattr(remote.metadata, "name", None)
            if seen is not None and seen.pending and seen.pending != said_pending:
                log.info("Pod %s: Kueue queue %r: %s", name, queue, seen.pending)
                said_pending = seen.pending
            if seen is None or not seen.blocked:
                blocked_since = None
            else:
                now = time.monotonic()
                blocked_since = now if blocked_since is None else blocked_since
                if now - blocked_since >= grace:
                    raise GPUTrainingFailure(
                        kueue.blocked_message(f"Pod {name}", queue, seen.pending, now - blocked_since)
                    )
            if before_deferral and blocked_since is None:
                return  # wait for the queue on the triggerer, not on a worker
            first_seen = None  # the unschedulable clock starts once Kueue has admitted the pod
            if time.monotonic() >= deadline:
                return
            time.sleep(poll_interval_s)
            continue
        message = unschedulable_message(remote)
        if message is None:
            if is_scheduled(remote):
                return
            first_seen = None
        else:
            now = time.monotonic()
            first_seen = now if first_seen is None else first_seen
            expired = now - first_seen >= unschedulable_timeout_s
            # Reading events is another API call: only when its answer changes what happens next.
            scaling_up = (before_deferral or expired) and is_scaling_up(pod_manager, pod)
            if scaling_up and before_deferral:
                return  # a node is on its way: wait for it on the triggerer, not on a worker
            if expired and not scaling_up:
                raise GPUTrainingFailure(
                    explain_unschedulable(message, triage_context)
                    + f"\n(gave up after {unschedulable_timeout_s}s unschedulable; "
                    "raise unschedulable_timeout_seconds= to wait longer)"
                )
        if time.monotonic() >= deadline:
            return  # the caller reports its own schedule timeout
        time.sleep(poll_interval_s)


def awaits_admission(remote: k8s.V1Pod) -> bool:
    """Whether Kueue still holds the pod behind its admission scheduling gate."""
    gates = (remote.spec.scheduling_gates if remote.spec is not None else None) or []
    return any(getattr(gate, "name", None) == ADMISSION_GATE for gate in gates)


def is_scaling_up(pod_manager: PodManager, pod: k8s.V1Pod) -> bool:
    """Whether the cluster autoscaler is adding a node for this pod (then waiting is right)."""
    try:
        events = pod_manager.read_pod_events(pod).items or []
    except Exception:
        return False
    return any(getattr(e, "reason", None) == "TriggeredScaleUp" for e in events)


def is_scheduled(remote: k8s.V1Pod) -> bool:
    """Whether the pod is bound to a node (or past Pending, or gone)."""
    status = remote.status
    if status is None or status.phase not in (PodPhase.PENDING, "Unknown"):
        return True
    if remote.spec is not None and remote.spec.node_name:
        return True
    # The kubelet reports container statuses only for a pod bound to its node.
    if status.container_statuses:
        return True
    return any(c.type == "PodScheduled" and c.status == "True" for c in status.conditions or [])
