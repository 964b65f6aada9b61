"""The one training pod template: what every training pod gets, whichever operator launches it.

:class:`GPUTrainingPodOperator` applies it to KubernetesPodOperator's pod; :class:`DistributedTrainingOperator`
applies it to the pod template of each node of a JobSet or TrainJob. GPUs, the GPU taint's toleration, GPU
type affinity, shared memory, the checkpoint volume, a writable /tmp, the contract's environment, Secret
references for credentials and the restricted security contexts are decided here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators import _pod_spec as spec
from gpu_trainer import contract


@dataclasses.dataclass(frozen=True)
class TrainingPodParams:
    """A training task's pod parameters, rendered and validated by the operator.

    :param gpus: GPUs per pod (requests = limits); 0 for a CPU-only pod.
    :param gpu_resource: the extended resource name, e.g. ``nvidia.com/gpu``.
    :param gpu_type: accepted GPU products (values of ``gpu_type_label``); empty accepts any.
    :param gpu_type_label: the node label holding the GPU product.
    :param cpu: CPU request and limit (a Kubernetes quantity) or None.
    :param memory: memory request and limit (a Kubernetes quantity) or None.
    :param shm_size: ``/dev/shm`` size: a quantity, True (no explicit size), False (none), None (on with GPUs).
    :param checkpoint_volume: ``{"claim_name", "mount_path"[, "access_mode"]}`` or None.
    :param checkpoint_uri: a URI prefix for checkpoints (no volume is mounted for it) or None.
    :param mlflow_secret: Secret with the MLflow credential keys, or None.
    :param data_secret: Secret with the data store's keys, or None.
    """

    gpus: int = 0
    gpu_resource: str = spec.DEFAULT_GPU_RESOURCE
    gpu_type: tuple[str, ...] = ()
    gpu_type_label: str = spec.DEFAULT_GPU_TYPE_LABEL
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | bool | None = None
    checkpoint_volume: Mapping[str, str] | None = None
    checkpoint_uri: str | None = None
    mlflow_secret: str | None = None
    data_secret: str | None = None

    @property
    def shm_enabled(self) -> bool:
        """Whether the pod gets a memory-backed /dev/shm (by default: when it has GPUs)."""
        return self.gpus > 0 if self.shm_size is None else self.shm_size is not False


def apply_training_template(
    pod_spec: k8s.V1PodSpec,
    container: k8s.V1Container,
    params: TrainingPodParams,
    contract_env: Mapping[str, str],
    *,
    sidecar_name: str | None = None,
) -> k8s.V1PodSpec:
    """Make ``pod_spec`` (holding ``container``, the trainer) a training pod; returns the same object.

    What the user set on the base spec stays (tolerations, affinity terms, volumes, env, security contexts)
    and the training needs are merged in. The trainer's command is the caller's (single-node torchrun or
    the multi-node command differ).

    :param pod_spec: the base pod spec, changed in place.
    :param container: the trainer container, one of ``pod_spec.containers``, changed in place.
    :param params: the training parameters.
    :param contract_env: the trainer's contract variables (:func:`gpu_trainer.contract.trainer_environment`);
        user variables named like any contract variable are dropped.
    :param sidecar_name: a sidecar (KubernetesPodOperator's xcom sidecar) that gets resource limits.
    """
    wanted = spec.resources(params.gpus, params.gpu_resource, params.cpu, params.memory)
    if wanted is not None:
        container.resources = wanted
    if params.gpus:
        pod_spec.tolerations = spec.merge_tolerations(
            pod_spec.tolerations or [], spec.gpu_toleration(params.gpu_resource)
        )
    if params.gpu_type:
        requirement = k8s.V1NodeSelectorRequirement(
            key=params.gpu_type_label, operator="In", values=list(params.gpu_type)
        )
        pod_spec.affinity = spec.add_required_node_affinity(pod_spec.affinity or None, requirement)
    _add_volumes(pod_spec, container, params)
    container.env = _environment(container.env or [], params, contract_env)
    # Restricted profile unless the user (operator argument, template or connection) set one.
    if not pod_spec.security_context:
        pod_spec.security_context = spec.restricted_pod_security_context()
    for c in pod_spec.containers:
        if not c.security_context:
            c.security_context = spec.restricted_container_security_context()
    if sidecar_name:
        spec.limit_xcom_sidecar(pod_spec.containers, sidecar_name)
    # A training pod does not talk to the Kubernetes API: no token unless the user asks for one
    # (automount_service_account_token=True, or a pod template that sets it).
    if pod_spec.automount_service_account_token is None:
        pod_spec.automount_service_account_token = False
    return pod_spec


def _add_volumes(pod_spec: k8s.V1PodSpec, container: k8s.V1Container, params: TrainingPodParams) -> None:
    volumes = list(pod_spec.volumes or [])
    mounts = list(container.volume_mounts or [])
    if params.shm_enabled:
        shm = params.shm_size
        shm_limit = None if shm is None or isinstance(shm, bool) else shm
        volumes.append(
            k8s.V1Volume(
                name=spec.SHM_VOLUME,
                empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_limit or params.memory),
            )
        )
        mounts.append(k8s.V1VolumeMount(name=spec.SHM_VOLUME, mount_path="/dev/shm"))
    if params.checkpoint_volume:
        volumes.append(
            k8s.V1Volume(
                name=spec.CHECKPOINT_VOLUME,
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=params.checkpoint_volume["claim_name"]
                ),
            )
        )
        mounts.append(
            k8s.V1VolumeMount(name=spec.CHECKPOINT_VOLUME, mount_path=params.checkpoint_volume["mount_path"])
        )
    elif not params.checkpoint_uri:
        # Without a PVC or URI, checkpoints live as long as the pod: a retry starts over.
        volumes.append(k8s.V1Volume(name=spec.CHECKPOINT_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()))
        mounts.append(
            k8s.V1VolumeMount(name=spec.CHECKPOINT_VOLUME, mount_path=spec.DEFAULT_CHECKPOINT_MOUNT)
        )
    if not any(m.mount_path.rstrip("/") == spec.TMP_MOUNT for m in mounts):
        volumes.append(k8s.V1Volume(name=spec.TMP_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource()))
        mounts.append(k8s.V1VolumeMount(name=spec.TMP_VOLUME, mount_path=spec.TMP_MOUNT))
    pod_spec.volumes = volumes
    container.volume_mounts = mounts


def _environment(
    user_env: list[Any], params: TrainingPodParams, contract_env: Mapping[str, str]
) -> list[k8s.V1EnvVar]:
    env = [e for e in user_env if e.name not in contract.TRAINER_ENV_VARS]
    env += [k8s.V1EnvVar(name=name, value=value) for name, value in contract_env.items()]
    if params.mlflow_secret:
        spec.check_secret_name("mlflow_secret", params.mlflow_secret)  # as rendered
        env += spec.secret_env(params.mlflow_secret, contract.CREDENTIAL_ENV_VARS)
    if params.data_secret:
        spec.check_secret_name("data_secret", params.data_secret)  # the rendered value
        # A user's own env_vars entry (say a literal AWS_ENDPOINT_URL for MinIO) wins over the key.
        taken = {e.name for e in env}
        names = [name for name in contract.DATA_STORE_ENV_VARS if name not in taken]
        env += spec.secret_env(params.data_secret, names)
    return env


# -- what the template is filled with: the same facts for every training operator --------------------


def task_lineage(context: Mapping[str, Any] | None) -> dict[str, Any]:
    """The contract lineage of the running task instance ({} without a context, e.g. a dry run).

    :param context: the task's Airflow context.
    """
    if not context:
        return {}
    ti = context["ti"]
    return {
        "dag_id": ti.dag_id,
        "dag_run_id": context["run_id"],
        "task_id": ti.task_id,
        "map_index": ti.map_index,
        "try_number": ti.try_number,
    }


def checkpoint_suffix(task_id: str, lineage: Mapping[str, Any], checkpoint_key: str | None = None) -> str:
    """The task instance's checkpoint directory below the checkpoint root: the same for every try (a retry
    resumes), or per DAG run and ``checkpoint_key`` (every task of a sweep's trial resumes the same one).

    :param task_id: the task id (the whole suffix without a lineage).
    :param lineage: :func:`task_lineage`.
    :param checkpoint_key: the rendered ``checkpoint_key``, or None.
    """
    if not lineage:
        return spec.path_segment(task_id)
    if checkpoint_key is not None:
        return spec.keyed_checkpoint_suffix(lineage["dag_id"], lineage["dag_run_id"], checkpoint_key)
    return spec.checkpoint_suffix(
        lineage["dag_id"], lineage["task_id"], lineage["dag_run_id"], lineage["map_index"]
    )


def checkpoint_dir(checkpoint_volume: Mapping[str, str] | None, checkpoint_uri: Any, suffix: str) -> str:
    """Where the trainer checkpoints: under the PVC's mount, the URI prefix, or the image's directory.

    :param checkpoint_volume: the validated ``checkpoint_volume`` or None.
    :param checkpoint_uri: the rendered ``checkpoint_uri`` or None.
    :param suffix: :func:`checkpoint_suffix`.
    """
    if checkpoint_volume:
        return f"{checkpoint_volume['mount_path']}/{suffix}"
    if checkpoint_uri:
        return f"{str(checkpoint_uri).rstrip('/')}/{suffix}"
    return f"{spec.DEFAULT_CHECKPOINT_MOUNT}/{suffix}"


def trainer_env(
    *,
    task_id: str,
    default_dag_id: str,
    lineage: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    checkpoint_dir: str,
    result_path: str,
    experiment_name: Any,
    mlflow: Mapping[str, str] | None,
    literal_credentials: bool = False,
    data_store: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The trainer's contract variables (:func:`gpu_trainer.contract.trainer_environment`) with the MLflow
    run name every training operator gives its runs.

    :param task_id: the task id.
    :param default_dag_id: the DAG id to name the run after when there is no lineage (a dry run).
    :param lineage: :func:`task_lineage`.
    :param hyperparameters: the rendered, validated hyperparameters.
    :param checkpoint_dir: :func:`checkpoint_dir` (or the local launcher's directory).
    :param result_path: where the trainer writes its result.
    :param experiment_name: the rendered MLflow experiment, or None.
    :param mlflow: the MLflow variables (a pod's: the tracking URI only).
    :param literal_credentials: keep credential values from ``mlflow`` (local launchers only).
    :param data_store: the data store's variables (local launchers only).
    """
    return contract.trainer_environment(
        hyperparameters=hyperparameters,
        checkpoint_dir=checkpoint_dir,
        lineage=lineage,
        result_path=result_path,
        run_name=spec.run_name(
            lineage.get("dag_id", default_dag_id),
            task_id,
            lineage.get("map_index"),
            lineage.get("dag_run_id"),
        ),
        experiment_name=str(experiment_name) if experiment_name else None,
        mlflow=mlflow,
        literal_credentials=literal_credentials,
        extra=data_store,
    )
