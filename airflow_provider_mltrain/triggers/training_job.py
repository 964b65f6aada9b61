"""TrainingJobTrigger: wait, on the triggerer, until a multi-node training job (JobSet or TrainJob) ends.

It reads the job, its pods and (with Kueue) the job's Workload with the async Kubernetes client of
``AsyncKubernetesHook`` and applies the
same reading (:func:`~airflow_provider_mltrain.operators._training_job.observe`) and budgets
(:class:`~airflow_provider_mltrain.operators._training_job.Progress`) as the synchronous wait, so both modes
report the same states and give up for the same reasons. It only decides when the wait ends; the
operator's ``execute_complete`` reads the result, triages a failure and deletes what must go. The budgets
(admission, unschedulable) are counted from when this trigger first sees the state: a triggerer restart
starts them again, which errs on the side of waiting longer, never of deleting a job early.

The classpath ``airflow_provider_mltrain.triggers.training_job.TrainingJobTrigger`` is stored with every
deferred task: it must not move.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators._training_job import (
    END_ERROR,
    END_GONE,
    END_UNSCHEDULABLE,
    JOBSET_NAME_LABEL,
    JobKind,
    Progress,
    WaitPolicy,
    observe_queued,
)

#: Consecutive failed API reads tolerated before the wait gives up (an API server blip should not end
#: a training run's wait; a retry of the task would re-attach anyway).
MAX_CONSECUTIVE_ERRORS = 3


class TrainingJobTrigger(BaseTrigger):
    """Fires once when the job finishes or fails, a budget is spent, or it vanishes.

    Event payload: ``status`` (``succeeded``, ``failed``, ``admission_timeout``, ``unschedulable``,
    ``image_pull``, ``preemptions_exhausted``, ``kueue_blocked``, ``gone``, ``error``), ``name``, ``message``, ``restarts``,
    ``preemptions``, ``pod``.

    :param name: the job's name.
    :param namespace: the job's namespace.
    :param group: the resource's API group (``jobset.x-k8s.io`` or ``trainer.kubeflow.org``).
    :param version: the API version.
    :param plural: the resource's plural (``jobsets`` or ``trainjobs``).
    :param kind: the resource's kind, for messages.
    :param policy: :class:`WaitPolicy` fields (poll interval, admission and unschedulable budgets, max restarts).
    :param kubernetes_conn_id: the Kubernetes connection.
    :param config_file: a kubeconfig path overriding the connection's.
    :param cluster_context: a kubeconfig context overriding the connection's.
    :param preemptions_before: the job's preemptions before this try (a re-attached job's), not counted
        against ``max_preemptions``.
    """

    def __init__(
        self,
        *,
        name: str,
        namespace: str,
        group: str,
        version: str,
        plural: str,
        kind: str,
        policy: dict[str, Any],
        kubernetes_conn_id: str | None = "kubernetes_default",
        config_file: str | None = None,
        cluster_context: str | None = None,
        preemptions_before: int = 0,
    ) -> None:
        super().__init__()
        self.preemptions_before = preemptions_before
        self.name = name
        self.namespace = namespace
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.policy = dict(policy)
        self.kubernetes_conn_id = kubernetes_conn_id
        self.config_file = config_file
        self.cluster_context = cluster_context

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_provider_mltrain.triggers.training_job.TrainingJobTrigger",
            {
                "name": self.name,
                "namespace": self.namespace,
                "group": self.group,
                "version": self.version,
                "plural": self.plural,
                "kind": self.kind,
                "policy": self.policy,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "config_file": self.config_file,
                "cluster_context": self.cluster_context,
                "preemptions_before": self.preemptions_before,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        policy = WaitPolicy(**self.policy)
        progress = Progress(
            JobKind(self.group, self.version, self.plural, self.kind),
            self.name,
            policy,
            self.preemptions_before,
        )
        try:
            hook = AsyncKubernetesHook(
                conn_id=self.kubernetes_conn_id,
                config_file=self.config_file,
                cluster_context=self.cluster_context,
            )
            async with hook.get_conn() as api_client:
                end = await self._wait(api_client, progress, policy)
        except Exception as err:
            end = progress.end(END_ERROR, f"{type(err).__name__}: {err}")
        yield TriggerEvent(end)

    async def _wait(self, api_client: Any, progress: Progress, policy: WaitPolicy) -> dict[str, Any]:
        from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi
        from kubernetes_asyncio.client.exceptions import ApiException

        custom, core = CustomObjectsApi(api_client), CoreV1Api(api_client)
        workloads = kueue.WorkloadReader()
        errors = 0
        while True:
            try:
                job = await custom.get_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural, self.name
                )
                pods = await core.list_namespaced_pod(
                    self.namespace, label_selector=f"{JOBSET_NAME_LABEL}={self.name}"
                )
            except ApiException as err:
                if err.status == 404:
                    return progress.end(
                        END_GONE, f"{self.kind} {self.name} was deleted while the task waited for it"
                    )
                errors += 1
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    raise
                self.log.warning("Reading %s %s failed (%s); retrying", self.kind, self.name, err.reason)
                await asyncio.sleep(policy.poll_interval_s)
                continue
            errors = 0
            obs = observe_queued(job, pods.items or [], await self._workload(custom, workloads, job))
            problem = workloads.say_problem()
            if problem:
                self.log.warning("Cannot read Kueue's Workload for %s %s: %s", self.kind, self.name, problem)
            line = progress.describe(obs)
            if line:
                self.log.info("%s", line)
            now = time.monotonic()
            end = progress.step(obs, now)
            if (
                end is not None
                and end["status"] == END_UNSCHEDULABLE
                and await self._scaling_up(core, obs.pod)
            ):
                self.log.info("The cluster autoscaler is adding a node for pod %s: waiting for it", obs.pod)
                progress.scaling_up(now)
                end = None
            if end is not None:
                return end
            await asyncio.sleep(policy.poll_interval_s)

    async def _workload(
        self, custom: Any, reader: kueue.WorkloadReader, job: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The async twin of :meth:`TrainingJobClient.workload`."""
        from kubernetes_asyncio.client.exceptions import ApiException

        uid = reader.uid_to_read(job)
        while uid is not None and reader.version is not None:
            try:
                found = await custom.list_namespaced_custom_object(
                    kueue.GROUP,
                    reader.version,
                    self.namespace,
                    kueue.PLURAL,
                    label_selector=f"{kueue.JOB_UID_LABEL}={uid}",
                )
            except ApiException as err:
                if reader.failed(err.status, str(err.reason)):
                    continue
                break
            return reader.found(found.get("items") or [], uid)
        return reader.last(uid)

    async def _scaling_up(self, core: Any, pod: str | None) -> bool:
        try:
            events = await core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={pod}"
            )
        except Exception:
            return False
        return any(event.reason == "TriggeredScaleUp" for event in events.items or [])
