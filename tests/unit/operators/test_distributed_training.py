"""DistributedTrainingOperator: parse-time checks and the JobSet / TrainJob manifests.

Every manifest goes through what the API server would run on its create (:func:`tests.fixtures.webhooks.admit`:
the vendored upstream CRD's schema, strictly, and CEL rules, then JobSet's or Kubeflow Trainer's admission
webhook) and each node's pod through Kubernetes' own schema (kubernetes-validate). Nothing here trains or
talks to a cluster.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient

from airflow_provider_mltrain.operators import _manifests as manifests
from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.crds import validate_custom_resource
from tests.fixtures.gpu_operator import IMAGE, RUN_ID, make_context
from tests.fixtures.webhooks import admit

RWX = {"claim_name": "team-checkpoints", "mount_path": "/checkpoints", "access_mode": "ReadWriteMany"}
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {"checkpoint_uri": "s3://bucket/ckpt", "cpu": "4", "memory": "8Gi"},
    "gpus": {"gpus": 8, "checkpoint_uri": "s3://bucket/ckpt", "cpu": "32", "memory": "256Gi"},
    "gpu-type-queue-pvc": {
        "gpus": 8,
        "gpu_type": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"],
        "queue_name": "team-a",
        "priority_class": "high",
        "checkpoint_volume": RWX,
        "mlflow_secret": "mlflow-creds",
        "data_secret": "s3-creds",
        "mlflow_conn_id": None,
        "experiment_name": "digits",
    },
}


def make_op(**kwargs: Any) -> DistributedTrainingOperator:
    kwargs.setdefault("task_id", "train")
    kwargs.setdefault("image", IMAGE)
    kwargs.setdefault("namespace", "ml")
    return DistributedTrainingOperator(**kwargs)


def node_pod(op: DistributedTrainingOperator, context: dict[str, Any] | None) -> dict[str, Any]:
    spec = ApiClient().sanitize_for_serialization(op.build_node_pod_spec(context))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node-0"}, "spec": spec}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("num_nodes", [1, 2, 4])
@pytest.mark.parametrize("backend", manifests.BACKENDS)
def test_every_manifest_validates_against_its_crd_and_kubernetes(backend, num_nodes, variant):
    op = make_op(backend=backend, num_nodes=num_nodes, **VARIANTS[variant])
    context = make_context(map_index=3)
    manifest = op.build_manifest(context)

    admit(manifest)
    kubernetes_validate.validate(node_pod(op, context), kubernetes_validate.latest_version(), strict=True)
    # What dry_run prints is the same document.
    assert yaml.safe_load(yaml.safe_dump(manifest)) == manifest
    assert manifest["metadata"]["namespace"] == "ml"
    assert manifest["metadata"]["labels"]["task_id"] == "train"
    assert manifest["metadata"]["labels"]["map_index"] == "3"


def test_the_strict_crd_check_rejects_a_misspelt_field():
    manifest = make_op(checkpoint_uri="s3://b/c", num_nodes=2).build_manifest(make_context())
    manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["paralelism"] = 2
    with pytest.raises(jsonschema.ValidationError, match="paralelism"):
        validate_custom_resource(manifest)


def test_jobset_runs_indexed_nodes_with_torchrun_placement_from_the_environment():
    op = make_op(num_nodes=4, gpus=8, checkpoint_uri="s3://b/ckpt", max_restarts=3, queue_name="team-a")
    manifest = op.build_manifest(make_context())
    name = manifest["metadata"]["name"]
    spec = manifest["spec"]
    (node,) = spec["replicatedJobs"]
    job = node["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = env_of(container)

    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert node["name"] == "node" and node["replicas"] == 1
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (
        4,
        4,
        "Indexed",
        0,
    )
    # A disrupted node fails its Job with reason PodFailurePolicy; that restarts the set uncounted.
    assert spec["failurePolicy"] == {
        "maxRestarts": 3,
        "rules": [
            {
                "name": "restartOnPreemption",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ],
    }
    assert job["podFailurePolicy"] == {
        "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    }
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert spec["network"] == {"enableDNSHostnames": True}
    assert spec["suspend"] is True and manifest["metadata"]["labels"][manifests.QUEUE_LABEL] == "team-a"
    # torchrun with no rendezvous flags: it reads PET_* (the same command on every backend).
    assert container["name"] == "node"
    assert container["command"] == ["torchrun", "-m", "gpu_trainer.train"]
    assert env[contract.ENV_NNODES] == "4"
    assert env[contract.ENV_NPROC_PER_NODE] == "8"
    assert env[contract.ENV_NODE_RANK] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env[contract.ENV_MASTER_ADDR] == f"{name}-node-0-0.{name}"
    assert env[contract.ENV_MASTER_PORT] == str(contract.DEFAULT_MASTER_PORT)
    # Rank 0's result lands in the termination message the lifecycle reads.
    assert container["terminationMessagePath"] == contract.TERMINATION_MESSAGE_PATH
    assert env[contract.ENV_RESULT_PATH] == contract.TERMINATION_MESSAGE_PATH
    assert job["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("task_id", ["1_train.Model", "__x__", "train", "a_very_long_task_id_" + "x" * 200])
@pytest.mark.parametrize("backend", manifests.BACKENDS)
def test_names_pass_the_crds_name_rules_and_jobsets_name_lengths(task_id, backend):
    """The TrainJob CRD's CEL rules and JobSet's webhook (its Job and pod names, at 16 nodes)."""
    context = make_context(task_id=task_id)
    op = make_op(task_id=task_id, backend=backend, num_nodes=16, checkpoint_uri="s3://b/c")
    manifest = op.build_manifest(context)
    admit(manifest)
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def test_jobset_names_fit_pod_hostnames_and_differ_per_try_not_per_node():
    op = make_op(task_id="a_very_long_task_id_" + "x" * 80, checkpoint_uri="s3://b/c", num_nodes=2)
    first = op.build_manifest(make_context(task_id=op.task_id, try_number=1))["metadata"]["name"]
    second = op.build_manifest(make_context(task_id=op.task_id, try_number=2))["metadata"]["name"]
    assert first != second
    for name in (first, second):
        # <name>-node-<job>-<pod> is a DNS label (<= 63) and a TrainJob name is RFC 1035.
        assert len(f"{name}-node-0-3") <= 63 and name[0].isalpha() and name == name.lower()


def test_trainjob_leaves_placement_to_kubeflow_trainer_and_patches_the_node_pod():
    op = make_op(
        backend="trainjob",
        num_nodes=2,
        gpus=4,
        gpu_type="NVIDIA-A100-SXM4-80GB",
        checkpoint_volume=RWX,
        queue_name="team-a",
        mlflow_secret="mlflow-creds",
        service_account_name="trainer",
    )
    manifest = op.build_manifest(make_context())
    spec = manifest["spec"]
    trainer = spec["trainer"]
    env = env_of(trainer)
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]

    assert manifest["kind"] == "TrainJob" and manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["command"] == ["torchrun", "-m", "gpu_trainer.train"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    # Kubeflow Trainer rejects user env with torchrun's names: it injects them itself.
    assert not set(env) & set(contract.TORCHRUN_ENV_VARS)
    assert env[contract.ENV_CHECKPOINT_DIR].startswith("/checkpoints/train_dag/train/")
    assert env["MLFLOW_TRACKING_PASSWORD"] == {
        "secretKeyRef": {"key": "MLFLOW_TRACKING_PASSWORD", "name": "mlflow-creds", "optional": True}
    }
    assert spec["suspend"] is True
    assert node["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["serviceAccountName"] == "trainer"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A100-SXM4-80GB"]}
    ]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["team-checkpoints"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The runtime patch carries the SIGTERM checkpoint's grace period (the CRD has no failurePolicy there).
    assert pod["terminationGracePeriodSeconds"] == 120


def test_a_node_pod_is_the_pod_operators_training_pod(k8s_hook):
    """One template builder: the same parameters give the same GPUs, volumes, env and security contexts."""
    shared = {
        "gpus": 2,
        "gpu_type": "NVIDIA-L4",
        "cpu": "8",
        "memory": "32Gi",
        "checkpoint_uri": "s3://b/ckpt",
        "data_secret": "s3-creds",
        "hyperparameters": {"epochs": 3},
    }
    context = make_context()
    node = node_pod(make_op(**shared), context)["spec"]
    pod = ApiClient().sanitize_for_serialization(
        GPUTrainingPodOperator(task_id="train", image=IMAGE, namespace="ml", **shared).build_pod_request_obj(
            context
        )
    )["spec"]
    trainer = next(c for c in pod["containers"] if c["name"] == "base")
    # KubernetesPodOperator's own xcom volume aside.
    pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "xcom"]
    trainer["volumeMounts"] = [m for m in trainer["volumeMounts"] if m["name"] != "xcom"]
    for key in ("tolerations", "affinity", "volumes", "securityContext", "automountServiceAccountToken"):
        assert node[key] == pod[key], key
    for key in ("resources", "volumeMounts", "securityContext"):
        assert node["containers"][0][key] == trainer[key], key
    node_env, pod_env = env_of(node["containers"][0]), env_of(trainer)
    for name in (
        contract.ENV_HYPERPARAMETERS,
        contract.ENV_CHECKPOINT_DIR,
        contract.ENV_LINEAGE,
        "AWS_ACCESS_KEY_ID",
    ):
        assert node_env[name] == pod_env[name], name


def test_nproc_per_node_defaults_to_the_gpus_or_one():
    assert make_op(gpus=8).effective_nproc_per_node == 8
    assert make_op().effective_nproc_per_node == 1
    assert make_op(gpus=8, nproc_per_node=2).effective_nproc_per_node == 2


def test_other_programs_run_under_torchrun_without_python():
    op = make_op(cmds=["/opt/train.sh"], arguments=["--fast"])
    container = node_pod(op, make_context())["spec"]["containers"][0]
    assert container["command"] == ["torchrun", "--no-python", "/opt/train.sh"]
    assert container["args"] == ["--fast"]


def test_dry_run_prints_the_manifest_as_yaml(capsys):
    make_op(num_nodes=2, checkpoint_uri="s3://b/c", queue_name="team-a").dry_run()
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kind"] == "JobSet"
    admit(printed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_nodes": 2}, r"invalid num_nodes=2; .*checkpoint_uri=.*ReadWriteMany"),
        (
            {"num_nodes": 2, "checkpoint_volume": {"claim_name": "c", "mount_path": "/c"}},
            r"invalid checkpoint_volume=.*ReadWriteMany",
        ),
        ({"num_nodes": 0}, r"invalid num_nodes=0; expected an int >= 1"),
        ({"backend": "ray"}, r"invalid backend='ray'; expected one of \['jobset', 'trainjob'\]"),
        ({"backend": "trainjob", "max_restarts": 2}, r"invalid max_restarts=2; .*runtime"),
        ({"max_restarts": -1}, r"invalid max_restarts=-1"),
        ({"queue_name": "Team A"}, r"invalid queue_name='Team A'"),
        ({"priority_class": "x" * 64}, r"invalid priority_class="),
        ({"env_vars": {"PET_NNODES": "3"}}, r"invalid env_vars=\['PET_NNODES'\]"),
        ({"env_vars": {contract.ENV_CHECKPOINT_DIR: "/x"}}, r"invalid env_vars="),
        ({"gpus": -1}, r"invalid gpus=-1"),
        ({"runtime_kind": "Runtime"}, r"invalid runtime_kind='Runtime'"),
        ({"admission_timeout_seconds": 0}, r"invalid admission_timeout_seconds=0"),
        ({"deferrable": "yes"}, r"invalid deferrable='yes'"),
        ({"max_preemptions": -1}, r"invalid max_preemptions=-1; expected an int >= 0"),
        ({"max_preemptions": True}, r"invalid max_preemptions=True"),
        ({"termination_grace_period": -5}, r"invalid termination_grace_period=-5; expected whole seconds"),
        ({"termination_grace_period": 1.5}, r"invalid termination_grace_period=1.5"),
        ({"checkpoint_volume": {"claim_name": "c", "access_mode": "Many"}}, r"invalid checkpoint_volume="),
    ],
)
def test_bad_arguments_fail_at_parse_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        make_op(**kwargs)
    assert str(err.value).startswith("DistributedTrainingOperator: ")


def test_a_sweep_checks_partial_at_parse_and_maps_hyperparameters():
    from airflow.sdk import DAG

    with pytest.raises(ValueError, match="invalid num_nodes=2"):
        DistributedTrainingOperator.partial(task_id="bad", image=IMAGE, num_nodes=2)
    with DAG("distributed_sweep", schedule=None):
        mapped = DistributedTrainingOperator.partial(
            task_id="trial", image=IMAGE, num_nodes=2, checkpoint_uri="s3://b/c"
        ).expand(hyperparameters=[{"lr": 0.1}, {"lr": 0.01}])
    assert mapped.partial_kwargs["num_nodes"] == 2
    assert mapped.expand_input.value == {"hyperparameters": [{"lr": 0.1}, {"lr": 0.01}]}


def test_labels_identify_the_task_instance_not_the_try():
    op = make_op(checkpoint_uri="s3://b/c", num_nodes=2)
    labels = op.task_labels(make_context(map_index=5, try_number=3))
    assert labels == {
        "dag_id": "train_dag",
        "task_id": "train",
        "run_id": labels["run_id"],
        "map_index": "5",
        "app.kubernetes.io/managed-by": "airflow-provider-mltrain",
    }
    # ':' and '+' are not label characters: KubernetesPodOperator's sanitising (and so its selectors) apply.
    assert labels["run_id"].startswith("manual__2026-01-01T00") and labels["run_id"] != RUN_ID
    assert len(labels["run_id"]) <= 63


@pytest.mark.parametrize("backend", manifests.BACKENDS)
def test_users_pod_settings_are_merged_and_stay_valid(backend):
    op = make_op(
        backend=backend,
        gpus=4,
        gpu_type="NVIDIA-L4",
        num_nodes=2,
        checkpoint_uri="s3://b/c",
        node_selector={"pool": "training"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        service_account_name="trainer",
        image_pull_secrets="registry-a,registry-b",
        env_vars={"NCCL_DEBUG": "INFO"},
    )
    context = make_context()
    pod = node_pod(op, context)
    admit(op.build_manifest(context))
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)

    spec = pod["spec"]
    assert spec["nodeSelector"] == {"pool": "training"}
    assert [t["key"] for t in spec["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    (term,) = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert [e["key"] for e in term["matchExpressions"]] == ["zone", "nvidia.com/gpu.product"]
    assert [s["name"] for s in spec["imagePullSecrets"]] == ["registry-a", "registry-b"]
    assert env_of(spec["containers"][0])["NCCL_DEBUG"] == "INFO"


@pytest.mark.parametrize("backend", manifests.BACKENDS)
@pytest.mark.parametrize("grace", [0, 600, None])
def test_termination_grace_period_reaches_every_node_pod(backend, grace):
    op = make_op(backend=backend, num_nodes=2, checkpoint_uri="s3://b/c", termination_grace_period=grace)
    manifest = op.build_manifest(make_context())
    admit(manifest)
    if backend == "jobset":
        pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    else:
        (patch,) = manifest["spec"]["runtimePatches"]
        (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = node["template"]["spec"]["template"]["spec"]
    assert pod.get("terminationGracePeriodSeconds") == grace
