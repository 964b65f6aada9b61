"""Multi-node training resources as plain dicts: a JobSet (``jobset.x-k8s.io/v1alpha2``) or a Kubeflow
Trainer TrainJob (``trainer.kubeflow.org/v1alpha1``), built around the one training pod template.

Every node runs the same command: ``torchrun [-m module | script | --no-python program] args...`` with no
rendezvous flags. torchrun reads its placement from ``PET_*`` variables
(:data:`gpu_trainer.contract.TORCHRUN_ENV_VARS`): Kubeflow Trainer injects them into a TrainJob's nodes;
for a JobSet this module sets them (the node rank from the Indexed Job's completion index, the leader at its
stable hostname in JobSet's headless service); the local launcher sets them per node process.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators._kueue import QUEUE_LABEL
from airflow_provider_mltrain.operators._preemption import DISRUPTION_CONDITION
from gpu_trainer import contract

BACKENDS = ("jobset", "trainjob")
JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
#: Kubeflow Trainer's default runtime for PyTorch (a ClusterTrainingRuntime).
DEFAULT_RUNTIME = "torch-distributed"
TRAINER_API_GROUP = "trainer.kubeflow.org"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
#: The replicated job and its container: the name Kubeflow Trainer's torch runtimes use, so both
#: backends (and the local launcher) share it.
NODE_NAME = "node"
#: Kueue: the LocalQueue a workload is submitted to (QUEUE_LABEL, owned by ._kueue), and its
#: WorkloadPriorityClass.
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
#: The scheduling gate Kueue's pod integration holds a queued pod behind until it admits it.
ADMISSION_GATE = "kueue.x-k8s.io/admission"
#: The Indexed Job's completion index of a pod: its node rank.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: The owner of the TrainJob's runtime patch. Kubeflow Trainer keys patches by it and its webhook requires
#: a domain-prefixed path (``<DNS subdomain>/<path>``, like Kueue's ``kueue.x-k8s.io/manager``): a bare name
#: is refused at create. The prefix is the project's GitHub organization's own domain (``<org>.github.io``
#: belongs to that organization), so it claims no one else's. It must stay stable: the manager keys the
#: patch, and the CRD makes it immutable.
PATCH_MANAGER = "airflow-provider-mltrain.github.io/manager"
#: Labels identifying the Airflow task instance (KubernetesPodOperator's keys, so existing tooling and
#: cleanup jobs that select on them find these resources too).
TASK_LABEL_KEYS = ("dag_id", "task_id", "run_id", "map_index")
#: Marks resources this provider created (narrows the label selector of a re-attach).
CREATED_BY_LABEL = ("app.kubernetes.io/managed-by", "airflow-provider-mltrain")
#: The JobSet failure-policy rule that restarts every node after one was disrupted (preempted, evicted, its
#: node drained or shut down) without spending ``maxRestarts``: the node Job's ``podFailurePolicy`` fails
#: the Job with reason ``PodFailurePolicy`` on the pod condition ``DisruptionTarget``, and this rule
#: matches that reason. JobSet's documented pattern; the operator counts these restarts against
#: ``max_preemptions`` (``status.restarts - status.restartsCountTowardsMax``).
PREEMPTION_RULE_NAME = "restartOnPreemption"
#: Kubernetes' Job failure reason when a ``podFailurePolicy`` rule with action ``FailJob`` matched.
POD_FAILURE_POLICY_REASON = "PodFailurePolicy"
#: Longest resource name: JobSet pod hostnames are ``<name>-node-<job>-<pod>`` and a DNS label is <= 63.
MAX_NAME_LENGTH = 40

_PYTHON = re.compile(r"python3?(\.\d+)?")


def multinode_command(cmds: Sequence[str]) -> list[str]:
    """``cmds`` under torchrun with no rendezvous flags (torchrun reads ``PET_*`` from the environment).

    ``python -m mod`` becomes ``torchrun -m mod``, ``python script.py`` becomes ``torchrun script.py`` and
    any other program runs with ``--no-python``.
    """
    cmds = list(cmds)
    if cmds and _PYTHON.fullmatch(cmds[0]):
        return ["torchrun", *cmds[1:]]
    return ["torchrun", "--no-python", *cmds]


def task_labels(lineage: Mapping[str, Any]) -> dict[str, str]:
    """Labels naming the task instance (not the try: a retry finds the previous try's resource).

    :param lineage: the contract lineage (``dag_id``, ``dag_run_id``, ``task_id``, ``map_index``).
    """
    from airflow.providers.cncf.kubernetes.pod_generator import make_safe_label_value

    if not lineage:
        return {CREATED_BY_LABEL[0]: CREATED_BY_LABEL[1]}
    values = {
        "dag_id": lineage["dag_id"],
        "task_id": lineage["task_id"],
        "run_id": lineage["dag_run_id"],
    }
    map_index = lineage.get("map_index")
    if map_index is not None and map_index >= 0:
        values["map_index"] = map_index
    labels = {key: make_safe_label_value(str(value)) for key, value in values.items()}
    labels[CREATED_BY_LABEL[0]] = CREATED_BY_LABEL[1]
    return labels


def resource_name(task_id: str, lineage: Mapping[str, Any]) -> str:
    """A DNS-1035 label for the resource, unique per try (a retry's replacement never waits for the old
    one's deletion to free its name): the task id, shortened, and a hash of the task instance and try."""
    stem = re.sub(r"[^a-z0-9-]+", "-", task_id.lower()).strip("-") or "training"
    if not stem[0].isalpha():
        stem = f"t-{stem}"
    identity = "/".join(str(lineage.get(k, "")) for k in contract.LINEAGE_KEYS) if lineage else task_id
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    stem = stem[: MAX_NAME_LENGTH - len(digest) - 1].rstrip("-")
    return f"{stem}-{digest}"


def kueue_labels(queue_name: str | None, priority_class: str | None) -> dict[str, str]:
    labels = {}
    if queue_name:
        labels[QUEUE_LABEL] = queue_name
    if priority_class:
        labels[PRIORITY_CLASS_LABEL] = priority_class
    return labels


def jobset_rendezvous_env(name: str, num_nodes: int, nproc_per_node: int) -> list[k8s.V1EnvVar]:
    """torchrun's placement for a JobSet node: what Kubeflow Trainer would inject into a TrainJob's."""
    return [
        k8s.V1EnvVar(name=contract.ENV_NNODES, value=str(num_nodes)),
        k8s.V1EnvVar(name=contract.ENV_NPROC_PER_NODE, value=str(nproc_per_node)),
        k8s.V1EnvVar(
            name=contract.ENV_NODE_RANK,
            value_from=k8s.V1EnvVarSource(
                field_ref=k8s.V1ObjectFieldSelector(
                    field_path=f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
                )
            ),
        ),
        # Pod 0 of job 0 of the "node" replicated job, in the headless service named after the JobSet.
        k8s.V1EnvVar(name=contract.ENV_MASTER_ADDR, value=f"{name}-{NODE_NAME}-0-0.{name}"),
        k8s.V1EnvVar(name=contract.ENV_MASTER_PORT, value=str(contract.DEFAULT_MASTER_PORT)),
    ]


def _serialize(obj: Any) -> Any:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def jobset(
    *,
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    pod_labels: Mapping[str, str],
    pod_spec: k8s.V1PodSpec,
    num_nodes: int,
    max_restarts: int,
    suspend: bool,
) -> dict[str, Any]:
    """A JobSet with one replicated job ``node``: an Indexed Job of ``num_nodes`` pods.

    A node failure restarts every node (up to ``max_restarts`` times); a node that was disrupted
    (``DisruptionTarget``) restarts them without counting toward ``max_restarts``.

    :param pod_spec: the node pod spec (the training template applied, rendezvous env set).
    :param suspend: created suspended (Kueue unsuspends it on admission).
    """
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        metadata["namespace"] = namespace
    job_spec = {
        "parallelism": num_nodes,
        "completions": num_nodes,
        "completionMode": "Indexed",
        # One pod failing fails the set: JobSet's failurePolicy restarts every node together.
        "backoffLimit": 0,
        # A disrupted pod fails its Job with reason PodFailurePolicy (the pods' restartPolicy is Never, as
        # a podFailurePolicy requires), which the JobSet rule below restarts without counting.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onPodConditions": [{"type": DISRUPTION_CONDITION, "status": "True"}],
                }
            ]
        },
        "template": {"metadata": {"labels": dict(pod_labels)}, "spec": _serialize(pod_spec)},
    }
    spec: dict[str, Any] = {
        "network": {"enableDNSHostnames": True},
        "failurePolicy": {
            "maxRestarts": max_restarts,
            # First match wins; any other node failure falls through to RestartJobSet, which counts.
            "rules": [
                {
                    "name": PREEMPTION_RULE_NAME,
                    "action": "RestartJobSetAndIgnoreMaxRestarts",
                    "onJobFailureReasons": [POD_FAILURE_POLICY_REASON],
                }
            ],
        },
        "replicatedJobs": [
            {
                "name": NODE_NAME,
                "replicas": 1,
                "template": {"metadata": {"labels": dict(pod_labels)}, "spec": job_spec},
            }
        ],
    }
    if suspend:
        spec["suspend"] = True
    return {"apiVersion": JOBSET_API_VERSION, "kind": "JobSet", "metadata": metadata, "spec": spec}


def trainjob(
    *,
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    pod_labels: Mapping[str, str],
    pod_spec: k8s.V1PodSpec,
    container: k8s.V1Container,
    num_nodes: int,
    nproc_per_node: int,
    runtime_ref: str,
    runtime_kind: str,
    suspend: bool,
) -> dict[str, Any]:
    """A TrainJob on ``runtime_ref``: the trainer container's image, command, env and resources in
    ``spec.trainer``; the rest of the pod template (tolerations, affinity, volumes, security contexts,
    service account) as a runtime patch of the ``node`` replicated job.

    :param pod_spec: the node pod spec (the training template applied).
    :param container: its trainer container.
    """
    metadata: dict[str, Any] = {"name": name, "labels": dict(labels)}
    if namespace:
        metadata["namespace"] = namespace
    trainer: dict[str, Any] = {
        "image": container.image,
        "command": list(container.command or []),
        "numNodes": num_nodes,
        "numProcPerNode": nproc_per_node,
    }
    if container.args:
        trainer["args"] = list(container.args)
    if container.env:
        trainer["env"] = _serialize(container.env)
    if container.resources is not None:
        trainer["resourcesPerNode"] = _serialize(container.resources)
    patched_container: dict[str, Any] = {"name": NODE_NAME}
    if container.security_context is not None:
        patched_container["securityContext"] = _serialize(container.security_context)
    if container.volume_mounts:
        patched_container["volumeMounts"] = _serialize(container.volume_mounts)
    # Only the fields the CRD lets a runtime patch set (it has no automountServiceAccountToken or
    # terminationMessagePath: the runtime's defaults apply, and /dev/termination-log is Kubernetes').
    pod_patch: dict[str, Any] = {"containers": [patched_container]}
    for field in (
        "affinity",
        "image_pull_secrets",
        "node_selector",
        "security_context",
        "service_account_name",
        "termination_grace_period_seconds",
        "tolerations",
        "volumes",
    ):
        value = getattr(pod_spec, field)
        if value or (field == "termination_grace_period_seconds" and value == 0):
            pod_patch[k8s.V1PodSpec.attribute_map[field]] = _serialize(value)
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": TRAINER_API_GROUP, "kind": runtime_kind, "name": runtime_ref},
        "trainer": trainer,
        "runtimePatches": [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": NODE_NAME,
                                    "template": {
                                        "spec": {
                                            "template": {
                                                "metadata": {"labels": dict(pod_labels)},
                                                "spec": pod_patch,
                                            }
                                        }
                                    },
                                }
                            ]
                        }
                    }
                },
            }
        ],
    }
    if suspend:
        spec["suspend"] = True
    return {"apiVersion": TRAINJOB_API_VERSION, "kind": "TrainJob", "metadata": metadata, "spec": spec}
