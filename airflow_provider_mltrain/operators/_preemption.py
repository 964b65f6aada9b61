"""Recognise a training pod that was disrupted (preempted, evicted, its node shut down or gone).

A disruption is not the trainer's failure: the trainer checkpoints on SIGTERM and exits
:data:`gpu_trainer.contract.PREEMPTED_EXIT_CODE`, so a new pod for the same checkpoint directory
continues where it stopped. This module only reads pod and node objects and words the log lines and the
failure; :class:`~airflow_provider_mltrain.operators.gpu_training.GPUTrainingPodOperator` decides what to
do with them.

What counts, from the Kubernetes sources:

- the pod condition ``DisruptionTarget=True`` (Kubernetes >= 1.26, GA in 1.31) with a reason in
  :data:`DISRUPTION_REASONS`;
- a pod that graceful node shutdown ended, on clusters that do not set that condition: phase ``Failed``
  with reason ``Shutdown`` (1.20) or ``NodeShutdown`` (rejected while the node shuts down, >= 1.21), or
  ``Terminated`` with "Pod was terminated in response to imminent node shutdown." (>= 1.21);
- a pod that vanished (404) together with its node (a spot node reclaimed by the cloud provider, whose
  pods the pod garbage collector removed);
- a pod Kueue's pod integration evicted (preempted to make room for another workload, its node failed):
  Kueue marks it with the condition ``TerminationTarget`` (reason ``WorkloadEvictedDueTo<reason>``), not
  ``DisruptionTarget``, then deletes it (kubernetes-sigs/kueue@ff69552e79ad:
  pkg/controller/jobs/pod/pod_controller.go:521-563, the reason from
  pkg/controller/jobframework/reconciler.go:1539-1546). Once the deleted pod is gone, Kueue's ``Stopped``
  event on it (reconciler.go:1547-1549) still tells a preemption by its message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from airflow.exceptions import AirflowException

from airflow_provider_mltrain.operators import _kueue as kueue

#: The pod's ``terminationGracePeriodSeconds`` unless the user sets one: the two minutes' notice AWS gives
#: a spot instance (GCP and Azure give 30 s, which node shutdown then enforces whatever the pod asks), room
#: for the trainer's SIGTERM checkpoint of model + optimizer state (16 bytes per parameter with Adam in
#: fp32: a 1B-parameter model writes 16 GB, about 80 s at 200 MB/s). Kubernetes' own default is 30 s.
DEFAULT_TERMINATION_GRACE_PERIOD_S = 120

#: The pod condition the control plane and the kubelet add before they end a pod for a reason of their own.
DISRUPTION_CONDITION = "DisruptionTarget"
#: Its reasons (k8s.io/api/core/v1 ``PodReason*``): the scheduler made room for a higher-priority pod; the
#: Eviction API (``kubectl drain``, the cluster autoscaler's scale-down); the taint manager (a
#: ``NoExecute`` taint, e.g. a node being reclaimed); the kubelet (node-pressure eviction, graceful node
#: shutdown); the pod garbage collector (the pod's node is gone).
PREEMPTION_BY_SCHEDULER = "PreemptionByScheduler"
DISRUPTION_REASONS = (
    PREEMPTION_BY_SCHEDULER,
    "EvictionByEvictionAPI",
    "DeletionByTaintManager",
    "TerminationByKubelet",
    "DeletionByPodGC",
)
#: Pod status reasons of graceful node shutdown (kubelet ``nodeshutdown`` manager, 1.20 and later).
NODE_SHUTDOWN_REASONS = ("Shutdown", "NodeShutdown")
#: Since 1.21 the kubelet ends a running pod at node shutdown with reason "Terminated", a word other
#: kubelet paths use too: only its message tells it is the node shutting down.
_SHUTDOWN_TERMINATED_REASON = "Terminated"
_SHUTDOWN_MESSAGE_WORD = "shutdown"
#: The pod condition Kueue's pod integration sets on a pod it stops
#: (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/jobs/pod/pod_controller.go:68).
KUEUE_TERMINATION_CONDITION = "TerminationTarget"
#: Its reasons that are disruptions: the evictions after which Kueue itself re-queues a workload
#: (:data:`._kueue.REQUEUE_EVICTION_REASONS`), as ``WorkloadEvicted`` + ``DueTo`` + the Workload's Evicted
#: reason (reconciler.go:1541-1544). Not: ``WorkloadDeleted``, ``NotAdmitted``, a stopped queue, deactivation.
KUEUE_TERMINATION_REASONS = tuple(
    f"WorkloadEvictedDueTo{reason}" for reason in kueue.REQUEUE_EVICTION_REASONS
)
#: Kueue's event on a pod it stopped (kubernetes-sigs/kueue@ff69552e79ad:pkg/controller/jobframework/events.go:23),
#: and how its message (the Workload's Evicted message) begins for a preemption
#: (pkg/scheduler/preemption/preemption.go:185-186) and for failed nodes (pkg/scheduler/scheduler.go:930).
KUEUE_STOPPED_EVENT = "Stopped"
_KUEUE_EVICTION_MESSAGES = (
    ("Preempted to accommodate a workload", "WorkloadEvictedDueToPreempted"),
    (
        "Workload was evicted as there was no replacement for unhealthy node",
        "WorkloadEvictedDueToNodeFailures",
    ),
)
#: Reason recorded for a pod that vanished with its node (no Kubernetes reason exists for it).
VANISHED_WITH_NODE = "PodVanishedWithNode"
#: The event key under which the deferrable path carries the count through the trigger (trigger_kwargs).
PREEMPTIONS_EVENT_KEY = "_mltrain_preemptions"
#: The event key carrying the pod's node through the trigger, to tell a vanished pod's node is gone too.
NODE_EVENT_KEY = "_mltrain_node"


@dataclasses.dataclass(frozen=True)
class Disruption:
    """Why a pod ended that was not the trainer's doing.

    :param pod_name: the disrupted pod.
    :param reason: the Kubernetes reason (e.g. ``PreemptionByScheduler``) or :data:`VANISHED_WITH_NODE`.
    :param message: the accompanying message.
    """

    pod_name: str
    reason: str
    message: str

    def describe(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


class PodDisrupted(AirflowException):
    """Raised from the pod operator's cleanup to leave KubernetesPodOperator's flow for a replacement."""

    def __init__(self, disruption: Disruption) -> None:
        super().__init__(f"Pod {disruption.pod_name} was disrupted ({disruption.describe()})")
        self.disruption = disruption


def disruption_of(pod: Any) -> Disruption | None:
    """The disruption that ended ``pod`` (as read from the API), or None when it was not disrupted.

    :param pod: a ``V1Pod``.
    """
    metadata = getattr(pod, "metadata", None)
    name = str(getattr(metadata, "name", None) or "<unnamed>")
    status = getattr(pod, "status", None)
    if status is None:
        return None
    for condition in status.conditions or []:
        if (
            condition.type == DISRUPTION_CONDITION
            and condition.status == "True"
            and condition.reason in DISRUPTION_REASONS
        ):
            return Disruption(name, str(condition.reason), str(condition.message or ""))
        if (
            condition.type == KUEUE_TERMINATION_CONDITION
            and condition.status == "True"
            and condition.reason in KUEUE_TERMINATION_REASONS
        ):
            return Disruption(name, str(condition.reason), str(condition.message or ""))
    reason = status.reason or ""
    message = str(status.message or "")
    if status.phase == "Failed" and (
        reason in NODE_SHUTDOWN_REASONS
        or (reason == _SHUTDOWN_TERMINATED_REASON and _SHUTDOWN_MESSAGE_WORD in message.lower())
    ):
        return Disruption(name, reason, message)
    return None


def vanished_with_node(pod_name: str, node_name: str | None, node_exists: bool | None) -> Disruption | None:
    """A disruption for a pod that is gone (404), when its node is gone too.

    A pod deleted by a person or a controller while its node is still there is not a disruption: the
    task fails as it did before.

    :param pod_name: the pod that is gone.
    :param node_name: the node it ran on; None when it was never seen scheduled.
    :param node_exists: whether that node is still in the API (None: unknown).
    """
    if not node_name or node_exists is not False:
        return None
    return Disruption(
        pod_name, VANISHED_WITH_NODE, f"the pod and its node {node_name} are gone from the cluster"
    )


#: The event kube-scheduler records on a victim it preempted, and its message's start (kubernetes/kubernetes
#: pkg/scheduler/framework/preemption/preemption.go, Evaluator.PreemptPod: ``Eventf(victim, preemptor,
#: Normal, "Preempted", "Preempting", "Preempted by pod %v on node %v", ...)``, after it set the
#: DisruptionTarget condition and deleted the victim with its grace period).
SCHEDULER_PREEMPTED_EVENT = "Preempted"
_SCHEDULER_PREEMPTED_MESSAGE = "Preempted by pod "


def preempted_by_scheduler(pod_name: str, events: Sequence[Any]) -> Disruption | None:
    """A disruption for a pod that is gone (404) while its node stays, when the scheduler's ``Preempted``
    event on it says the scheduler preempted it: the scheduler deletes its victims, and the kubelet's final
    delete can come before the operator reads the pod's DisruptionTarget condition.

    :param pod_name: the pod that is gone.
    :param events: its events (``V1Event`` objects).
    """
    for event in events:
        message = str(getattr(event, "message", None) or "")
        if getattr(event, "reason", None) == SCHEDULER_PREEMPTED_EVENT and message.startswith(
            _SCHEDULER_PREEMPTED_MESSAGE
        ):
            return Disruption(pod_name, PREEMPTION_BY_SCHEDULER, message)
    return None


def stopped_by_kueue(pod_name: str, events: Sequence[Any]) -> Disruption | None:
    """A disruption for a queued pod that is gone (404), when Kueue's ``Stopped`` event on it says it was
    preempted or its node failed (the pod and its TerminationTarget condition went before anyone looked).

    :param pod_name: the pod that is gone.
    :param events: its events (``V1Event`` objects).
    """
    for event in events:
        if getattr(event, "reason", None) != KUEUE_STOPPED_EVENT:
            continue
        message = str(getattr(event, "message", None) or "")
        for prefix, reason in _KUEUE_EVICTION_MESSAGES:
            if message.startswith(prefix):
                return Disruption(pod_name, reason, message)
    return None


def replacement_message(disruption: Disruption, count: int, limit: int, checkpoint_dir: str) -> str:
    """The log line for the ``count``-th replacement pod."""
    return (
        f"Pod {disruption.pod_name} was preempted ({disruption.describe()}); starting replacement "
        f"{count} of {limit} from the checkpoint in {checkpoint_dir}"
    )


def limit_message(disruption: Disruption, limit: int) -> str:
    """The failure once a try has spent its ``max_preemptions``."""
    return (
        f"Pod {disruption.pod_name} was preempted ({disruption.describe()}) after {limit} replacement "
        f"pod(s) in this try: max_preemptions={limit} is spent. The next Airflow retry (if any) resumes "
        "from the checkpoint; raise max_preemptions= to keep replacing pods within one try, or run on "
        "nodes that are not preempted."
    )
