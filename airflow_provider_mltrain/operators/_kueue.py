"""Read what Kueue says about a training job or pod: its Workload's conditions.

Kueue keeps the verdict on a queued job in the Workload it creates for it, not on the job: a mistyped
``queue_name``, a stopped queue or a request larger than the queue can ever give shows only there as
``QuotaReserved=False`` with a reason and message. The training waits (sync loop and trigger) read that
Workload read-only (``get``/``list`` on ``workloads.kueue.x-k8s.io``) and hand it to the functions here,
which decide what the task log says and when the wait gives up.

The one API call, :func:`read_workload`, takes the caller's client (the trigger has its async twin).
Everything below follows kubernetes-sigs/kueue at ff69552e79ad (main, v0.19 line); each constant cites
where Kueue defines or writes it. Older Kueue (< 0.19, the ``UnadmittedWorkloadsObservability`` gate off)
writes the same messages with the reason ``Inadmissible``; both are recognised.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The Workload API. v1beta2 is the storage version at ff69552e79ad
#: (kubernetes-sigs/kueue@ff69552e79ad:apis/kueue/v1beta2/workload_types.go:1181); Kueue before v0.15
#: serves only v1beta1, read when v1beta2 answers 404. Condition types and reasons are the same in both.
GROUP = "kueue.x-k8s.io"
VERSIONS = ("v1beta2", "v1beta1")
PLURAL = "workloads"
#: The label Kueue puts on the Workload with its job's uid
#: (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/constants/constants.go:43, set in
#: pkg/controller/jobframework/reconciler.go:1625); the Workload is also the job's controller-owned
#: dependent (reconciler.go:1634).
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
#: The label that submits a job (or pod) to a LocalQueue
#: (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/constants/constants.go:23).
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: How long a blocker (:data:`BLOCKED_REASONS`) may be reported before the wait gives up: room for a
#: LocalQueue applied together with the DAG, which Kueue notices and re-evaluates the Workload for
#: (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/core/workload_controller.go:86-96).
QUEUE_GRACE_S = 60.0

# Condition types (kubernetes-sigs/kueue@ff69552e79ad:apis/kueue/v1beta2/workload_types.go:933-1017).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
REQUEUED = "Requeued"
FINISHED = "Finished"

#: QuotaReserved=False reasons that no amount of waiting fixes without someone changing the cluster or the
#: task: a missing or terminating LocalQueue/ClusterQueue, an invalid namespace selector, a namespace the
#: ClusterQueue does not select (``Misconfigured``: workload_types.go:966-968, written by
#: pkg/controller/core/workload_controller.go:1008-1013, 1053-1058, 1975, 1985, 2027-2041 and
#: pkg/scheduler/scheduler.go:682-695); a stopped or inactive queue (``Suspended``: workload_types.go:970-972,
#: workload_controller.go:1016-1021, 1061-1066, 2031-2037, scheduler.go:679-681); a request above the queue's
#: maximum capacity, nominal quota plus what it may borrow (``ExceedsMaxQuota``: workload_types.go:953-956,
#: pkg/scheduler/flavorassigner/flavorassigner.go:1352-1362); a deactivated workload (``Deactivated``:
#: workload_controller.go:1957-1958, workload_types.go:1122).
BLOCKED_REASONS = ("Misconfigured", "Suspended", "ExceedsMaxQuota", "Deactivated")
#: The reason older Kueue writes for all of the queue blockers (workload_controller.go:2009-2013 with the
#: fallback of pkg/workload/workload.go:1658-1665); then only the message tells a blocker from the rest.
LEGACY_REASON = "Inadmissible"
#: The messages of the queue blockers (workload_controller.go:1012, 1020, 1057, 1065, 2030-2037;
#: scheduler.go:680, 683).
_BLOCKER_MESSAGE = re.compile(
    r"^(LocalQueue|ClusterQueue) (?P<queue>\S+) (doesn't exist|is inactive|is stopped|not found"
    r"|is terminating or missing)$"
)

#: Eviction reasons after which Kueue itself puts the workload back in the queue: a preemption and node
#: failures at once (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/jobframework/reconciler.go:603-610),
#: a PodsReady timeout or an admission check that went back to Retry after a backoff
#: (pkg/controller/core/workload_controller.go:579-591). These are the ones the operators count toward
#: ``max_preemptions``. The others (a stopped queue draining it, deactivation) are not re-queued: they end in
#: a blocked QuotaReserved=False above. Values: workload_types.go:1085, 1094, 1098, 1110.
REQUEUE_EVICTION_REASONS = ("Preempted", "NodeFailures", "PodsReadyTimeout", "AdmissionCheck")


@dataclasses.dataclass(frozen=True)
class WorkloadView:
    """What the wait needs from one Workload.

    :param name: the Workload's name.
    :param queue: ``spec.queueName``.
    :param admitted: ``Admitted=True``.
    :param pending: ``reason: message`` of why it is not admitted (QuotaReserved=False, or Admitted=False
        with quota reserved: admission checks), "" when nothing is said.
    :param blocked: the pending reason is one no waiting fixes (:data:`BLOCKED_REASONS`).
    :param requeue_evictions: evictions after which Kueue re-queued the workload, so far.
    :param last_eviction: ``reason: message`` of the latest Evicted condition, "" if none.
    """

    name: str
    queue: str
    admitted: bool
    pending: str
    blocked: bool
    requeue_evictions: int
    last_eviction: str


def _condition(workload: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (workload.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def _said(condition: Mapping[str, Any]) -> str:
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    return f"{reason}: {message}" if reason and message else reason or message


def is_blocked(reason: str, message: str) -> bool:
    """Whether a QuotaReserved=False reason/message is one that waiting does not fix."""
    if reason in BLOCKED_REASONS:
        return True
    return reason == LEGACY_REASON and _BLOCKER_MESSAGE.match(message) is not None


def requeue_evictions(workload: Mapping[str, Any]) -> int:
    """How many times Kueue evicted and re-queued the workload.

    ``status.schedulingStats.evictions`` counts every eviction by reason
    (kubernetes-sigs/kueue@ff69552e79ad:pkg/workload/evict/evict.go:302-314); a Kueue without it counts as
    one eviction while the Evicted condition (or its "Previously: ..." echo after re-admission,
    pkg/workload/workload.go:941-970) names a re-queue reason.
    """
    stats = ((workload.get("status") or {}).get("schedulingStats") or {}).get("evictions")
    if stats is not None:
        return sum(
            int(entry.get("count") or 0) for entry in stats if entry.get("reason") in REQUEUE_EVICTION_REASONS
        )
    evicted = _condition(workload, EVICTED)
    requeued = _condition(workload, REQUEUED)
    for condition in (evicted, requeued):
        if condition is not None and condition.get("reason") in REQUEUE_EVICTION_REASONS:
            return 1
    if evicted is not None and str(evicted.get("message") or "").startswith("Previously: "):
        return 1
    return 0


def view(workload: Mapping[str, Any]) -> WorkloadView:
    """Read one Workload (a dict as the API returns it)."""
    admitted = _condition(workload, ADMITTED)
    quota = _condition(workload, QUOTA_RESERVED)
    is_admitted = admitted is not None and admitted.get("status") == "True"
    pending, blocked = "", False
    if not is_admitted:
        if quota is not None and quota.get("status") == "False":
            pending = _said(quota)
            blocked = is_blocked(str(quota.get("reason") or ""), str(quota.get("message") or ""))
        elif quota is not None and admitted is not None:
            pending = _said(admitted)  # quota reserved, admission checks not ready yet
    evicted = _condition(workload, EVICTED)
    last = _said(evicted) if evicted is not None and evicted.get("status") == "True" else ""
    if not last:
        requeued = _condition(workload, REQUEUED)
        if requeued is not None and requeued.get("reason") in REQUEUE_EVICTION_REASONS:
            last = _said(requeued)
    return WorkloadView(
        name=str((workload.get("metadata") or {}).get("name") or ""),
        queue=str((workload.get("spec") or {}).get("queueName") or ""),
        admitted=is_admitted,
        pending=pending,
        blocked=blocked,
        requeue_evictions=requeue_evictions(workload),
        last_eviction=last,
    )


def owned_workload(items: Sequence[Mapping[str, Any]], owner_uid: str) -> Mapping[str, Any] | None:
    """The Workload Kueue owns for the object with ``owner_uid`` (the newest one not finished), or None.

    :param items: Workloads listed with the :data:`JOB_UID_LABEL` selector.
    :param owner_uid: the job's (or pod's) ``metadata.uid``.
    """
    owned = [
        item
        for item in items
        if any(
            ref.get("uid") == owner_uid for ref in (item.get("metadata") or {}).get("ownerReferences") or []
        )
    ]
    live = [item for item in owned if (_condition(item, FINISHED) or {}).get("status") != "True"] or owned
    live.sort(key=lambda item: (item.get("metadata") or {}).get("creationTimestamp") or "")
    return live[-1] if live else None


def blocked_message(what: str, queue: str | None, pending: str, waited_s: float) -> str:
    """The failure when Kueue reports a blocker for ``queue`` for ``waited_s`` seconds.

    :param what: e.g. ``JobSet train-abc`` or ``Pod train-x``.
    :param queue: the LocalQueue the task asked for (``queue_name=``).
    :param pending: Kueue's ``reason: message``.
    """
    reason = pending.split(":", 1)[0]
    if reason == "ExceedsMaxQuota":
        fix = (
            "the request is larger than the ClusterQueue can ever admit (its nominal quota plus what it may "
            "borrow): lower num_nodes=/gpus=, or ask for a larger quota (`kubectl describe clusterqueue`)"
        )
    elif reason == "Deactivated":
        fix = "someone or Kueue deactivated the Workload (spec.active=false); see `kubectl describe workload`"
    else:
        fix = (
            f"check queue_name={queue!r}: `kubectl get localqueues -n <namespace>` lists the LocalQueues "
            "this namespace can use; a stopped queue (spec.stopPolicy) or an inactive ClusterQueue "
            "(`kubectl describe clusterqueue`) needs its administrator"
        )
    return (
        f"{what} cannot be admitted by Kueue (queue {queue!r}): {pending} (reported for {waited_s:.0f}s, "
        f"so the job was deleted). Likely fix: {fix}."
    )


class WorkloadReader:
    """The bookkeeping of reading Kueue Workloads that the sync client and the trigger share.

    The read is a bonus: without the Role's ``get``/``list`` on ``workloads.kueue.x-k8s.io`` (or without
    Kueue) the wait goes on as before and says once why it cannot show Kueue's reasons. A transient error
    keeps the last Workload read, so a grace period does not start over on an API blip.
    """

    def __init__(self) -> None:
        self._versions = list(VERSIONS)
        self._last: dict[str, dict[str, Any] | None] = {}
        #: Why Workloads cannot be read (set once; the wait logs it once).
        self.problem: str | None = None
        self._problem_said = False

    @property
    def version(self) -> str | None:
        return self._versions[0] if self._versions and self.problem is None else None

    def uid_to_read(self, job: Mapping[str, Any]) -> str | None:
        """The job's uid when its Workload is worth reading: it was submitted to a Kueue queue."""
        metadata = job.get("metadata") or {}
        if QUEUE_LABEL not in (metadata.get("labels") or {}):
            return None
        return metadata.get("uid") or None

    def failed(self, status: int | None, reason: str) -> bool:
        """Record a failed list; True to try the next API version."""
        if status == 404 and len(self._versions) > 1:
            self._versions.pop(0)  # a Kueue older than v0.15 serves only v1beta1
            return True
        if status in (401, 403, 404):
            self.problem = (
                f"{status} {reason}: the task log cannot show why Kueue holds the job, nor fail fast on a "
                f"missing or stopped queue. Grant get/list on {PLURAL}.{GROUP} (README, Role)."
            )
        return False

    def found(self, items: Sequence[Mapping[str, Any]], uid: str) -> dict[str, Any] | None:
        owned = owned_workload(items, uid)
        self._last = {uid: dict(owned) if owned is not None else None}
        return self._last[uid]

    def last(self, uid: str | None) -> dict[str, Any] | None:
        """The Workload last read for ``uid`` (kept over a failed read)."""
        return self._last.get(uid) if uid is not None else None

    def say_problem(self) -> str | None:
        """The problem to log, once."""
        if self.problem is None or self._problem_said:
            return None
        self._problem_said = True
        return self.problem


def read_workload(
    custom: Any, namespace: str, reader: WorkloadReader, obj: Mapping[str, Any]
) -> dict[str, Any] | None:
    """List the Workload of ``obj`` (a job or pod as a dict) with a synchronous ``CustomObjectsApi``.

    The trigger has the async twin (:meth:`TrainingJobTrigger._workload`); both keep their state in
    ``reader``. Never raises: the read is a bonus.
    """
    uid = reader.uid_to_read(obj)
    while uid is not None and reader.version is not None:
        try:
            found = custom.list_namespaced_custom_object(
                GROUP, reader.version, namespace, PLURAL, label_selector=f"{JOB_UID_LABEL}={uid}"
            )
        except Exception as err:
            if reader.failed(getattr(err, "status", None), str(getattr(err, "reason", err))):
                continue
            break
        if not isinstance(found, Mapping):
            break
        return reader.found(found.get("items") or [], uid)
    return reader.last(uid)
