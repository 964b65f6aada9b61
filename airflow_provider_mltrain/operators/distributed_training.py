"""DistributedTrainingOperator: one training task on several nodes, as a JobSet or a Kubeflow TrainJob.

The training parameters mean what they mean for :class:`GPUTrainingPodOperator`, and each node's pod comes
from the same template builder (:mod:`._pod_template`). This module holds the operator's parameters, their
parse-time checks and the manifest; the resource's lifecycle (create, wait, re-attach, delete, result)
lives in its own module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.models import BaseOperator
from airflow.providers.common.compat.sdk import conf
from kubernetes.client import models as k8s

from airflow_provider_mltrain._templating import renders_later
from airflow_provider_mltrain.hooks.mlflow import MLflowHook
from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators import _manifests as manifests
from airflow_provider_mltrain.operators import _pod_spec as spec
from airflow_provider_mltrain.operators import _pod_template as template
from airflow_provider_mltrain.operators import _preemption as preemption
from airflow_provider_mltrain.operators._arguments import check_arguments
from airflow_provider_mltrain.operators._pod_template import TrainingPodParams, apply_training_template
from airflow_provider_mltrain.operators._training_job import (
    JOBSET,
    TRAINJOB,
    TrainingJobClient,
    TrainingJobLifecycle,
    WaitPolicy,
)
from airflow_provider_mltrain.operators._triage import TriageContext
from airflow_provider_mltrain.triggers.training_job import TrainingJobTrigger
from gpu_trainer import contract

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_mltrain.launchers.local_nodes import LocalNodesLauncher

_OPERATOR = "DistributedTrainingOperator"
_DNS_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: Arguments Airflow does not render here: Jinja or an XComArg in them would stay as written.
_NOT_TEMPLATED = (
    "num_nodes",
    "backend",
    "runtime_ref",
    "runtime_kind",
    "priority_class",
    "max_restarts",
    "max_preemptions",
    "termination_grace_period",
    "admission_timeout_seconds",
    "deferrable",
    "namespace",
)


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{_OPERATOR}: invalid {name}={value!r}; {allowed}")


def _as_this_operator(err: ValueError) -> ValueError:
    """The shared checks name the pod operator; a user of this one should read its own name."""
    return ValueError(str(err).replace("GPUTrainingPodOperator:", f"{_OPERATOR}:", 1))


def check_distributed_arguments(args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the arguments present in ``args`` (``partial()`` sees a subset); return them normalized.

    The training parameters go through the pod operator's :func:`._arguments.check_arguments`; the
    multi-node ones are checked here. Raises ``ValueError`` naming the parameter, the value and what is
    allowed.
    """
    shared = {k: v for k, v in args.items() if k not in ("nproc_per_node",)}
    try:
        out = check_arguments(shared)
    except ValueError as err:
        raise _as_this_operator(err) from None
    out.update({k: v for k, v in args.items() if k not in out})

    def known(name: str) -> bool:
        return name in args and not renders_later(args[name])

    for name in _NOT_TEMPLATED:
        if name in args and renders_later(args[name]):
            raise _bad(name, args[name], "not a template field: pass a literal value")
    for name in ("num_nodes", "nproc_per_node", "admission_timeout_seconds"):
        if known(name):
            try:
                out[name] = spec.check_positive_int(name, args[name], allow_none=name != "num_nodes")
            except ValueError as err:
                raise _as_this_operator(err) from None
    if known("backend") and args["backend"] not in manifests.BACKENDS:
        raise _bad("backend", args["backend"], f"expected one of {list(manifests.BACKENDS)}")
    if known("runtime_ref") and (
        not isinstance(args["runtime_ref"], str) or not _DNS_SUBDOMAIN.match(args["runtime_ref"])
    ):
        raise _bad(
            "runtime_ref", args["runtime_ref"], "expected the name of a (Cluster)TrainingRuntime, a DNS name"
        )
    if known("runtime_kind") and args["runtime_kind"] not in manifests.RUNTIME_KINDS:
        raise _bad("runtime_kind", args["runtime_kind"], f"expected one of {list(manifests.RUNTIME_KINDS)}")
    if known("priority_class"):
        try:
            spec.check_kueue_name("priority_class", args["priority_class"])
        except ValueError as err:
            raise _as_this_operator(err) from None
    restarts = args.get("max_restarts")
    if known("max_restarts") and (
        isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0
    ):
        raise _bad("max_restarts", restarts, "expected an int >= 0")
    if args.get("backend") == "trainjob" and isinstance(restarts, int) and restarts > 0:
        raise _bad(
            "max_restarts",
            restarts,
            "a TrainJob takes its restart policy from its runtime (the ClusterTrainingRuntime's JobSet "
            "failurePolicy): use 0 with backend='trainjob', or backend='jobset'",
        )
    grace = args.get("termination_grace_period")
    if (
        known("termination_grace_period")
        and grace is not None
        and (isinstance(grace, bool) or not isinstance(grace, int) or grace < 0)
    ):
        raise _bad(
            "termination_grace_period",
            grace,
            "expected whole seconds >= 0 between SIGTERM and SIGKILL (time for the SIGTERM checkpoint), "
            "or None for Kubernetes' 30",
        )
    if known("deferrable") and not isinstance(args["deferrable"], bool):
        raise _bad("deferrable", args["deferrable"], "expected True or False")
    namespace = args.get("namespace")
    if known("namespace") and namespace is not None and not _DNS_LABEL.match(str(namespace)):
        raise _bad("namespace", namespace, "expected a Kubernetes namespace name (a DNS label) or None")
    env = args.get("env_vars")
    if env is not None and not renders_later(env):
        names = list(env) if isinstance(env, Mapping) else [getattr(e, "name", None) for e in env]
        clash = sorted(set(contract.TORCHRUN_ENV_VARS) & {str(n) for n in names})
        if clash:
            raise _bad(
                "env_vars",
                clash,
                "torchrun's placement is set by the operator (num_nodes=, nproc_per_node=; Kubeflow "
                "Trainer rejects user variables with these names)",
            )
    _check_shared_checkpoint(args, out)
    return out


def _check_shared_checkpoint(args: Mapping[str, Any], out: Mapping[str, Any]) -> None:
    """More than one node needs a checkpoint location every node sees: otherwise each node's pod has its
    own emptyDir, and a restart resumes from whichever node's copy (or none)."""
    num_nodes = out.get("num_nodes")
    if not isinstance(num_nodes, int) or num_nodes <= 1:
        return
    if args.get("checkpoint_uri") is not None:
        return
    volume = out.get("checkpoint_volume")
    if isinstance(volume, Mapping) and volume.get("access_mode") == "ReadWriteMany":
        return
    if renders_later(args.get("checkpoint_volume")):
        return
    raise _bad(
        "checkpoint_volume" if volume else "num_nodes",
        volume if volume else num_nodes,
        "more than one node needs a checkpoint location every node sees: pass checkpoint_uri= (e.g. "
        "'s3://bucket/checkpoints') or checkpoint_volume={'claim_name': ..., 'mount_path': ..., "
        "'access_mode': 'ReadWriteMany'} (a PVC whose StorageClass supports ReadWriteMany)",
    )


class DistributedTrainingOperator(BaseOperator):
    """Train on ``num_nodes`` nodes x ``nproc_per_node`` processes as a JobSet or a Kubeflow TrainJob.

    Every node runs ``torchrun <the command>``; torchrun reads its placement from the ``PET_*`` variables
    the backend provides. Only global rank 0 logs to MLflow, checkpoints and writes the result (the
    contract's ``is_main_process()``); its result is this task's return value. Works with Kueue
    (``queue_name=``) and runs locally with ``launcher="local"`` (every node a process group on the worker).

    :param image: the trainer image (templated).
    :param cmds: the command every node runs under torchrun; default ``["python", "-m",
        "gpu_trainer.train"]`` (templated).
    :param arguments: its arguments (templated).
    :param gpus: GPUs per node (requests = limits); 0 runs on CPUs (gloo).
    :param gpu_resource: the extended resource name, e.g. ``nvidia.com/gpu``.
    :param gpu_type: accepted GPU product(s), as values of ``gpu_type_label``: required node affinity.
    :param gpu_type_label: the node label holding the GPU product.
    :param cpu: CPU request and limit per node (templated).
    :param memory: memory request and limit per node (templated).
    :param shm_size: ``/dev/shm`` per node, as for :class:`GPUTrainingPodOperator`.
    :param hyperparameters: the trainer's hyperparameters, a JSON-serializable dict (templated; mappable
        with ``.partial(...).expand(hyperparameters=[...])``).
    :param mlflow_conn_id: MLflow connection whose tracking URI the trainer logs to.
    :param experiment_name: the MLflow experiment (templated).
    :param mlflow_secret: Secret with the MLflow credential keys (templated); Secret references only.
    :param data_secret: Secret with the data store's ``AWS_*`` keys (templated); Secret references only.
    :param aws_conn_id: local launcher: the Amazon connection the trainer processes get credentials from.
    :param checkpoint_volume: ``{"claim_name", "mount_path", "access_mode"}``: checkpoints on a PVC; with
        more than one node it must be ``"access_mode": "ReadWriteMany"`` (every node mounts it).
    :param checkpoint_uri: or a URI prefix every node reaches (e.g. ``s3://bucket/ckpt``) (templated).
        More than one node needs one of the two: every restart resumes from the shared checkpoint.
    :param checkpoint_key: key the checkpoint directory by DAG run and this value instead of task and map
        index (templated; one path segment such as ``trial_007``), as on ``GPUTrainingPodOperator``.
    :param num_nodes: nodes (pods), >= 1.
    :param nproc_per_node: torchrun processes per node; default ``gpus``, or 1 without GPUs.
    :param backend: ``"jobset"`` (a ``jobset.x-k8s.io/v1alpha2`` JobSet; needs only the JobSet controller)
        or ``"trainjob"`` (a ``trainer.kubeflow.org/v1alpha1`` TrainJob; needs Kubeflow Trainer).
    :param runtime_ref: the TrainJob's runtime (default Kubeflow's ``torch-distributed``).
    :param runtime_kind: ``"ClusterTrainingRuntime"`` (default) or ``"TrainingRuntime"`` (namespaced).
    :param queue_name: Kueue LocalQueue: the ``kueue.x-k8s.io/queue-name`` label, created suspended.
    :param priority_class: Kueue WorkloadPriorityClass (the ``kueue.x-k8s.io/priority-class`` label).
    :param max_restarts: JobSet ``failurePolicy.maxRestarts``: whole-set restarts after a node fails, each
        resuming from the shared checkpoint (0 with ``backend="trainjob"``: the runtime decides). A node
        that was preempted, evicted or drained (pod condition ``DisruptionTarget``) restarts the set
        without spending one.
    :param max_preemptions: JobSet: whole-set restarts after a disrupted node that one try allows, as
        ``GPUTrainingPodOperator``'s; one more fails the task naming the count and deletes the JobSet.
        With Kueue (both backends) each time Kueue evicts and re-queues the job (a preemption) counts too.
        A TrainJob's runtime owns its node restarts (not counted there); the local launcher counts a
        stopped node toward ``max_restarts``.
    :param termination_grace_period: seconds each node pod gets between SIGTERM and SIGKILL, time for the
        trainer's SIGTERM checkpoint (default 120; None: Kubernetes' 30).
    :param admission_timeout_seconds: fail (and delete the resource) when Kueue has not admitted it in this
        long (counted again from each re-queue after a Kueue preemption); None waits without a limit of its
        own (``execution_timeout`` still applies). A queue Kueue reports missing, stopped or inactive fails
        the task after 60 s whatever this says (the README, "Kueue").
    :param unschedulable_timeout_seconds: fail after a node's pod has been unschedulable this long (unless
        the cluster autoscaler is scaling up), as for :class:`GPUTrainingPodOperator`.
    :param deferrable: wait on the triggerer; default from ``[operators] default_deferrable``.
    :param launcher: ``"kubernetes"`` or ``"local"``; default from ``[mltrain] launcher``. Never a fallback.
    :param namespace: the namespace; None uses the Kubernetes connection's.
    :param kubernetes_conn_id: the Kubernetes connection.
    :param env_vars: further environment variables for every node (templated); the contract's and
        torchrun's ``PET_*`` names are the operator's.
    :param node_selector: the node pods' node selector.
    :param tolerations: further tolerations (the GPU taint's is added with ``gpus``).
    :param affinity: affinity (``gpu_type`` is ANDed into its required node terms).
    :param service_account_name: the node pods' service account (e.g. one with a cloud identity).
    :param image_pull_secrets: Secrets to pull the image with (names, comma-separated, or references).
    :param local_kill_grace_seconds: local launcher: seconds between SIGTERM and SIGKILL.
    :param poll_interval: seconds between reads of the job and its pods while waiting (both modes).
    """

    template_fields: Sequence[str] = (
        "image",
        "cmds",
        "arguments",
        "hyperparameters",
        "experiment_name",
        "checkpoint_uri",
        "checkpoint_key",
        "mlflow_secret",
        "data_secret",
        "cpu",
        "memory",
        "env_vars",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"hyperparameters": "json", "env_vars": "json"}
    ui_color = "#c5e1f5"
    #: The local launcher while it runs (``on_kill`` stops it).
    _local_nodes: LocalNodesLauncher | None = None

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
        num_nodes: int = 1,
        nproc_per_node: int | None = None,
        backend: str = "jobset",
        runtime_ref: str = manifests.DEFAULT_RUNTIME,
        runtime_kind: str = "ClusterTrainingRuntime",
        queue_name: str | None = None,
        priority_class: str | None = None,
        max_restarts: int = 0,
        max_preemptions: int = 3,
        termination_grace_period: int | None = preemption.DEFAULT_TERMINATION_GRACE_PERIOD_S,
        admission_timeout_seconds: int | None = None,
        unschedulable_timeout_seconds: int | None = 60,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        launcher: str | None = None,
        namespace: str | None = None,
        kubernetes_conn_id: str | None = "kubernetes_default",
        env_vars: dict[str, str] | list[k8s.V1EnvVar] | None = None,
        node_selector: dict[str, str] | None = None,
        tolerations: list[k8s.V1Toleration | dict[str, Any]] | None = None,
        affinity: k8s.V1Affinity | dict[str, Any] | None = None,
        service_account_name: str | None = None,
        image_pull_secrets: str | list[k8s.V1LocalObjectReference] | None = None,
        local_kill_grace_seconds: float = 10.0,
        poll_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        checked = check_distributed_arguments(
            {
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
                "num_nodes": num_nodes,
                "nproc_per_node": nproc_per_node,
                "backend": backend,
                "runtime_ref": runtime_ref,
                "runtime_kind": runtime_kind,
                "queue_name": queue_name,
                "priority_class": priority_class,
                "max_restarts": max_restarts,
                "max_preemptions": max_preemptions,
                "termination_grace_period": termination_grace_period,
                "admission_timeout_seconds": admission_timeout_seconds,
                "unschedulable_timeout_seconds": unschedulable_timeout_seconds,
                "deferrable": deferrable,
                "launcher": launcher,
                "namespace": namespace,
                "local_kill_grace_seconds": local_kill_grace_seconds,
                "env_vars": env_vars,
            }
        )
        super().__init__(**kwargs)
        self.image = image
        self.cmds = list(spec.DEFAULT_CMDS) if cmds is None else cmds
        self.arguments = arguments
        self.gpus = checked["gpus"]
        self.gpu_resource = checked["gpu_resource"]
        self.gpu_type = checked["gpu_type"]
        self.gpu_type_label = checked["gpu_type_label"]
        self.cpu = checked["cpu"]
        self.memory = checked["memory"]
        self.shm_size = shm_size
        self.hyperparameters = checked["hyperparameters"]
        self.mlflow_conn_id = mlflow_conn_id
        self.experiment_name = experiment_name
        self.mlflow_secret = mlflow_secret
        self.data_secret = data_secret
        self.aws_conn_id = aws_conn_id
        self.checkpoint_volume = checked["checkpoint_volume"]
        self.checkpoint_uri = checkpoint_uri
        self.checkpoint_key = checkpoint_key
        self.num_nodes = checked["num_nodes"]
        self.nproc_per_node = checked["nproc_per_node"]
        self.backend = backend
        self.runtime_ref = runtime_ref
        self.runtime_kind = runtime_kind
        self.queue_name = queue_name
        self.priority_class = priority_class
        self.max_restarts = max_restarts
        self.max_preemptions = max_preemptions
        self.termination_grace_period = termination_grace_period
        self.admission_timeout_seconds = admission_timeout_seconds
        self.unschedulable_timeout_seconds = checked["unschedulable_timeout_seconds"]
        self.deferrable = deferrable
        self.launcher = launcher
        self.namespace = namespace
        self.kubernetes_conn_id = kubernetes_conn_id
        self.env_vars = env_vars
        self.node_selector = node_selector
        self.tolerations = tolerations
        self.affinity = affinity
        self.service_account_name = service_account_name
        self.image_pull_secrets = image_pull_secrets
        self.local_kill_grace_seconds = checked["local_kill_grace_seconds"]
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, (int, float))
            or not poll_interval > 0
        ):
            raise _bad("poll_interval", poll_interval, "expected a number of seconds > 0")
        self.poll_interval = float(poll_interval)
        self._job_name: str | None = None

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """``BaseOperator.partial``, plus this operator's argument checks at DAG parse time (a mapped
        task's operator is only built when an instance runs)."""
        check_distributed_arguments(kwargs)
        return super().partial(**kwargs)

    @cached_property
    def mlflow_hook(self) -> MLflowHook | None:
        """This execution's MLflow hook (one connection look-up), None without ``mlflow_conn_id``."""
        return MLflowHook(self.mlflow_conn_id) if self.mlflow_conn_id else None

    @property
    def effective_nproc_per_node(self) -> int:
        """torchrun processes per node: ``nproc_per_node``, else one per GPU, else 1."""
        return self.nproc_per_node or self.gpus or 1

    def resolve_launcher(self) -> str:
        """``launcher``, else the ``[mltrain] launcher`` setting, else ``"kubernetes"``."""
        launcher = self.launcher or conf.get("mltrain", "launcher", fallback="kubernetes") or "kubernetes"
        launcher = launcher.strip().lower()
        if launcher not in spec.LAUNCHERS:
            raise _bad(
                "launcher", launcher, f"([mltrain] launcher setting) expected one of {list(spec.LAUNCHERS)}"
            )
        return launcher

    # -- the manifest --------------------------------------------------------------------------------

    @staticmethod
    def lineage(context: Context | None) -> dict[str, Any]:
        """The contract lineage of this task instance ({} without a context, e.g. ``dry_run()``)."""
        return template.task_lineage(context)

    def checkpoint_suffix(self, context: Context | None) -> str:
        """This task instance's checkpoint directory below the checkpoint root (the same for every try;
        with ``checkpoint_key``, every task of a sweep's trial shares it)."""
        return template.checkpoint_suffix(self.task_id, self.lineage(context), self.checkpoint_key)

    def checkpoint_dir(self, context: Context | None) -> str:
        """The shared checkpoint directory of this task instance (not per try: a retry resumes)."""
        suffix = self.checkpoint_suffix(context)
        return template.checkpoint_dir(self.checkpoint_volume, self.checkpoint_uri, suffix)

    def resource_name(self, context: Context | None) -> str:
        """The JobSet's / TrainJob's name for this try."""
        return manifests.resource_name(self.task_id, self.lineage(context))

    def task_labels(self, context: Context | None) -> dict[str, str]:
        """Labels naming this task instance (any try): a retry lists by them to re-attach."""
        return manifests.task_labels(self.lineage(context))

    def contract_env(
        self,
        context: Context | None,
        *,
        result_path: str,
        checkpoint_dir: str | None = None,
        mlflow: dict[str, str] | None = None,
        literal_credentials: bool = False,
        data_store: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """The trainer's contract variables for a node (tracking URI only: credentials come from Secrets).

        The local launcher passes what differs on this machine:

        :param checkpoint_dir: the checkpoint directory; None gives :meth:`checkpoint_dir`.
        :param mlflow: the connection's MLflow variables; None gives the tracking URI only.
        :param literal_credentials: keep credential values from ``mlflow``.
        :param data_store: the data store's variables (from ``aws_conn_id``).
        """
        hyperparameters = spec.check_hyperparameters(self.hyperparameters)
        spec.check_trainer_hyperparameters(hyperparameters, self.cmds)
        if mlflow is None and self.mlflow_hook is not None:
            mlflow = {contract.ENV_TRACKING_URI: self.mlflow_hook.tracking_uri}
        return template.trainer_env(
            task_id=self.task_id,
            default_dag_id=self.dag_id if self.has_dag() else "dag",
            lineage=self.lineage(context),
            hyperparameters=hyperparameters,
            checkpoint_dir=checkpoint_dir or self.checkpoint_dir(context),
            result_path=result_path,
            experiment_name=self.experiment_name,
            mlflow=mlflow,
            literal_credentials=literal_credentials,
            data_store=data_store,
        )

    def pod_params(self) -> TrainingPodParams:
        """The rendered, validated inputs to the shared training pod template."""
        try:
            cpu = spec.check_quantity("cpu", self.cpu)
            memory = spec.check_quantity("memory", self.memory)
            shm = self.shm_size
            shm_size = shm if shm is None or isinstance(shm, bool) else spec.check_quantity("shm_size", shm)
        except ValueError as err:
            raise _as_this_operator(err) from None
        return TrainingPodParams(
            gpus=self.gpus,
            gpu_resource=self.gpu_resource,
            gpu_type=tuple(self.gpu_type),
            gpu_type_label=self.gpu_type_label,
            cpu=cpu,
            memory=memory,
            shm_size=shm_size,
            checkpoint_volume=self.checkpoint_volume,
            checkpoint_uri=str(self.checkpoint_uri) if self.checkpoint_uri else None,
            mlflow_secret=self.mlflow_secret,
            data_secret=self.data_secret,
        )

    def build_node_pod_spec(self, context: Context | None = None) -> k8s.V1PodSpec:
        """One node's pod spec (the training template applied; for JobSet with torchrun's placement)."""
        from airflow.providers.cncf.kubernetes.backcompat.backwards_compat_converters import (
            convert_affinity,
            convert_env_vars,
            convert_image_pull_secrets,
            convert_toleration,
        )

        if not self.image and self.resolve_launcher() == "kubernetes":
            raise _bad("image", self.image, "the trainer image is required to run on Kubernetes")
        container = k8s.V1Container(
            name=manifests.NODE_NAME,
            image=self.image,
            command=manifests.multinode_command(self.cmds),
            args=list(self.arguments) if self.arguments else None,
            env=convert_env_vars(self.env_vars) if self.env_vars else [],
            # The leader's result channel: rank 0 writes its result to the termination message (no exec,
            # no sidecar; the API keeps it after the pod ends; the lifecycle module reads it and owns the
            # fallback past the kubelet's 4 KiB). Kubernetes' default path, stated so the trainer's
            # MLTRAIN_RESULT_PATH and the pod agree by construction.
            termination_message_path=contract.TERMINATION_MESSAGE_PATH,
            termination_message_policy="File",
        )
        pod_spec = k8s.V1PodSpec(
            containers=[container],
            # Never: the JobSet restarts nodes; a Job's podFailurePolicy also requires it.
            restart_policy="Never",
            termination_grace_period_seconds=self.termination_grace_period,
            node_selector=dict(self.node_selector) if self.node_selector else None,
            tolerations=[convert_toleration(t) for t in self.tolerations] if self.tolerations else None,
            affinity=convert_affinity(self.affinity) if self.affinity else None,
            service_account_name=self.service_account_name,
            image_pull_secrets=(
                convert_image_pull_secrets(self.image_pull_secrets) if self.image_pull_secrets else None
            ),
        )
        apply_training_template(
            pod_spec,
            container,
            self.pod_params(),
            self.contract_env(context, result_path=contract.TERMINATION_MESSAGE_PATH),
        )
        if self.backend == "jobset":
            name = self.resource_name(context)
            container.env = [
                *(container.env or []),
                *manifests.jobset_rendezvous_env(name, self.num_nodes, self.effective_nproc_per_node),
            ]
        return pod_spec

    def build_manifest(self, context: Context | None = None) -> dict[str, Any]:
        """The JobSet or TrainJob this task creates, as a plain dict (what :meth:`dry_run` prints).

        :param context: the task's context (names, labels and lineage); None builds a preview.
        """
        pod_spec = self.build_node_pod_spec(context)
        task_labels = self.task_labels(context)
        labels = {**task_labels, **manifests.kueue_labels(self.queue_name, self.priority_class)}
        common = {
            "name": self.resource_name(context),
            "namespace": self.namespace,
            "labels": labels,
            "pod_labels": task_labels,
            "pod_spec": pod_spec,
            "num_nodes": self.num_nodes,
            # Kueue admits only what was created suspended; it unsuspends the resource itself.
            "suspend": bool(self.queue_name),
        }
        if self.backend == "trainjob":
            return manifests.trainjob(
                **common,
                container=pod_spec.containers[0],
                nproc_per_node=self.effective_nproc_per_node,
                runtime_ref=self.runtime_ref,
                runtime_kind=self.runtime_kind,
            )
        return manifests.jobset(**common, max_restarts=self.max_restarts)

    def dry_run(self) -> None:
        """Print the manifest as YAML (no cluster is contacted)."""
        import yaml

        print(yaml.safe_dump(self.build_manifest(), sort_keys=False))

    # -- running locally ------------------------------------------------------------------------------

    def _execute_local(self, context: Context) -> dict[str, Any]:
        """Every node as a torchrun agent on this worker, with the manifest's own command and literal env.

        The manifest is built (and so validated) as for the cluster; each node then gets this machine's
        contract (checkpoint directory, the MLflow connection's variables with its credentials, the data
        store's) and torchrun's placement (:mod:`airflow_provider_mltrain.launchers.local_nodes`).
        """
        import os

        from airflow.exceptions import AirflowException

        from airflow_provider_mltrain.hooks.data_store import aws_child_environment
        from airflow_provider_mltrain.launchers.local import LocalTrainerTimeout, local_checkpoint_root
        from airflow_provider_mltrain.launchers.local_nodes import LocalNodesLauncher, node_command
        from airflow_provider_mltrain.operators._triage import GPUTrainingFailure, triage

        nproc = self.effective_nproc_per_node
        self.log.info(
            "Local launcher: building the %s the Kubernetes launcher would submit (no cluster is contacted), "
            "then running its %d nodes x %d processes as process groups on this worker",
            "TrainJob" if self.backend == "trainjob" else "JobSet",
            self.num_nodes,
            nproc,
        )
        node = node_command(self.build_manifest(context))
        checkpoint_dir = os.path.join(local_checkpoint_root(), self.checkpoint_suffix(context))
        env = {
            **node.env,
            **self.contract_env(
                context,
                result_path=contract.DEFAULT_RESULT_PATH,  # each node gets a private path on this machine
                checkpoint_dir=checkpoint_dir,
                mlflow=self.mlflow_hook.child_environment() if self.mlflow_hook is not None else None,
                literal_credentials=True,
                data_store=aws_child_environment(self.aws_conn_id) if self.aws_conn_id else None,
            ),
        }
        launcher = LocalNodesLauncher(
            self.log,
            checkpoint_dir=checkpoint_dir,
            num_nodes=self.num_nodes,
            nproc_per_node=nproc,
            timeout_s=self.execution_timeout.total_seconds() if self.execution_timeout else None,
            kill_grace_s=self.local_kill_grace_seconds,
            max_restarts=self.max_restarts,
            gpus_per_node=self.gpus,
        )
        self._local_nodes = launcher
        try:
            run = launcher.run(node.command, env)
        except LocalTrainerTimeout as err:
            raise AirflowException(f"Local trainer: {err}") from err
        except contract.ContractError as err:
            raise AirflowException(f"{err} (node 0, where global rank 0 runs)") from err
        finally:
            self._local_nodes = None
        if run.returncode != 0:
            cause = triage(None, manifests.NODE_NAME, run.tail, self._triage_context())
            which = (
                f"node {run.failed_node} of {self.num_nodes}"
                if run.failed_node is not None
                else f"the {self.num_nodes} nodes (stopped)"
            )
            message = (
                f"Local trainer: {which} exited with code {run.returncode} "
                f"(after {run.restarts} of max_restarts={self.max_restarts} restarts): {run.command}"
            )
            if cause:
                raise GPUTrainingFailure(f"{cause}\n{message}")
            raise AirflowException(message + " (see its [node N] lines above)")
        if run.result is None:  # unreachable: the launcher reads node 0's result or raises
            raise AirflowException("Local trainer: node 0 wrote no result")
        return self._publish(context, run.result)

    # -- the lifecycle (operators/_training_job.py) ---------------------------------------------------

    def execute(self, context: Context) -> Any:
        if self.resolve_launcher() == "local":
            return self._execute_local(context)
        lifecycle = self._lifecycle
        self._job_name = lifecycle.start(self.build_manifest(context), self.task_labels(context))
        if self.deferrable:
            self.defer(
                trigger=TrainingJobTrigger(
                    name=self._job_name,
                    namespace=lifecycle.client.namespace,
                    group=lifecycle.kind.group,
                    version=lifecycle.kind.version,
                    plural=lifecycle.kind.plural,
                    kind=lifecycle.kind.kind,
                    policy=lifecycle.policy.serialize(),
                    kubernetes_conn_id=self.kubernetes_conn_id,
                    preemptions_before=lifecycle.preemptions_before,
                ),
                method_name="execute_complete",
            )
        return self._publish(context, lifecycle.conclude(lifecycle.wait(self._job_name)))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """The trigger's end of the wait: the result, or the failure named with its cause and fix."""
        self._job_name = event.get("name")
        return self._publish(context, self._lifecycle.conclude(event))

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        # The triggerer's timeout (execution_timeout while deferred) resumes the task only to fail it: the
        # job would go on holding its GPUs, so delete it first.
        if next_method == "__fail__" and self.resolve_launcher() != "local":
            for job in self._lifecycle.client.find(self.task_labels(context)):
                self._lifecycle.kill(job["metadata"]["name"])
        return super().resume_execution(next_method, next_kwargs, context)

    def on_kill(self) -> None:
        """Kill and execution_timeout: delete the job with foreground propagation (its pods go first); the
        local launcher stops every process of every node."""
        if self._local_nodes is not None:
            self._local_nodes.stop()
            return
        name = getattr(self, "_job_name", None)
        if name and self.resolve_launcher() != "local":
            self._lifecycle.kill(name)

    @cached_property
    def _lifecycle(self) -> TrainingJobLifecycle:
        """This execution's lifecycle: one Kubernetes client (one connection look-up)."""
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
        namespace = self.namespace or hook.get_namespace() or "default"
        client = TrainingJobClient(
            hook.get_conn(), TRAINJOB if self.backend == "trainjob" else JOBSET, namespace
        )
        policy = WaitPolicy(
            poll_interval_s=self.poll_interval,
            admission_timeout_s=self.admission_timeout_seconds,
            unschedulable_timeout_s=self.unschedulable_timeout_seconds,
            max_restarts=self.max_restarts,
            # A TrainJob's status has no restart counts (its runtime owns node restarts): there only Kueue's
            # re-queues count.
            max_preemptions=self.max_preemptions,
            queue_grace_s=kueue.QUEUE_GRACE_S,
        )
        return TrainingJobLifecycle(client, policy, self._triage_context(), self.log)

    def _triage_context(self) -> TriageContext:
        """What was asked for, to name a failure's cause against (both launchers)."""
        shm = None if self.shm_size is None or isinstance(self.shm_size, bool) else str(self.shm_size)
        return TriageContext(
            gpus=self.gpus,
            gpu_resource=self.gpu_resource,
            gpu_type=tuple(self.gpu_type),
            gpu_type_label=self.gpu_type_label,
            image=self.image,
            memory=str(self.memory) if self.memory else None,
            shm_size=shm,
        )

    def _publish(self, context: Context, result: dict[str, Any]) -> dict[str, Any]:
        """Push the validated result's parts under the pod operator's XCom keys; return the whole."""
        ti = context["ti"]
        for key in ("run_id", "model_uri", "metrics"):
            ti.xcom_push(key=key, value=result[key])
        return result
