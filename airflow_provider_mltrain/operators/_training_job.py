"""The lifecycle of one multi-node training job (a JobSet or a Kubeflow TrainJob) on the Kubernetes API.

Create it, or re-attach to the one an earlier try of the same task instance left running; wait for it while
telling the task log what it is doing (waiting for Kueue admission, with the reason from the Workload Kueue
owns for the job, see :mod:`._kueue`; unschedulable, pulling the image, running, restarted k of N times,
preempted by Kueue); fail fast when it cannot be scheduled or admitted in time, or Kueue reports a queue it
cannot use; read the leader's result; delete it (foreground propagation) on kill and timeouts.

The reading of the resource (:func:`observe`) and the timers (:class:`Progress`) are pure and shared by the
synchronous wait here and the deferrable wait in
:class:`airflow_provider_mltrain.triggers.training_job.TrainingJobTrigger`, so both report the same states
and fail for the same reasons. The trigger only decides *when* the wait ends; what happens then
(:meth:`TrainingJobLifecycle.conclude`: the result, the triage, the deletion) runs on the worker in both modes.

Result channel: the leader (global rank 0) writes the contract result to its termination message file
(``contract.TERMINATION_MESSAGE_PATH``), which the kubelet copies into the pod status: no exec into pods, no
sidecar, and the result outlives the container. The kubelet keeps at most 4096 bytes (the file's tail), so
the trainer also prints the result as one marker line in its log; a result that does not parse from the
termination message is read from that line in the leader's log tail. The trade-off: the log fallback needs
the pod's log to still exist (it does while the finished pod is kept) and a log line that is not cut by the
container runtime (one line of a few KiB is fine).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.exceptions import AirflowException

from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators._manifests import (
    COMPLETION_INDEX_ANNOTATION,
    JOBSET_API_VERSION,
    NODE_NAME,
    QUEUE_LABEL,
    TRAINJOB_API_VERSION,
)
from airflow_provider_mltrain.operators._triage import (
    IMAGE_PULL_REASONS,
    GPUTrainingFailure,
    TriageContext,
    explain_unschedulable,
    image_pull_problem,
    is_collective_failure,
    triage,
    unschedulable_message,
)
from gpu_trainer import contract

NODE = NODE_NAME
#: Labels the JobSet controller puts on every pod (Kubeflow Trainer runs a TrainJob as a JobSet of the
#: same name, so they serve both backends).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
#: JobSet's Failed reason once the counted restarts reach maxRestarts
#: (kubernetes-sigs/jobset@08dfbdfd6827:pkg/constants/constants.go:51).
REACHED_MAX_RESTARTS = "ReachedMaxRestarts"
RESTART_ATTEMPT_LABEL = "jobset.sigs.k8s.io/restart-attempt"
#: The node rank: a label on recent Kubernetes, an annotation always.
COMPLETION_INDEX_KEY = COMPLETION_INDEX_ANNOTATION
FOREGROUND = "Foreground"
#: Log lines of the leader copied into the task log at the end, and searched for the result marker.
LOG_TAIL_LINES = 50
RESULT_SEARCH_LINES = 200

# What the job is doing, as the task log reports it.
ADMISSION = "waiting for admission"
STARTING = "starting"
UNSCHEDULABLE = "unschedulable"
PULLING = "pulling image"
RUNNING = "running"
SUCCEEDED = "finished"
FAILED = "failed"

# Why a wait ended (the trigger event's ``status``).
END_SUCCEEDED = "succeeded"
END_FAILED = "failed"
END_ADMISSION_TIMEOUT = "admission_timeout"
END_UNSCHEDULABLE = "unschedulable"
END_IMAGE_PULL = "image_pull"
END_GONE = "gone"
END_PREEMPTIONS = "preemptions_exhausted"
END_QUEUE_BLOCKED = "kueue_blocked"
END_ERROR = "error"


@dataclasses.dataclass(frozen=True)
class JobKind:
    """Where a training job's resource lives in the API."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


JOBSET = JobKind(JOBSET_API_VERSION.split("/")[0], JOBSET_API_VERSION.split("/")[1], "jobsets", "JobSet")
TRAINJOB = JobKind(
    TRAINJOB_API_VERSION.split("/")[0], TRAINJOB_API_VERSION.split("/")[1], "trainjobs", "TrainJob"
)


def job_kind(manifest: Mapping[str, Any]) -> JobKind:
    """The kind of a JobSet or TrainJob manifest.

    :raises ValueError: any other apiVersion/kind.
    """
    for known in (JOBSET, TRAINJOB):
        if (manifest.get("apiVersion"), manifest.get("kind")) == (known.api_version, known.kind):
            return known
    raise ValueError(
        f"manifest apiVersion/kind {manifest.get('apiVersion')}/{manifest.get('kind')} is neither "
        f"{JOBSET.api_version}/{JOBSET.kind} nor {TRAINJOB.api_version}/{TRAINJOB.kind}"
    )


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# -- reading the job ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Observation:
    """One look at the job and its pods.

    :param state: one of the state constants (``ADMISSION`` ... ``FAILED``).
    :param detail: what the task log adds to the state (a scheduler message, a condition's reason...).
    :param restarts: restarts of the whole job so far (JobSet ``status.restarts``), preemptions included.
    :param preemptions: those of them after a node was disrupted, which do not count toward
        ``maxRestarts`` (``status.restarts - status.restartsCountTowardsMax``).
    :param pod: the pod the detail is about, if any.
    :param pull_failing: the image pull has failed at least once (``ImagePullBackOff`` and the like).
    :param queue: the Kueue LocalQueue the job was submitted to ("" without Kueue).
    :param kueue_pending: why Kueue has not admitted it (``reason: message`` of its Workload), "" if unknown.
    :param queue_blocked: that reason is one no waiting fixes (a missing or stopped queue, see :mod:`._kueue`).
    :param kueue_preemptions: times Kueue evicted and re-queued the job (included in ``preemptions``).
    :param kueue_eviction: the latest eviction's ``reason: message``.
    """

    state: str
    detail: str = ""
    restarts: int = 0
    pod: str | None = None
    pull_failing: bool = False
    preemptions: int = 0
    queue: str = ""
    kueue_pending: str = ""
    queue_blocked: bool = False
    kueue_preemptions: int = 0
    kueue_eviction: str = ""


def _true_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def _labels(pod: Any) -> dict[str, str]:
    return dict(pod.metadata.labels or {}) if pod.metadata else {}


def _completion_index(pod: Any) -> int:
    """The pod's node rank (Indexed Job completion index; label on recent Kubernetes, annotation always)."""
    annotations = (pod.metadata.annotations or {}) if pod.metadata else {}
    raw = _labels(pod).get(COMPLETION_INDEX_KEY, annotations.get(COMPLETION_INDEX_KEY, "0"))
    try:
        return int(raw)
    except ValueError:
        return 0


def _replicated_job(pod: Any) -> str:
    """The pod's replicated job: ``node`` for the trainer's nodes, else e.g. a TrainJob's ``dataset-initializer``.

    A pod without the label (not made by JobSet) counts as a trainer node.
    """
    return _labels(pod).get(REPLICATED_JOB_LABEL, NODE)


def node_pods(pods: Sequence[Any]) -> list[Any]:
    """The trainer's node pods among ``pods`` (a TrainJob's initializer pods left out)."""
    return [pod for pod in pods if _replicated_job(pod) == NODE]


def current_pods(pods: Sequence[Any]) -> list[Any]:
    """The pods of the latest restart attempt, leader (node rank 0 of job 0) first."""
    attempts = [int(_labels(pod).get(RESTART_ATTEMPT_LABEL, "0") or 0) for pod in pods]
    latest = max(attempts, default=0)
    kept = [pod for pod, attempt in zip(pods, attempts, strict=True) if attempt == latest]
    return sorted(
        kept, key=lambda pod: (int(_labels(pod).get(JOB_INDEX_LABEL, "0") or 0), _completion_index(pod))
    )


def leader_pod(pods: Sequence[Any]) -> Any | None:
    """The global rank 0 pod of the latest attempt, or None when it does not exist (yet).

    Only the trainer's ``node`` replicated job counts: a TrainJob's initializer pods (dataset, model) have
    job index 0 and completion index 0 too: runtimes with initializers run ``dataset-initializer`` and
    ``model-initializer`` replicated jobs of one pod each, and ``node`` ``dependsOn`` them
    (kubeflow/trainer@8c0f5059bd51:manifests/base/runtimes/torchtune/llama3_2/llama3_2_1B.yaml:37-75;
    the names: pkg/constants/constants.go:53).
    """
    for pod in node_pods(current_pods(pods)):
        if _completion_index(pod) == 0 and _labels(pod).get(JOB_INDEX_LABEL, "0") == "0":
            return pod
    return None


def _waiting_reason(pod: Any) -> tuple[str | None, str | None]:
    status = pod.status
    for cs in [*(status.init_container_statuses or []), *(status.container_statuses or [])] if status else []:
        waiting = cs.state.waiting if cs.state is not None else None
        if waiting is not None and waiting.reason:
            return waiting.reason, waiting.message
    return None, None


def observe(job: Mapping[str, Any], pods: Sequence[Any]) -> Observation:
    """What a JobSet or TrainJob is doing, from its conditions and its pods.

    :param job: the resource as read from the API (a dict).
    :param pods: its pods (``V1Pod`` objects of the sync or async client).
    """
    status = job.get("status") or {}
    restarts = int(status.get("restarts") or 0)
    # The field is `omitempty`: JobSet leaves it out while it is 0, so after two preemption restarts with
    # maxRestarts 0 the status is {"restarts": 2} (kubernetes-sigs/jobset@08dfbdfd6827:
    # api/jobset/v1alpha2/jobset_types.go:218; failure_policy.go:195-198 adds to it only for a restart that
    # counts). Missing means 0: every JobSet that accepts our manifests' failurePolicy.rules (v0.6 on) has it.
    counted = int(status.get("restartsCountTowardsMax") or 0)
    preemptions = max(0, restarts - counted)
    failed = _true_condition(job, "Failed")
    if failed is not None:
        detail = f"{failed.get('reason') or 'Failed'}: {failed.get('message') or 'no message'}"
        return Observation(FAILED, detail, restarts, preemptions=preemptions)
    if _true_condition(job, "Completed", "Complete") is not None:
        return Observation(SUCCEEDED, "", restarts, preemptions=preemptions)
    if preemptions:
        # Every Observation below carries the count: the wait enforces max_preemptions whatever the state.
        return dataclasses.replace(_observe_running(job, pods, restarts), preemptions=preemptions)
    return _observe_running(job, pods, restarts)


def _observe_running(job: Mapping[str, Any], pods: Sequence[Any], restarts: int) -> Observation:
    """What a job that has not ended is doing."""
    # A JobSet under Kueue is created suspended; Kueue unsuspends it once the quota admits the workload.
    if (job.get("spec") or {}).get("suspend") or _true_condition(job, "Suspended") is not None:
        queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
        return Observation(ADMISSION, f"Kueue queue {queue!r}" if queue else "the job is suspended", restarts)
    pods = current_pods(pods)
    if not pods:
        return Observation(STARTING, "waiting for the controller to create the pods", restarts)
    for pod in pods:
        message = unschedulable_message(pod)
        if message is not None:
            return Observation(UNSCHEDULABLE, message, restarts, pod.metadata.name)
    for pod in pods:
        reason, message = _waiting_reason(pod)
        if reason in IMAGE_PULL_REASONS:
            return Observation(
                PULLING, f"{reason}: {message or 'no detail'}", restarts, pod.metadata.name, True
            )
    nodes = node_pods(pods)
    if not nodes:
        # JobSet starts the trainer's nodes only after the initializers complete (the runtime's dependsOn).
        running_initializers = sorted(
            {
                _replicated_job(pod)
                for pod in pods
                if pod.status is None or pod.status.phase not in ("Succeeded", "Failed")
            }
        )
        if not running_initializers:
            return Observation(STARTING, "waiting for the controller to create the pods", restarts)
        return Observation(STARTING, f"initializers running: {', '.join(running_initializers)}", restarts)
    running = sum(
        1 for pod in nodes if pod.status is not None and pod.status.phase in ("Running", "Succeeded")
    )
    if running < len(nodes):
        return Observation(PULLING, f"{running} of {len(nodes)} pods running", restarts)
    return Observation(RUNNING, f"{len(nodes)} pods", restarts)


def observe_queued(
    job: Mapping[str, Any], pods: Sequence[Any], workload: Mapping[str, Any] | None
) -> Observation:
    """:func:`observe`, plus what Kueue's Workload for the job says (None: not read, or none yet).

    While the job waits for admission the detail carries the Workload's reason and message; a job Kueue
    suspended again after admitting it (an eviction Kueue re-queues, e.g. a preemption) counts in
    ``preemptions`` like a node preemption does.
    """
    obs = observe(job, pods)
    queue = ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or ""
    if workload is None:
        return dataclasses.replace(obs, queue=queue)
    seen = kueue.view(workload)
    queue = queue or seen.queue
    waiting = obs.state == ADMISSION
    detail = obs.detail
    if waiting and seen.pending:
        detail = f"Kueue queue {queue!r}: {seen.pending}"
    return dataclasses.replace(
        obs,
        detail=detail,
        preemptions=obs.preemptions + seen.requeue_evictions,
        queue=queue,
        kueue_pending=seen.pending if waiting else "",
        queue_blocked=waiting and seen.blocked,
        kueue_preemptions=seen.requeue_evictions,
        kueue_eviction=seen.last_eviction,
    )


@dataclasses.dataclass(frozen=True)
class WaitPolicy:
    """How long a wait may take in each state.

    :param poll_interval_s: seconds between reads of the job.
    :param admission_timeout_s: give up after the job waited this long for admission (None: no limit).
    :param unschedulable_timeout_s: give up after a pod was unschedulable (and no node is on its way), or
        its image failed to pull, for this long (None: never).
    :param max_restarts: the job's restart budget (JobSet ``failurePolicy.maxRestarts``), for the log.
    :param max_preemptions: restarts after a disrupted node, and re-queues after a Kueue eviction, the wait
        allows before it fails (and the job is deleted); None: not enforced.
    :param queue_grace_s: fail (and delete the job) after Kueue reported a blocker no waiting fixes (a
        LocalQueue that does not exist, a stopped or inactive queue: :data:`._kueue.BLOCKED_REASONS`) for this
        long; None: never. The grace lets a LocalQueue applied together with the DAG appear: Kueue
        re-evaluates such a Workload when its queue changes.
    """

    poll_interval_s: float = 10.0
    admission_timeout_s: float | None = None
    unschedulable_timeout_s: float | None = 300.0
    max_restarts: int = 0
    max_preemptions: int | None = None
    queue_grace_s: float | None = kueue.QUEUE_GRACE_S

    def serialize(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Progress:
    """The wait's timers and what it has already told the log; the same object drives both modes.

    :param kind: the job's kind (for messages).
    :param name: the job's name.
    :param policy: the budgets.
    :param preemptions_before: the job's preemptions before this try (a re-attached job's): not this try's
        to count against ``max_preemptions``.
    """

    def __init__(self, kind: JobKind, name: str, policy: WaitPolicy, preemptions_before: int = 0) -> None:
        self.kind = kind
        self.name = name
        self.policy = policy
        self.preemptions_before = preemptions_before
        self._said: tuple[str, str, int] | None = None
        self._since: dict[str, float] = {}
        self._preemptions_said = preemptions_before
        # The first observation's count is the baseline (a re-attached job's or a restarted trigger's).
        self._kueue_said: int | None = None
        self._blocked_since: float | None = None

    def describe(self, obs: Observation) -> str | None:
        """The log line for this observation, or None when it says nothing new."""
        said = (obs.state, obs.detail if obs.state != RUNNING else "", obs.restarts)
        if said == self._said:
            return None
        self._said = said
        line = f"{self.kind.kind} {self.name}: {obs.state}"
        if obs.detail:
            line += f" ({obs.detail})"
        kueue_said, self._kueue_said = self._kueue_said, obs.kueue_preemptions
        if kueue_said is not None and obs.kueue_preemptions > kueue_said:
            self._preemptions_said = max(self._preemptions_said, obs.preemptions)
            limit = self.policy.max_preemptions
            this_try = obs.preemptions - self.preemptions_before
            line += f"; preempted by Kueue: {obs.kueue_eviction or 'evicted and re-queued'}"
            if limit is not None and this_try > limit:
                line += f" ({this_try} in this try); max_preemptions={limit}"  # step() ends the wait
            else:
                line += (
                    f"; preemption {this_try} of max_preemptions={'unlimited' if limit is None else limit} in "
                    "this try: re-queued, it resumes from the shared checkpoint once Kueue admits it again"
                )
        elif obs.preemptions > self._preemptions_said:
            self._preemptions_said = obs.preemptions
            limit = self.policy.max_preemptions
            this_try = obs.preemptions - self.preemptions_before
            if limit is not None and this_try > limit:
                # step() ends the wait on this observation; "restart 1, 1 of 0 preemptions" would mislead.
                line += f"; node set preempted ({this_try} in this try); max_preemptions={limit}"
            else:
                line += (
                    f"; node set preempted; restart {obs.restarts}, {this_try} of "
                    f"{'unlimited' if limit is None else limit} preemptions (not counted toward "
                    f"max_restarts={self.policy.max_restarts}): every node resumes from the shared checkpoint"
                )
        elif obs.restarts > obs.preemptions:
            # Only restarts counted toward max_restarts are "k of N"; the preemption restarts were logged above.
            line += (
                f"; restart {obs.restarts - obs.preemptions} of {self.policy.max_restarts}"
                + (f" (and {obs.preemptions} after preemptions)" if obs.preemptions else "")
                + ": every node resumes from the shared checkpoint"
            )
        return line

    def step(self, obs: Observation, now: float) -> dict[str, Any] | None:
        """The end of the wait (a trigger-event payload) or None to keep waiting.

        An ``unschedulable`` end is provisional: the caller asks whether the autoscaler is adding a node
        and, if so, calls :meth:`scaling_up` and keeps waiting.
        """
        for state in (ADMISSION, UNSCHEDULABLE, PULLING):
            active = obs.state == state and (state != PULLING or obs.pull_failing)
            if not active:
                self._since.pop(state, None)
            else:
                self._since.setdefault(state, now)
        if obs.state == SUCCEEDED:
            return self.end(END_SUCCEEDED, "", obs)
        limit = self.policy.max_preemptions
        this_try = obs.preemptions - self.preemptions_before
        if limit is not None and this_try > limit:
            how = (
                f"was preempted {this_try} times in this try ({obs.kueue_preemptions} by Kueue, last: "
                f"{obs.kueue_eviction or 'evicted and re-queued'})"
                if obs.kueue_preemptions
                else f"a node was preempted (evicted, drained or its node shut down) {this_try} times in this try"
            )
            return self.end(
                END_PREEMPTIONS,
                f"{self.kind.kind} {self.name}: {how}: max_preemptions={limit} is spent, so the job "
                "was deleted. The next Airflow retry (if any) resumes from the shared checkpoint; raise "
                "max_preemptions= to keep restarting within one try, or run on nodes that are not preempted.",
                obs,
            )
        if obs.state == FAILED:
            return self.end(END_FAILED, obs.detail, obs)
        if not obs.queue_blocked:
            self._blocked_since = None
        elif self._blocked_since is None:
            self._blocked_since = now
        grace = self.policy.queue_grace_s
        if self._blocked_since is not None and grace is not None and now - self._blocked_since >= grace:
            what = f"{self.kind.kind} {self.name}"
            message = kueue.blocked_message(what, obs.queue, obs.kueue_pending, now - self._blocked_since)
            return self.end(END_QUEUE_BLOCKED, message, obs)
        waited = {state: now - since for state, since in self._since.items()}
        admission = self.policy.admission_timeout_s
        if admission is not None and waited.get(ADMISSION, -1.0) >= admission:
            # The clock starts again each time Kueue re-queues the job: waiting for re-admission after a
            # preemption is the same wait for quota as the first one, and the preemption is counted apart.
            admitted = (
                f"was preempted by Kueue ({obs.kueue_eviction or 'evicted and re-queued'}) and not re-admitted"
                if obs.kueue_preemptions
                else "was not admitted"
            )
            return self.end(
                END_ADMISSION_TIMEOUT,
                f"{self.kind.kind} {self.name} {admitted} within admission_timeout_seconds={admission:g} "
                f"({obs.detail}). Likely fix: check the queue's ClusterQueue quota and pending workloads "
                "(`kubectl get workloads -A`, `kubectl describe clusterqueue`), lower num_nodes=/gpus=, or raise "
                "admission_timeout_seconds=",
                obs,
            )
        budget = self.policy.unschedulable_timeout_s
        if budget is not None and waited.get(UNSCHEDULABLE, -1.0) >= budget:
            return self.end(END_UNSCHEDULABLE, obs.detail, obs)
        if budget is not None and waited.get(PULLING, -1.0) >= budget:
            return self.end(END_IMAGE_PULL, obs.detail, obs)
        return None

    def scaling_up(self, now: float) -> None:
        """The autoscaler is adding a node: the unschedulable clock starts again."""
        self._since[UNSCHEDULABLE] = now

    def end(self, status: str, message: str, obs: Observation | None = None) -> dict[str, Any]:
        return {
            "status": status,
            "name": self.name,
            "message": message,
            "restarts": obs.restarts if obs else 0,
            "preemptions": obs.preemptions if obs else 0,
            "pod": obs.pod if obs else None,
        }


# -- the synchronous client ---------------------------------------------------------------------------


class TrainingJobClient:
    """The API calls of one execution, over KubernetesHook's synchronous client.

    :param api_client: ``KubernetesHook.get_conn()``.
    :param kind: JobSet or TrainJob.
    :param namespace: where the job lives.
    """

    def __init__(self, api_client: Any, kind: JobKind, namespace: str) -> None:
        from kubernetes.client import CoreV1Api, CustomObjectsApi

        self.kind = kind
        self.namespace = namespace
        self.custom = CustomObjectsApi(api_client)
        self.core = CoreV1Api(api_client)
        self.workloads = kueue.WorkloadReader()

    def _args(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(*self._args(), dict(manifest))

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(*self._args(), name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def find(self, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Jobs carrying all ``labels`` that are not being deleted, oldest first."""
        found = self.custom.list_namespaced_custom_object(
            *self._args(), label_selector=label_selector(labels)
        )
        items = [item for item in found.get("items") or [] if not item["metadata"].get("deletionTimestamp")]
        return sorted(items, key=lambda item: item["metadata"].get("creationTimestamp") or "")

    def delete(self, name: str, *, wait_s: float = 120.0, poll_interval_s: float = 1.0) -> None:
        """Delete with foreground propagation (the pods go first) and wait until the job is gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(*self._args(), name, propagation_policy=FOREGROUND)
        except ApiException as err:
            if err.status != 404:
                raise
        deadline = time.monotonic() + wait_s
        while self.get(name) is not None and time.monotonic() < deadline:
            time.sleep(poll_interval_s)

    def workload(self, job: Mapping[str, Any]) -> dict[str, Any] | None:
        """The Workload Kueue owns for a job submitted to a queue (None: not queued, none yet, unreadable)."""
        return kueue.read_workload(self.custom, self.namespace, self.workloads, job)

    def pods(self, name: str) -> list[Any]:
        # Kubeflow Trainer runs a TrainJob as a JobSet of the same name: one selector serves both.
        found = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_NAME_LABEL}={name}")
        return list(found.items or [])

    def log_tail(self, pod: str, lines: int) -> list[str]:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=NODE, tail_lines=lines, _preload_content=False
        )
        return response.data.decode("utf-8", "replace").splitlines()

    def scaling_up(self, pod: str) -> bool:
        """Whether the cluster autoscaler reported ``TriggeredScaleUp`` for this pod."""
        try:
            events = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={pod}"
            ).items
        except Exception:
            return False
        return any(event.reason == "TriggeredScaleUp" for event in events or [])


# -- the lifecycle ------------------------------------------------------------------------------------


def parse_result(leader: Any, log_tail: Sequence[str]) -> dict[str, Any]:
    """The leader's validated contract result: its termination message, else the log's marker line.

    :param leader: the leader pod (``V1Pod``).
    :param log_tail: the leader's last log lines (searched only when the termination message fails).
    :raises AirflowException: no result, or one that is not JSON or breaks the contract.
    """
    name = leader.metadata.name
    message = None
    for cs in (leader.status.container_statuses if leader.status else None) or []:
        if cs.name == NODE and cs.state is not None and cs.state.terminated is not None:
            message = cs.state.terminated.message
    raw: Any = None
    where = f"the termination message of pod {name}"
    if message:
        try:
            raw = json.loads(message)
        except ValueError:
            raw = None  # over the kubelet's 4 KiB it holds only the tail: read the log line instead
    if raw is None:
        where = f"the {contract.RESULT_LOG_MARKER.strip()!r} line of pod {name}'s log"
        try:
            raw = contract.parse_result_log_line(log_tail)
        except ValueError as err:
            raise AirflowException(f"trainer result in {where} is not valid JSON ({err})") from err
    if raw is None:
        raise AirflowException(
            f"the leader pod {name} reported no result: its termination message is "
            f"{'not JSON' if message else 'empty'} and its last {len(log_tail)} log lines have no "
            f"{contract.RESULT_LOG_MARKER.strip()!r} line. Expected a JSON object with keys "
            f"{list(contract.RESULT_KEYS)} (does the trainer call gpu_trainer.contract.report_result on rank 0, "
            f"with {contract.ENV_RESULT_PATH}={contract.TERMINATION_MESSAGE_PATH}?)"
        )
    try:
        return contract.validate_result(raw)
    except contract.ContractError as err:
        raise AirflowException(f"{err} (read from {where})") from err


class TrainingJobLifecycle:
    """Start, wait for, conclude and kill one task instance's training job.

    :param client: the execution's API calls.
    :param policy: the wait's budgets.
    :param triage_context: what was asked for, to phrase the fixes.
    :param log: the task's logger.
    """

    def __init__(
        self, client: TrainingJobClient, policy: WaitPolicy, triage_context: TriageContext, log: Any
    ):
        self.client = client
        self.kind = client.kind
        self.policy = policy
        self.triage_context = triage_context
        self.log = log
        #: The re-attached job's preemptions from earlier tries (set by :meth:`start`).
        self.preemptions_before = 0

    def start(self, manifest: Mapping[str, Any], labels: Mapping[str, str]) -> str:
        """Re-attach to this task instance's running job, or create one (replacing a finished one).

        :param manifest: the job to create.
        :param labels: the labels that identify the task instance (dag, task, run, map index; not the try).
        :returns: the name of the job to wait for.
        """
        for job in self.client.find(labels):
            name = job["metadata"]["name"]
            obs = observe_queued(job, [], self.client.workload(job))
            if obs.state not in (SUCCEEDED, FAILED):
                self.preemptions_before = obs.preemptions
                self.log.info(
                    "Re-attaching to %s %s of this task instance (created %s by an earlier try; %s)",
                    self.kind.kind,
                    name,
                    job["metadata"].get("creationTimestamp"),
                    obs.state,
                )
                return name
            self.log.info(
                "Deleting %s %s of an earlier try (%s); the new one resumes from the checkpoint",
                self.kind.kind,
                name,
                obs.state,
            )
            self.client.delete(name, poll_interval_s=self.policy.poll_interval_s)
        created = self.client.create(manifest)
        name = created["metadata"]["name"]
        self.log.info("Created %s %s in namespace %s", self.kind.kind, name, self.client.namespace)
        return name

    def wait(self, name: str) -> dict[str, Any]:
        """Poll until the job ends, a budget is spent, or it vanishes; returns the end (an event payload)."""
        progress = Progress(self.kind, name, self.policy, self.preemptions_before)
        while True:
            job = self.client.get(name)
            if job is None:
                return progress.end(
                    END_GONE, f"{self.kind.kind} {name} was deleted while the task waited for it"
                )
            obs = observe_queued(job, self.client.pods(name), self.client.workload(job))
            problem = self.client.workloads.say_problem()
            if problem:
                self.log.warning("Cannot read Kueue's Workload for %s %s: %s", self.kind.kind, name, problem)
            line = progress.describe(obs)
            if line:
                self.log.info("%s", line)
            now = time.monotonic()
            end = progress.step(obs, now)
            if (
                end is not None
                and end["status"] == END_UNSCHEDULABLE
                and self.client.scaling_up(str(obs.pod))
            ):
                self.log.info("The cluster autoscaler is adding a node for pod %s: waiting for it", obs.pod)
                progress.scaling_up(now)
                end = None
            if end is not None:
                return end
            time.sleep(self.policy.poll_interval_s)

    def conclude(self, end: Mapping[str, Any]) -> dict[str, Any]:
        """Act on the end of a wait (either mode): return the leader's result or raise naming the cause.

        :param end: what :meth:`wait` or the trigger returned.
        """
        status, name, message = end["status"], end["name"], end.get("message") or ""
        what = f"{self.kind.kind} {name}"
        if status == END_ERROR:
            raise AirflowException(f"Waiting for {what} failed: {message}")
        if status == END_GONE:
            raise AirflowException(message or f"{what} no longer exists")
        if status in (END_ADMISSION_TIMEOUT, END_PREEMPTIONS, END_QUEUE_BLOCKED):
            self._delete_after_failure(name)
            raise GPUTrainingFailure(message)
        if status in (END_UNSCHEDULABLE, END_IMAGE_PULL):
            cause = self._pod_cause(name, str(end.get("pod") or ""), status, message)
            self._delete_after_failure(name)
            raise GPUTrainingFailure(cause)
        pods = self.client.pods(name)
        leader = leader_pod(pods)
        tail = self._show_leader_log(leader)
        if status == END_SUCCEEDED:
            if leader is None:
                raise AirflowException(
                    f"{what} finished but its leader pod (node 0) is gone: no result to read"
                )
            return parse_result(leader, tail)
        raise GPUTrainingFailure(
            self._failure_cause(
                what,
                message,
                int(end.get("restarts") or 0) - int(end.get("preemptions") or 0),
                pods,
                leader,
                tail,
            )
        )

    def kill(self, name: str) -> None:
        """Delete the job and its pods (foreground), e.g. on kill or execution_timeout."""
        self.log.info("Deleting %s %s (propagationPolicy=%s)", self.kind.kind, name, FOREGROUND)
        self.client.delete(name, wait_s=0)

    # -- helpers -------------------------------------------------------------------------------------

    def _delete_after_failure(self, name: str) -> None:
        # A job left behind would still be admitted or scheduled later and hold GPUs nobody waits for.
        try:
            self.kill(name)
        except Exception as err:
            self.log.warning("Could not delete %s %s: %s", self.kind.kind, name, err)

    def _show_leader_log(self, leader: Any | None) -> list[str]:
        if leader is None:
            return []
        try:
            tail = self.client.log_tail(leader.metadata.name, RESULT_SEARCH_LINES)
        except Exception as err:
            self.log.warning("Could not read the leader pod's log: %s", err)
            return []
        shown = [line for line in tail if contract.RESULT_LOG_MARKER not in line][-LOG_TAIL_LINES:]
        if shown:
            self.log.info(
                "Leader pod %s, last %d log lines:\n%s", leader.metadata.name, len(shown), "\n".join(shown)
            )
        return tail

    def _pod_cause(self, name: str, pod_name: str, status: str, message: str) -> str:
        budget = self.policy.unschedulable_timeout_s or 0.0
        if status == END_UNSCHEDULABLE:
            return (
                explain_unschedulable(message, self.triage_context)
                + f"\n(pod {pod_name} of {self.kind.kind} {name}: gave up after {budget:g}s unschedulable; "
                "raise unschedulable_timeout_seconds= to wait longer)"
            )
        pods = [pod for pod in self.client.pods(name) if pod.metadata.name == pod_name]
        problem = image_pull_problem(pods[0], NODE, self.triage_context) if pods else None
        return (problem or f"Training image cannot be pulled ({message})") + (
            f"\n(pod {pod_name}: gave up after {budget:g}s; the job was deleted)"
        )

    def _failure_cause(
        self,
        what: str,
        message: str,
        restarts: int,
        pods: Sequence[Any],
        leader: Any | None,
        leader_tail: list[str],
    ) -> str:
        """The job failed: name the node and cause (a rank's own error over the NCCL errors it caused)."""
        causes: list[tuple[Any, str]] = []
        for pod in current_pods(pods)[:16]:
            tail = leader_tail[-LOG_TAIL_LINES:] if pod is leader else self._tail(pod)
            cause = triage(pod, NODE, tail, self.triage_context)
            if cause:
                causes.append((pod, cause))
        # One rank's crash makes every other rank's collective time out: its own cause comes first.
        causes.sort(key=lambda found: is_collective_failure(found[1]))
        max_restarts = self.policy.max_restarts
        if restarts > 0 and (REACHED_MAX_RESTARTS in message or restarts >= max_restarts):
            text = (
                f"{what} failed ({message})\nRestarts exhausted: {restarts} of max_restarts={max_restarts} "
                "used, each resumed from the checkpoint and failed again. Likely fix: the cause below repeats "
                "on every restart; fix it, or raise max_restarts= when the failures are transient "
                "(preemptions, node faults)."
            )
        elif REACHED_MAX_RESTARTS in message:
            # JobSet says ReachedMaxRestarts for any failure once restartsCountTowardsMax >= maxRestarts
            # (kubernetes-sigs/jobset@08dfbdfd6827:pkg/controllers/failure_policy.go:226-231), so with
            # maxRestarts 0 a first-attempt crash reads "reaching max number of restarts": none happened.
            text = (
                f"{what} failed on its first attempt, with no restart: max_restarts={max_restarts} allows "
                f"none ({message})"
            )
        else:
            text = f"{what} failed ({message})"
        if causes:
            pod, cause = causes[0]
            where = (
                f"Node {_completion_index(pod)}"
                if _replicated_job(pod) == NODE
                else f"Replicated job {_replicated_job(pod)}"
            )
            text += f"\n{where} (pod {pod.metadata.name}): {cause}"
        return text

    def _tail(self, pod: Any) -> list[str]:
        try:
            return self.client.log_tail(pod.metadata.name, LOG_TAIL_LINES)
        except Exception:
            return []
