"""GPUTrainingPodOperator: run a training job as a Kubernetes pod on GPU nodes (or locally).

A :class:`KubernetesPodOperator` that knows what a training job needs: GPU requests and node affinity,
the GPU taint's toleration, shared memory for DataLoader workers, checkpoints that survive retries,
MLflow wiring without credentials in the pod spec, a restricted security context, torchrun for several
GPUs, a validated result in XCom, and errors that say why a GPU pod failed. Everything the parent accepts
still works.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.exceptions import AirflowException
from airflow.providers.cncf.kubernetes.kubernetes_helper_functions import add_unique_suffix
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.utils.container import container_is_succeeded
from airflow.providers.cncf.kubernetes.utils.pod_manager import (
    PodLaunchFailedException,
    PodLaunchTimeoutException,
    PodPhase,
)
from airflow.providers.cncf.kubernetes.utils.xcom_sidecar import PodDefaults
from airflow.providers.common.compat.sdk import AirflowSkipException, conf
from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from airflow_provider_mltrain.hooks.mlflow import MLflowHook
from airflow_provider_mltrain.launchers.local import LocalLauncher, LocalTrainerTimeout, local_checkpoint_root
from airflow_provider_mltrain.links.mlflow import MLflowRunLink
from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators import _pod_spec as spec
from airflow_provider_mltrain.operators import _pod_template as template
from airflow_provider_mltrain.operators import _preemption as preemption
from airflow_provider_mltrain.operators._arguments import check_arguments
from airflow_provider_mltrain.operators._manifests import QUEUE_LABEL
from airflow_provider_mltrain.operators._pod_template import TrainingPodParams, apply_training_template
from airflow_provider_mltrain.operators._scheduling import await_scheduling
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure, TriageContext, triage
from gpu_trainer import contract

if TYPE_CHECKING:
    from airflow.sdk import Context

_UNSET: Any = object()


class _OfflineKubernetesHook:
    """Stands in for the Kubernetes hook when the local launcher builds the pod: no cluster is asked."""

    is_in_cluster = False

    def get_namespace(self) -> str | None:
        return None

    def get_xcom_sidecar_container_image(self) -> str | None:
        return None

    def get_xcom_sidecar_container_resources(self) -> None:
        return None

    def get_xcom_sidecar_container_security_context(self) -> None:
        return None


class _WithoutPodBuildMessage:
    """The task logger minus KubernetesPodOperator's "Building pod ..." line (the local launcher builds
    the pod spec only to validate it)."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(msg, str) and msg.startswith("Building pod "):
            return
        self._log.info(msg, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


class GPUTrainingPodOperator(KubernetesPodOperator):
    """Run a training job in a Kubernetes pod with GPUs, and push its validated result to XCom.

    The trainer follows :mod:`gpu_trainer.contract`: it reads ``MLTRAIN_HYPERPARAMETERS``,
    ``MLTRAIN_CHECKPOINT_DIR`` and ``MLTRAIN_LINEAGE`` and writes its result JSON to ``MLTRAIN_RESULT_PATH``.
    The result is this task's return value; ``run_id``, ``model_uri`` and ``metrics`` are also pushed
    as XCom keys of their own. Every ``KubernetesPodOperator`` parameter is accepted as well.

    :param image: the trainer image (templated).
    :param cmds: the command; default ``["python", "-m", "gpu_trainer.train"]`` (templated).
    :param arguments: its arguments, passed through (templated).
    :param gpus: GPUs to request (requests = limits); 0 runs a CPU-only job.
    :param gpu_resource: the extended resource name, e.g. ``nvidia.com/gpu`` or ``amd.com/gpu``.
    :param gpu_type: accepted GPU product(s), as values of ``gpu_type_label``; becomes required node affinity.
    :param gpu_type_label: the node label holding the GPU product (NVIDIA GPU Feature Discovery's by default).
    :param cpu: CPU request and limit, a Kubernetes quantity such as ``"8"`` or ``"500m"`` (templated).
    :param memory: memory request and limit, a Kubernetes quantity such as ``"32Gi"`` (templated).
    :param shm_size: size of the memory-backed ``/dev/shm``: a quantity, ``True`` (no explicit size),
        ``False`` (none) or None (on when ``gpus > 0``; PyTorch DataLoader workers die with "Bus error"
        without it). It counts against the container's memory limit.
    :param hyperparameters: hyperparameters for the trainer, a JSON-serializable dict (templated);
        ``.partial(...).expand(hyperparameters=[...])`` runs a sweep.
    :param mlflow_conn_id: MLflow connection whose tracking URI the trainer logs to.
    :param experiment_name: the MLflow experiment (templated).
    :param mlflow_secret: name of a Kubernetes Secret holding ``MLFLOW_TRACKING_USERNAME`` /
        ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` keys (all optional); they reach the pod
        only as Secret references (templated).
    :param data_secret: name of a Kubernetes Secret whose keys ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_ENDPOINT_URL`` / ``AWS_DEFAULT_REGION``
        (all optional) give the trainer's S3 client its credentials, endpoint and region; they reach
        the pod only as Secret references (templated). Or leave it out and give the pod a service
        account with a cloud identity (``service_account_name=``, IRSA / workload identity).
    :param aws_conn_id: local launcher: the Amazon connection whose credentials, ``endpoint_url`` and
        region the trainer process gets in its own environment (never the worker's); the worker's own
        ``AWS_*`` variables never reach it. Pods never get connection credentials (see ``data_secret``).
    :param checkpoint_volume: ``{"claim_name": <PVC>, "mount_path": <path>}``: keep checkpoints on a PVC.
    :param checkpoint_uri: or a URI prefix the trainer writes checkpoints under (e.g. ``s3://bucket/ckpt``)
        (templated). Either way the directory is per dag/task/run/map index, not per try, so a retry resumes.
    :param checkpoint_key: key the checkpoint directory by DAG run and this value instead of task and map
        index (templated; one path segment such as ``trial_007``): every task of the run that passes the
        same key resumes the same checkpoint, e.g. a sweep's next round continuing a trial (see
        :func:`airflow_provider_mltrain.sweeps.successive_halving`). Retries resume it too.
    :param distributed: launch under torchrun with ``nproc_per_node`` processes (default: one per GPU).
    :param nproc_per_node: torchrun processes on the node; setting it implies ``distributed``.
    :param launcher: ``"kubernetes"`` (pods) or ``"local"`` (a subprocess on the worker); default from the
        ``[mltrain] launcher`` setting. Never a silent fallback.
    :param queue_name: Kueue LocalQueue to submit the pod to (the ``kueue.x-k8s.io/queue-name`` label; needs
        Kueue's pod integration). While Kueue holds the pod behind its admission gate the log says "waiting
        for admission" with Kueue's reason (its Workload, read-only) and the unschedulable fail-fast waits;
        the wait counts against ``schedule_timeout_seconds`` (raise it for long queues). A queue Kueue reports
        missing, stopped or inactive fails the task after 60 s (with ``unschedulable_timeout_seconds`` set).
        A pod Kueue preempts is replaced, back in the queue, within ``max_preemptions``.
    :param unschedulable_timeout_seconds: fail after the scheduler has called the pod unschedulable for
        this long (unless the cluster autoscaler is scaling up); None waits ``schedule_timeout_seconds``.
        In deferrable mode the worker watches scheduling before it defers, for at most twice this long:
        it defers as soon as the pod is scheduled or the autoscaler is adding a node, and fails (and
        deletes the pod) when no node can take it.
    :param local_kill_grace_seconds: local launcher: seconds between SIGTERM and SIGKILL on kill/timeout.
    :param max_preemptions: replacement pods per try when the pod is preempted (by the scheduler or by
        Kueue), evicted, its node shuts down or vanishes (see :mod:`._preemption`); each new pod resumes from the same checkpoint directory
        without failing the try or spending a retry. The local launcher restarts a trainer that exited
        ``143`` after a SIGTERM that did not come from Airflow the same way. 0 fails on the first.
    :param termination_grace_period: seconds Kubernetes waits between SIGTERM and SIGKILL (the pod's
        ``terminationGracePeriodSeconds``, also used when the task is killed); default 120, the notice
        AWS gives a spot instance, time for the trainer's SIGTERM checkpoint. Size it from the trainer's
        "checkpoint ... written in N s" line (see the README, "Preemption and spot nodes").
    """

    template_fields: Sequence[str] = tuple(
        dict.fromkeys(
            (
                *KubernetesPodOperator.template_fields,
                "hyperparameters",
                "experiment_name",
                "checkpoint_uri",
                "checkpoint_key",
                "mlflow_secret",
                "data_secret",
                "cpu",
                "memory",
            )
        )
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **KubernetesPodOperator.template_fields_renderers,
        "hyperparameters": "json",
    }
    operator_extra_links = (MLflowRunLink(),)

    gpus: int
    gpu_resource: str
    gpu_type_label: str
    gpu_type: list[str]
    cpu: Any
    memory: Any
    shm_size: str | bool | None
    hyperparameters: Any
    mlflow_conn_id: str | None
    experiment_name: str | None
    mlflow_secret: str | None
    data_secret: str | None
    aws_conn_id: str | None
    checkpoint_volume: dict[str, str] | None
    checkpoint_uri: str | None
    checkpoint_key: str | None
    nproc_per_node: int | None
    distributed: bool
    launcher: str | None
    unschedulable_timeout_seconds: int | None
    local_kill_grace_seconds: float
    max_preemptions: int
    _local_launcher: LocalLauncher | None
    _xcom_problem: str | None
    _startup_failure: GPUTrainingFailure | None
    _final_result: Any
    _node_name: str | None
    _timed_out: bool

    def __init__(
        self,
        *,
        image: str | None = None,
        cmds: list[str] | None = None,
        arguments: list[str] | None = None,
        gpus: int = 0,
        gpu_resource: str = spec.DEFAULT_GPU_RESOURCE,
        gpu_type: str | list[str] | None = None,
        gpu_type_label: str = spec.DEFAULT_GPU_TYPE_LABEL,
        cpu: str | int | float | None = None,
        memory: str | int | None = None,
        shm_size: str | bool | None = None,
        hyperparameters: dict[str, Any] | str | None = None,
        mlflow_conn_id: str | None = None,
        experiment_name: str | None = None,
        mlflow_secret: str | None = None,
        data_secret: str | None = None,
        aws_conn_id: str | None = None,
        checkpoint_volume: dict[str, str] | None = None,
        checkpoint_uri: str | None = None,
        checkpoint_key: str | None = None,
        distributed: bool = False,
        nproc_per_node: int | None = None,
        launcher: str | None = None,
        queue_name: str | None = None,
        unschedulable_timeout_seconds: int | None = 60,
        local_kill_grace_seconds: float = 10.0,
        max_preemptions: int = 3,
        termination_grace_period: int | None = preemption.DEFAULT_TERMINATION_GRACE_PERIOD_S,
        do_xcom_push: bool = True,
        **kwargs: Any,
    ) -> None:
        checked = check_arguments(
            {
                "do_xcom_push": do_xcom_push,
                "gpus": gpus,
                "gpu_resource": gpu_resource,
                "gpu_type": gpu_type,
                "gpu_type_label": gpu_type_label,
                "cpu": cpu,
                "memory": memory,
                "shm_size": shm_size,
                "hyperparameters": hyperparameters,
                "cmds": cmds,
                "mlflow_secret": mlflow_secret,
                "data_secret": data_secret,
                "aws_conn_id": aws_conn_id,
                "checkpoint_volume": checkpoint_volume,
                "checkpoint_uri": checkpoint_uri,
                "checkpoint_key": checkpoint_key,
                "distributed": distributed,
                "nproc_per_node": nproc_per_node,
                "launcher": launcher,
                "queue_name": queue_name,
                "unschedulable_timeout_seconds": unschedulable_timeout_seconds,
                "local_kill_grace_seconds": local_kill_grace_seconds,
                "max_preemptions": max_preemptions,
                "container_resources": kwargs.get("container_resources"),
                "env_vars": kwargs.get("env_vars"),
            }
        )
        if queue_name:
            # Kueue's pod integration: the label submits the pod to the LocalQueue (Kueue gates it).
            kwargs["labels"] = {**(kwargs.get("labels") or {}), QUEUE_LABEL: queue_name}
        super().__init__(
            image=image,
            cmds=list(spec.DEFAULT_CMDS) if cmds is None else cmds,
            arguments=arguments,
            do_xcom_push=True,
            termination_grace_period=termination_grace_period,
            **kwargs,
        )
        self.gpus = checked["gpus"]
        self.gpu_resource = checked["gpu_resource"]
        self.gpu_type_label = checked["gpu_type_label"]
        self.gpu_type = checked["gpu_type"]
        self.cpu = checked["cpu"]
        self.memory = checked["memory"]
        self.shm_size = checked["shm_size"]
        self.hyperparameters = checked["hyperparameters"]
        self.checkpoint_volume = checked["checkpoint_volume"]
        self.checkpoint_uri = checked["checkpoint_uri"]
        self.checkpoint_key = checkpoint_key
        self.nproc_per_node = checked["nproc_per_node"]
        self.launcher = checked["launcher"]
        self.queue_name = queue_name
        self.unschedulable_timeout_seconds = checked["unschedulable_timeout_seconds"]
        self.local_kill_grace_seconds = checked["local_kill_grace_seconds"]
        self.max_preemptions = checked["max_preemptions"]
        self.mlflow_conn_id = mlflow_conn_id
        self.experiment_name = experiment_name
        self.mlflow_secret = mlflow_secret
        self.data_secret = data_secret
        self.aws_conn_id = aws_conn_id
        self.distributed = distributed or nproc_per_node is not None
        self._local_launcher = None
        self._xcom_problem = None
        self._startup_failure = None
        self._final_result = _UNSET
        self._node_name = None
        # Kueue Workload reads of this execution (which API version answers, whether the Role allows it).
        self._workload_reader = kueue.WorkloadReader()
        self._timed_out = False

    #: True while the local launcher builds the pod spec only to validate it (a class default: the
    #: parent's constructor may log before this one sets anything).
    _validating_pod_only: bool = False

    @property
    def log(self) -> Any:
        task_log = super().log
        return _WithoutPodBuildMessage(task_log) if self._validating_pod_only else task_log

    @cached_property
    def mlflow_hook(self) -> MLflowHook | None:
        """This execution's MLflow hook (one connection look-up), None without ``mlflow_conn_id``.

        Built on first use during execute, never at DAG parse. Not named ``hook``: that is the parent's
        Kubernetes hook.
        """
        return MLflowHook(self.mlflow_conn_id) if self.mlflow_conn_id else None

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """``BaseOperator.partial``, plus this operator's argument checks at DAG parse time.

        Airflow builds a mapped task's operator only when an instance runs; without this, a bad
        ``gpus=`` in a sweep's ``partial()`` would fail every mapped instance on a worker instead of
        failing the DAG file's import.
        """
        check_arguments(kwargs)
        return super().partial(**kwargs)

    # -- validation --------------------------------------------------------------------------------

    def _rendered_hyperparameters(self) -> dict[str, Any]:
        """Validate what templating or mapping produced (the construction-time check saw a placeholder)."""
        hyperparameters = spec.check_hyperparameters(self.hyperparameters)
        spec.check_trainer_hyperparameters(hyperparameters, self.cmds)
        return hyperparameters

    def _rendered_quantities(self) -> tuple[str | None, str | None, str | None]:
        cpu = spec.check_quantity("cpu", self.cpu)
        memory = spec.check_quantity("memory", self.memory)
        shm = self.shm_size
        shm_limit = None if shm is None or isinstance(shm, bool) else spec.check_quantity("shm_size", shm)
        return cpu, memory, shm_limit

    def _resolve_launcher(self) -> str:
        launcher = self.launcher or conf.get("mltrain", "launcher", fallback="kubernetes") or "kubernetes"
        launcher = launcher.strip().lower()
        if launcher not in spec.LAUNCHERS:
            raise spec.bad_param(
                "launcher", launcher, f"([mltrain] launcher setting) expected one of {list(spec.LAUNCHERS)}"
            )
        return launcher

    def _shm_enabled(self) -> bool:
        return self.gpus > 0 if self.shm_size is None else self.shm_size is not False

    def _nproc(self) -> int | None:
        if not self.distributed:
            return None
        return self.nproc_per_node or self.gpus

    # -- the pod -----------------------------------------------------------------------------------

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False) -> k8s.V1Pod:
        """The parent's pod plus GPUs, affinity, tolerations, volumes, security defaults and the contract."""
        hyperparameters = self._rendered_hyperparameters()
        cpu, memory, shm_limit = self._rendered_quantities()
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        container = self._base_container(pod)
        if container.image is None and self._resolve_launcher() == "kubernetes":
            raise spec.bad_param("image", None, "the trainer image is required to run on Kubernetes")

        nproc = self._nproc()
        if nproc:
            container.command = spec.torchrun_command(container.command or [], nproc)
        checkpoint_dir = self._checkpoint_dir(context)
        apply_training_template(
            pod.spec,
            container,
            self._pod_params(cpu, memory, shm_limit),
            self._contract_env(context, hyperparameters, checkpoint_dir),
            sidecar_name=PodDefaults.SIDECAR_CONTAINER_NAME,
        )
        return pod

    def _pod_params(self, cpu: str | None, memory: str | None, shm_limit: str | None) -> TrainingPodParams:
        """This task's inputs to the shared training pod template (rendered, validated values)."""
        return TrainingPodParams(
            gpus=self.gpus,
            gpu_resource=self.gpu_resource,
            gpu_type=tuple(self.gpu_type),
            gpu_type_label=self.gpu_type_label,
            cpu=cpu,
            memory=memory,
            shm_size=self.shm_size if shm_limit is None else shm_limit,
            checkpoint_volume=self.checkpoint_volume,
            checkpoint_uri=self.checkpoint_uri,
            mlflow_secret=self.mlflow_secret,
            data_secret=self.data_secret,
        )

    def _base_container(self, pod: k8s.V1Pod) -> k8s.V1Container:
        for container in pod.spec.containers:
            if container.name == self.base_container_name:
                return container
        raise AirflowException(f"pod has no container named {self.base_container_name!r}")

    @staticmethod
    def _lineage(context: Context | None) -> dict[str, Any]:
        return template.task_lineage(context)

    def _checkpoint_suffix(self, context: Context | None) -> str:
        return template.checkpoint_suffix(self.task_id, self._lineage(context), self.checkpoint_key)

    def _checkpoint_dir(self, context: Context | None) -> str:
        suffix = self._checkpoint_suffix(context)
        return template.checkpoint_dir(self.checkpoint_volume, self.checkpoint_uri, suffix)

    def _contract_env(
        self,
        context: Context | None,
        hyperparameters: dict[str, Any],
        checkpoint_dir: str,
        *,
        result_path: str = contract.DEFAULT_RESULT_PATH,
        mlflow: dict[str, str] | None = None,
        literal_credentials: bool = False,
        data_store: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """The trainer's contract variables, from :func:`gpu_trainer.contract.trainer_environment`.

        :param mlflow: the connection's MLflow variables; None gives the pod's (the tracking URI only).
        :param literal_credentials: keep credential values from ``mlflow`` (the local launcher only).
        :param data_store: the data store's variables (the local launcher's, from ``aws_conn_id``).
        """
        if mlflow is None and self.mlflow_hook is not None:
            mlflow = {contract.ENV_TRACKING_URI: self.mlflow_hook.tracking_uri}
        return template.trainer_env(
            task_id=self.task_id,
            default_dag_id=self.dag_id if self.has_dag() else "dag",
            lineage=self._lineage(context),
            hyperparameters=hyperparameters,
            checkpoint_dir=checkpoint_dir,
            result_path=result_path,
            experiment_name=self.experiment_name,
            mlflow=mlflow,
            literal_credentials=literal_credentials,
            data_store=data_store,
        )

    # -- running on Kubernetes -----------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self._xcom_problem = None
        self._startup_failure = None
        self._final_result = _UNSET
        # The link's XCom exists from the start, so a failed try ends without an "XCom not found" error.
        MLflowRunLink.persist(context, "")
        if self._resolve_launcher() == "local":
            return self._execute_local(context)
        self._warn_if_credentials_unreachable()
        if self.aws_conn_id and not self.data_secret and not self.service_account_name:
            self.log.warning(
                "aws_conn_id=%r reaches the local launcher's trainer only: a pod never gets connection "
                "credentials. Pass data_secret= (a Secret with keys %s) or service_account_name= (a cloud "
                "identity: IRSA, workload identity) for s3:// data.",
                self.aws_conn_id,
                list(contract.DATA_STORE_ENV_VARS),
            )
        raw = self._execute_replacing_disrupted_pods(context)
        if self._final_result is not _UNSET:
            # Deferrable mode with a pod that was already finished: the parent ran trigger_reentry inline
            # and dropped its return value.
            return self._final_result
        return self._finish(context, raw)

    def _execute_replacing_disrupted_pods(self, context: Context) -> Any:
        """KubernetesPodOperator's execute, again with a new pod each time the pod was disrupted.

        Up to ``max_preemptions`` times in this try (synchronous mode; the deferrable path replaces the
        pod in :meth:`trigger_reentry`). Every pod is built from the same context, so it has the same
        labels, try number and checkpoint directory, and the trainer resumes from its SIGTERM checkpoint.
        """
        replacements = 0
        while True:
            try:
                return super().execute(context)
            except preemption.PodDisrupted as disrupted:
                replacements += 1
                self._prepare_replacement(context, disrupted.disruption, replacements)

    def _prepare_replacement(self, context: Context, disruption: preemption.Disruption, count: int) -> None:
        """Log the ``count``-th replacement and make the next execute build a new pod (or fail at the limit)."""
        if count > self.max_preemptions:
            raise GPUTrainingFailure(preemption.limit_message(disruption, self.max_preemptions))
        self.log.warning(
            preemption.replacement_message(
                disruption, count, self.max_preemptions, self._checkpoint_dir(context)
            )
        )
        if not self.checkpoint_volume and not self.checkpoint_uri:
            self.log.warning(
                "The checkpoint directory is an emptyDir that died with pod %s: the replacement starts "
                "over. Set checkpoint_volume= or checkpoint_uri= so it resumes.",
                disruption.pod_name,
            )
        request = self.build_pod_request_obj(context)
        if request.metadata.name == disruption.pod_name:
            # name= with random_name_suffix=False: the old pod may still be terminating under that name.
            request.metadata.name = add_unique_suffix(name=disruption.pod_name)
        self.pod_request_obj = request
        self.pod = None
        self.remote_pod = None
        self._node_name = None

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        self._xcom_problem = None
        # A resumed task is a new operator object: what this try has counted travels in the trigger's
        # kwargs, which every event echoes; keep them for the parent's own re-deferrals.
        carried = {
            key: event[key]
            for key in (preemption.PREEMPTIONS_EVENT_KEY, preemption.NODE_EVENT_KEY)
            if key in event
        }
        if carried:
            self.trigger_kwargs = {**(self.trigger_kwargs or {}), **carried}
        self._node_name = event.get(preemption.NODE_EVENT_KEY)
        # The trigger's "timeout" is execution_timeout: it ends the try for good, whatever the pod says.
        self._timed_out = event.get("status") == "timeout"
        try:
            raw = super().trigger_reentry(context, event)
        except preemption.PodDisrupted as disrupted:
            return self._replace_and_defer(context, event, disrupted.disruption)
        except AirflowException:
            # The pod was gone before cleanup could look at it (KPO sets self.pod to None on a 404).
            vanished = (
                None
                if self.pod is not None or self._timed_out
                else self._vanished(event["name"], event.get("namespace"))
            )
            if vanished is None:
                raise
            return self._replace_and_defer(context, event, vanished)
        self._final_result = self._finish(context, raw)
        return self._final_result

    def _replace_and_defer(
        self, context: Context, event: dict[str, Any], disruption: preemption.Disruption
    ) -> Any:
        """Deferrable mode: create the replacement pod and defer again (raises TaskDeferred).

        Returns the result only when the new pod had finished before the deferral (the parent then runs
        :meth:`trigger_reentry` inline).
        """
        count = int(event.get(preemption.PREEMPTIONS_EVENT_KEY, 0)) + 1
        self._prepare_replacement(context, disruption, count)
        kwargs = {
            key: value
            for key, value in (self.trigger_kwargs or {}).items()
            # The parent's re-deferral count and the old pod's node belong to the pod that is gone.
            if key not in ("_redefer_count", preemption.NODE_EVENT_KEY)
        }
        kwargs[preemption.PREEMPTIONS_EVENT_KEY] = count
        self.trigger_kwargs = kwargs
        self.execute_async(context)
        return None if self._final_result is _UNSET else self._final_result

    def extract_xcom(self, pod: k8s.V1Pod, *, ignore_kill_failure: bool = True) -> dict[Any, Any] | None:
        try:
            return super().extract_xcom(pod, ignore_kill_failure=ignore_kill_failure)
        except json.JSONDecodeError as err:
            # Reported by _finish with the contract's wording; raising here would skip the pod cleanup.
            self._xcom_problem = f"trainer result at {contract.DEFAULT_RESULT_PATH} is not valid JSON ({err})"
            return None

    def await_pod_start(self, pod: k8s.V1Pod) -> None:
        if self.unschedulable_timeout_seconds is not None:
            self._await_scheduling(pod)
        try:
            super().await_pod_start(pod)
        except (PodLaunchFailedException, PodLaunchTimeoutException) as err:
            cause = self._triage(pod, read_logs=False)
            if cause:
                self._startup_failure = GPUTrainingFailure(cause)
                raise self._startup_failure from err
            raise
        self._node_name = self._read_node_name(pod)

    def invoke_defer_method(self, last_log_time: Any = None, context: Context | None = None) -> None:
        # KPO's trigger only knows "not started within schedule_timeout_seconds": a GPU request no node
        # can satisfy would sit there for the whole timeout. So before the first deferral the worker
        # watches scheduling briefly, exactly as the synchronous path does (re-deferrals for log
        # streaming come after the pod started and skip this).
        if last_log_time is None and self.unschedulable_timeout_seconds is not None and self.pod:
            try:
                self._await_scheduling(self.pod, before_deferral=True)
            except GPUTrainingFailure:
                # Nothing else would delete the pod: the task ends here, before any trigger owns it.
                # on_finish_action decides, as for any other failure (it reads the remote status).
                try:
                    remote = self.pod_manager.read_pod(self.pod)
                except Exception:
                    remote = self.pod
                self.process_pod_deletion(remote, reraise=False)
                raise
        if self.pod is not None and preemption.NODE_EVENT_KEY not in (self.trigger_kwargs or {}):
            # Remember the node: if the pod vanishes while deferred, a node that vanished too means preemption.
            node = self._read_node_name(self.pod)
            if node:
                self.trigger_kwargs = {**(self.trigger_kwargs or {}), preemption.NODE_EVENT_KEY: node}
        super().invoke_defer_method(last_log_time=last_log_time, context=context)

    def _await_scheduling(self, pod: k8s.V1Pod, *, before_deferral: bool = False) -> None:
        """Fail fast when the scheduler says no node fits (see :func:`._scheduling.await_scheduling`)."""
        assert self.unschedulable_timeout_seconds is not None
        try:
            await_scheduling(
                self.pod_manager,
                pod,
                unschedulable_timeout_s=self.unschedulable_timeout_seconds,
                schedule_timeout_s=self.schedule_timeout_seconds,
                poll_interval_s=self.startup_check_interval_seconds,
                triage_context=self._triage_context(),
                before_deferral=before_deferral,
                log=self.log,
                workload_of=self._pod_workload if self.queue_name else None,
                queue_grace_s=kueue.QUEUE_GRACE_S,
            )
        except GPUTrainingFailure as failure:
            self._startup_failure = failure
            raise

    def _pod_workload(self, remote: k8s.V1Pod) -> Mapping[str, Any] | None:
        """The Workload Kueue's pod integration owns for this pod (read-only; None when unreadable)."""
        from kubernetes.client import CustomObjectsApi

        metadata = remote.metadata
        reader = self._workload_reader
        found = kueue.read_workload(
            CustomObjectsApi(self.client.api_client),
            metadata.namespace or self.namespace or "default",
            reader,
            {"metadata": {"uid": metadata.uid, "labels": dict(metadata.labels or {})}},
        )
        problem = reader.say_problem()
        if problem:
            self.log.warning("Cannot read Kueue's Workload for pod %s: %s", metadata.name, problem)
        return found

    def cleanup(
        self,
        pod: k8s.V1Pod,
        remote_pod: k8s.V1Pod,
        xcom_result: dict | None = None,
        context: Context | None = None,
    ) -> None:
        disruption = self._disruption(pod, remote_pod)
        if disruption is not None:
            self._discard_disrupted_pod(remote_pod)
            raise preemption.PodDisrupted(disruption)
        # Read the cause before the parent deletes the pod; the parent's error only says "returned a failure".
        cause = None
        if self._startup_failure is None and remote_pod is not None and not self._killed:
            cause = self._triage(remote_pod, read_logs=True)
        try:
            super().cleanup(pod, remote_pod, xcom_result, context)
        except AirflowSkipException:
            raise
        except AirflowException as err:
            if self._startup_failure is not None:
                raise self._startup_failure from err
            if cause:
                raise GPUTrainingFailure(cause) from err
            raise

    # -- preemption ----------------------------------------------------------------------------------

    def _disruption(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod | None) -> preemption.Disruption | None:
        """Why the pod ended if the cluster ended it (preempted, evicted, node gone); never raises."""
        if self._killed or self._timed_out or remote_pod is None or self._startup_failure is not None:
            return None
        in_flight = sys.exc_info()[1]
        if in_flight is not None and not isinstance(in_flight, Exception):
            # execution_timeout, a kill or a deferral is under way: those end the try, nothing is replaced.
            return None
        if container_is_succeeded(remote_pod, self.base_container_name):
            return None
        try:
            try:
                # The synchronous path hands over the pod as read right after creation: read it again.
                current = self.pod_manager.read_pod(pod)
            except ApiException as err:
                if err.status != 404:
                    raise
                # Kueue deletes the pod it preempted: the last look at it may still show why.
                return preemption.disruption_of(remote_pod) or self._vanished(
                    pod.metadata.name, pod.metadata.namespace
                )
            if container_is_succeeded(current, self.base_container_name):
                return None
            return preemption.disruption_of(current)
        except Exception as err:
            self.log.warning("Could not tell whether the training pod was preempted: %s", err)
            return None

    def _vanished(self, pod_name: str, namespace: str | None = None) -> preemption.Disruption | None:
        """A disruption when the pod is gone together with the node it ran on, or Kueue evicted it."""
        node = self._node_name
        if not node:
            return self._told_by_events(pod_name, namespace)
        try:
            self.client.read_node(node)
            node_exists: bool | None = True
        except ApiException as err:
            node_exists = False if err.status == 404 else None
        except Exception:
            node_exists = None
        return preemption.vanished_with_node(pod_name, node, node_exists) or self._told_by_events(
            pod_name, namespace
        )

    def _told_by_events(self, pod_name: str, namespace: str | None) -> preemption.Disruption | None:
        """A pod gone while its node stays: the scheduler's "Preempted" event (or, queued, Kueue's "Stopped")
        on it tells a preemption from a pod someone deleted."""
        events = self._gone_pod_events(pod_name, namespace)
        found = preemption.preempted_by_scheduler(pod_name, events)
        if found is None and self.queue_name:
            found = preemption.stopped_by_kueue(pod_name, events)
        return found

    def _gone_pod_events(self, pod_name: str, namespace: str | None) -> list[Any]:
        gone = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=pod_name, namespace=namespace or self.namespace))
        try:
            return list(self.pod_manager.read_pod_events(gone).items or [])
        except Exception as err:
            self.log.warning("Could not read the events of pod %s: %s", pod_name, err)
            return []

    def _read_node_name(self, pod: k8s.V1Pod) -> str | None:
        try:
            remote = self.pod_manager.read_pod(pod)
        except Exception:
            return None
        return getattr(remote.spec, "node_name", None) or None

    def _discard_disrupted_pod(self, remote_pod: k8s.V1Pod) -> None:
        """Mark the disrupted pod checked (no reattach finds it) and delete it, whatever on_finish_action."""
        self.patch_already_checked(remote_pod, reraise=False)
        try:
            self.pod_manager.delete_pod(remote_pod)
        except Exception as err:
            # A pod that is already gone is what we wanted; anything else must not stop the replacement.
            if getattr(err, "status", None) != 404:
                self.log.warning("Could not delete the preempted pod %s: %s", remote_pod.metadata.name, err)

    def _triage_context(self) -> TriageContext:
        shm = None if self.shm_size is None or isinstance(self.shm_size, bool) else str(self.shm_size)
        return TriageContext(
            gpus=self.gpus,
            gpu_resource=self.gpu_resource,
            gpu_type=tuple(self.gpu_type),
            gpu_type_label=self.gpu_type_label,
            image=self.image,
            memory=str(self.memory) if self.memory else None,
            shm_size=shm if self._shm_enabled() else None,
        )

    def _triage(self, pod: k8s.V1Pod, *, read_logs: bool) -> str | None:
        """Diagnose a pod that failed or never started; never raises (a diagnosis is a bonus)."""
        try:
            remote = pod
            status = getattr(pod, "status", None)
            if status is None or status.phase in (None, PodPhase.PENDING) or not status.container_statuses:
                remote = self.pod_manager.read_pod(pod)
            if container_is_succeeded(remote, self.base_container_name):
                return None
            tail: list[str] = []
            if read_logs and remote.status and remote.status.phase != PodPhase.PENDING:
                tail = self._log_tail(remote)
            return triage(remote, self.base_container_name, tail, self._triage_context())
        except Exception as err:
            self.log.warning("Could not diagnose the training pod: %s", err)
            return None

    def _log_tail(self, pod: k8s.V1Pod, lines: int = 50) -> list[str]:
        try:
            logs = self.pod_manager.read_pod_logs(
                pod, self.base_container_name, tail_lines=lines, follow=False
            )
            return [
                raw.decode("utf-8", "replace").rstrip() if isinstance(raw, bytes) else str(raw).rstrip()
                for raw in logs
            ]
        except Exception as err:
            self.log.warning("Could not read the trainer's last log lines: %s", err)
            return []

    def _warn_if_credentials_unreachable(self) -> None:
        if self.mlflow_hook is None or self.mlflow_secret:
            return
        try:
            has_creds = bool(set(self.mlflow_hook.child_environment()) & set(contract.CREDENTIAL_ENV_VARS))
        except Exception:
            return
        if has_creds:
            self.log.warning(
                "MLflow connection %r has credentials but mlflow_secret= is not set: the pod gets the "
                "tracking URI only (credentials never go into a pod spec). Create a Secret with keys %s "
                "and pass its name as mlflow_secret=.",
                self.mlflow_conn_id,
                list(contract.CREDENTIAL_ENV_VARS),
            )

    # -- results -------------------------------------------------------------------------------------

    def _finish(self, context: Context, raw: Any) -> dict[str, Any]:
        """Validate the trainer's result, push its parts, build the MLflow link."""
        where = contract.DEFAULT_RESULT_PATH
        if self._xcom_problem:
            raise AirflowException(
                f"{self._xcom_problem}: expected a JSON object with keys {list(contract.RESULT_KEYS)}"
            )
        if raw is None:
            raise AirflowException(
                f"trainer wrote no result at {where}: expected a JSON object with keys "
                f"{list(contract.RESULT_KEYS)} (does the trainer call gpu_trainer.contract.write_result?)"
            )
        try:
            result = contract.validate_result(raw)
        except contract.ContractError as err:
            raise AirflowException(f"{err} (read from {where})") from err
        ti = context["ti"]
        for key in ("run_id", "model_uri", "metrics"):
            ti.xcom_push(key=key, value=result[key])
        self._persist_run_link(context, result)
        return result

    def _persist_run_link(self, context: Context, result: dict[str, Any]) -> None:
        run_id = result.get("run_id")
        url = ""
        try:
            hook = self.mlflow_hook if run_id else None
            if hook is not None and hook.ui_url:
                # Trainers that report their experiment spare this request; older ones do not report it.
                experiment_id = result.get("experiment_id") or (
                    hook.get_conn().get_run(str(run_id)).info.experiment_id
                )
                url = hook.run_url(experiment_id, str(run_id))
        except Exception as err:
            self.log.warning("Could not build the MLflow run link for run %s: %s", run_id, err)
        MLflowRunLink.persist(context, url)

    # -- running locally -----------------------------------------------------------------------------

    def _execute_local(self, context: Context) -> dict[str, Any]:
        from airflow_provider_mltrain.hooks.data_store import aws_child_environment

        # Build (and so validate) the same pod as on Kubernetes, without asking any cluster. The parent's
        # "Building pod <name> with labels ..." would suggest a pod is made: say what happens instead.
        self.log.info(
            "Local launcher: checking the pod spec the Kubernetes launcher would submit (no cluster is "
            "contacted), then running the trainer as a process on this worker"
        )
        self.hook = _OfflineKubernetesHook()  # type: ignore[assignment]
        self._validating_pod_only = True
        try:
            pod = self.build_pod_request_obj(context, dry_run=True)
        finally:
            self._validating_pod_only = False
        container = self._base_container(pod)
        # The user's literal env_vars (Secret references have no value here); the contract's variables
        # come from the same function as the pod's, with this machine's paths and the connection's
        # credentials as values.
        env = {
            e.name: e.value
            for e in container.env or []
            if e.value is not None and e.name not in contract.TRAINER_ENV_VARS
        }
        checkpoint_dir = os.path.join(local_checkpoint_root(), self._checkpoint_suffix(context))
        env.update(
            self._contract_env(
                context,
                self._rendered_hyperparameters(),
                checkpoint_dir,
                mlflow=self.mlflow_hook.child_environment() if self.mlflow_hook is not None else None,
                literal_credentials=True,
                data_store=aws_child_environment(self.aws_conn_id) if self.aws_conn_id else None,
            )
        )
        launcher = LocalLauncher(
            self.log,
            checkpoint_dir=checkpoint_dir,
            timeout_s=self.execution_timeout.total_seconds() if self.execution_timeout else None,
            kill_grace_s=self.local_kill_grace_seconds,
            max_preemptions=self.max_preemptions,
        )
        self._local_launcher = launcher
        try:
            run = launcher.run([*(container.command or []), *(container.args or [])], env)
        except LocalTrainerTimeout as err:
            raise AirflowException(f"Local trainer: {err}") from err
        except contract.ContractError as err:
            raise AirflowException(str(err)) from err
        finally:
            self._local_launcher = None
        if run.returncode == contract.PREEMPTED_EXIT_CODE and run.preemptions > self.max_preemptions:
            raise GPUTrainingFailure(
                f"Local trainer was preempted {run.preemptions} time(s) (exit {run.returncode} after a SIGTERM "
                f"that did not come from Airflow): max_preemptions={self.max_preemptions} restarts are spent. "
                f"The next Airflow retry (if any) resumes from the checkpoint in {checkpoint_dir}; raise "
                "max_preemptions= to restart more often within one try."
            )
        if run.returncode != 0:
            cause = triage(None, self.base_container_name, run.tail, self._triage_context())
            message = f"Local trainer exited with code {run.returncode}: {run.command}"
            if cause:
                raise GPUTrainingFailure(f"{cause}\n{message}")
            raise AirflowException(message + " (see the [trainer] lines above)")
        return self._finish(context, run.result)

    def on_kill(self) -> None:
        launcher = self._local_launcher
        if launcher is not None:
            launcher.stop()
            return
        super().on_kill()
