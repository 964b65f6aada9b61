"""GPUTrainingPodOperator: construction-time validation and the pod specs it builds.

Pods are built with KPO's own ``build_pod_request_obj(context)``, serialized with the Kubernetes client's
``sanitize_for_serialization`` and validated against the newest Kubernetes schema kubernetes-validate
ships (strict: unknown fields are errors). Only the Kubernetes hook (the API boundary) is mocked.
"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.links.mlflow import MLflowRunLink
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import IMAGE, RUN_ID, assert_valid, base, build, env_of, op_

# -- pod specs ---------------------------------------------------------------------------------------


def test_cpu_only_pod_is_valid_and_restricted(k8s_hook):
    pod = build(op_(gpus=0, cpu="2", memory="4Gi", hyperparameters={"lr": 0.01, "epochs": 3}))
    assert_valid(pod)
    c = base(pod)
    assert c["command"] == ["python", "-m", "gpu_trainer.train"]
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert "tolerations" not in pod["spec"] or not pod["spec"]["tolerations"]
    assert "/dev/shm" not in [m["mountPath"] for m in c["volumeMounts"]]
    # Pod Security Standards "restricted".
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        # The trainer image's user, shared with the xcom sidecar so it can read the 0600 result file.
        "runAsUser": contract.TRAINER_UID,
        "runAsGroup": contract.TRAINER_GID,
        "fsGroup": contract.TRAINER_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in pod["spec"]["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    env = env_of(pod)
    assert json.loads(env[contract.ENV_HYPERPARAMETERS]) == {"lr": 0.01, "epochs": 3}
    assert env[contract.ENV_RESULT_PATH] == "/airflow/xcom/return.json"
    assert json.loads(env[contract.ENV_LINEAGE]) == {
        "dag_id": "train_dag",
        "dag_run_id": RUN_ID,
        "task_id": "train",
        "map_index": -1,
        "try_number": 1,
    }
    # Unique per DAG run: the same trial of two daily runs gets two names in the MLflow UI.
    assert env[contract.ENV_RUN_NAME] == f"train_dag.train@{RUN_ID}"


def test_one_gpu_pod(k8s_hook):
    pod = build(op_(gpus=1, memory="16Gi", arguments=["--epochs", "5"]))
    assert_valid(pod)
    c = base(pod)
    assert c["args"] == ["--epochs", "5"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "mltrain-shm")
    # Default shm: memory-backed, bounded by the memory limit.
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "mltrain-shm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_eight_gpus_torchrun_gpu_type_list_pvc_secret(k8s_hook, airflow_conn):
    airflow_conn("mlflow_prod", connection_json("http://mlflow.internal:5000"))
    user_tol = k8s.V1Toleration(key="dedicated", operator="Equal", value="ml", effect="NoSchedule")
    op = op_(
        gpus=8,
        gpu_type=["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
        cpu="64",
        memory="512Gi",
        shm_size="64Gi",
        distributed=True,
        tolerations=[
            user_tol,
            k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
        ],
        checkpoint_volume={"claim_name": "ckpt-pvc", "mount_path": "/ckpt"},
        mlflow_conn_id="mlflow_prod",
        experiment_name="digits",
        mlflow_secret="mlflow-creds",
    )
    pod = build(op, map_index=3, try_number=2)
    assert_valid(pod)
    c = base(pod)
    assert c["command"] == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=8",
        "-m",
        "gpu_trainer.train",
    ]
    assert c["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {
                    "key": "nvidia.com/gpu.product",
                    "operator": "In",
                    "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                }
            ]
        }
    ]
    # The user's GPU toleration is not duplicated; their other one is kept.
    assert [t["key"] for t in pod["spec"]["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["mltrain-shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["mltrain-checkpoints"]["persistentVolumeClaim"] == {"claimName": "ckpt-pvc"}
    assert {"name": "mltrain-checkpoints", "mountPath": "/ckpt"} in c["volumeMounts"]
    env = env_of(pod)
    # Per dag/task/run/map index, never per try: a retry resumes.
    assert env[contract.ENV_CHECKPOINT_DIR] == "/ckpt/train_dag/train/manual__2026-01-01T00_00_00_00_00/map_3"
    assert env[contract.ENV_TRACKING_URI] == "http://mlflow.internal:5000"
    assert env[contract.ENV_EXPERIMENT_NAME] == "digits"
    assert env[contract.ENV_RUN_NAME] == f"train_dag.train.3@{RUN_ID}"
    assert json.loads(env[contract.ENV_LINEAGE])["try_number"] == 2
    for name in contract.CREDENTIAL_ENV_VARS:
        assert env[name] == {"secretKeyRef": {"name": "mlflow-creds", "key": name, "optional": True}}


def test_checkpoint_dir_is_stable_across_tries(k8s_hook):
    op = op_(gpus=1, checkpoint_uri="s3://bucket/ckpt/")
    first = env_of(build(op, try_number=1))[contract.ENV_CHECKPOINT_DIR]
    second = env_of(build(op_(gpus=1, checkpoint_uri="s3://bucket/ckpt/"), try_number=2))[
        contract.ENV_CHECKPOINT_DIR
    ]
    assert first == second == "s3://bucket/ckpt/train_dag/train/manual__2026-01-01T00_00_00_00_00"


def test_gpu_type_is_anded_into_user_affinity_and_amd_resource(k8s_hook):
    user_affinity = k8s.V1Affinity(
        node_affinity=k8s.V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                node_selector_terms=[
                    k8s.V1NodeSelectorTerm(
                        match_expressions=[
                            k8s.V1NodeSelectorRequirement(key="zone", operator="In", values=["a"])
                        ]
                    ),
                    k8s.V1NodeSelectorTerm(
                        match_expressions=[
                            k8s.V1NodeSelectorRequirement(key="zone", operator="In", values=["b"])
                        ]
                    ),
                ]
            )
        )
    )
    op = op_(
        gpus=2,
        gpu_resource="amd.com/gpu",
        gpu_type="MI300X",
        gpu_type_label="amd.com/gpu.product-name",
        affinity=user_affinity,
        shm_size=False,
    )
    pod = build(op)
    assert_valid(pod)
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert len(terms) == 2
    for term in terms:
        assert {"key": "amd.com/gpu.product-name", "operator": "In", "values": ["MI300X"]} in term[
            "matchExpressions"
        ]
    assert base(pod)["resources"]["limits"] == {"amd.com/gpu": "2"}
    assert pod["spec"]["tolerations"] == [
        {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert all(v["name"] != "mltrain-shm" for v in pod["spec"]["volumes"])


def test_user_security_context_wins(k8s_hook):
    op = op_(
        security_context={"runAsUser": 1234, "runAsNonRoot": True},
        container_security_context={"privileged": False},
    )
    pod = build(op)
    assert pod["spec"]["securityContext"] == {"runAsUser": 1234, "runAsNonRoot": True}
    assert base(pod)["securityContext"] == {"privileged": False}


def test_templated_hyperparameters_validated_at_build(k8s_hook):
    op = op_(hyperparameters="{{ params.hp }}")  # accepted at construction: rendered later
    op.hyperparameters = '{"lr": 0.1}'  # what rendering produced (a JSON string)
    assert json.loads(env_of(build(op))[contract.ENV_HYPERPARAMETERS]) == {"lr": 0.1}
    op.hyperparameters = "[1, 2]"
    with pytest.raises(ValueError, match=r"hyperparameters=.*dict"):
        build(op)


def test_extra_link_and_template_fields():
    assert any(isinstance(link, MLflowRunLink) for link in GPUTrainingPodOperator.operator_extra_links)
    fields = set(GPUTrainingPodOperator.template_fields)
    assert set(KubernetesPodOperator.template_fields) <= fields
    assert {"hyperparameters", "experiment_name", "checkpoint_uri"} <= fields


def test_provider_info_registers_operator_and_link():
    from airflow_provider_mltrain.get_provider_info import get_provider_info

    info = get_provider_info()
    modules = [m for entry in info["operators"] for m in entry["python-modules"]]
    assert "airflow_provider_mltrain.operators.gpu_training" in modules
    assert "airflow_provider_mltrain.links.mlflow.MLflowRunLink" in info["extra-links"]
    assert "local_checkpoint_root" in info["config"]["mltrain"]["options"]


# -- construction-time validation ------------------------------------------------------------------


BAD_ARGUMENTS = [
    ({"gpus": -1}, r"gpus=-1.*int >= 0"),
    ({"gpus": 1.5}, r"gpus=1\.5"),
    ({"gpu_resource": "gpu"}, r"gpu_resource='gpu'.*vendor-domain/resource"),
    ({"gpu_resource": "Nvidia.com/gpu"}, r"gpu_resource='Nvidia.com/gpu'"),
    ({"gpu_type": []}, r"gpu_type=\[\]"),
    ({"gpu_type": "A100 80GB"}, r"gpu_type='A100 80GB'"),
    ({"gpu_type_label": "bad label"}, r"gpu_type_label='bad label'"),
    ({"cpu": "two"}, r"cpu='two'.*Kubernetes quantity"),
    ({"memory": "16GB"}, r"memory='16GB'.*Kubernetes quantity"),
    ({"memory": "-1Gi"}, r"memory='-1Gi'"),
    ({"cpu": 0}, r"cpu=0.*positive"),
    ({"shm_size": "lots"}, r"shm_size='lots'"),
    ({"hyperparameters": {"f": object()}}, r"hyperparameters=.*JSON-serializable"),
    ({"hyperparameters": {"lr": float("nan")}}, r"hyperparameters=.*JSON"),
    ({"hyperparameters": "not json"}, r"hyperparameters='not json'"),
    ({"hyperparameters": [1, 2]}, r"hyperparameters=\[1, 2\]"),
    (
        {"gpus": 1, "container_resources": k8s.V1ResourceRequirements(limits={"cpu": "1"})},
        r"container_resources=.*not both",
    ),
    ({"launcher": "slurm"}, r"launcher='slurm'.*\['kubernetes', 'local'\]"),
    ({"checkpoint_volume": {"claim": "x"}}, r"checkpoint_volume="),
    ({"checkpoint_volume": {"claim_name": "pvc", "mount_path": "rel"}}, r"mount_path must be absolute"),
    (
        {"checkpoint_volume": {"claim_name": "pvc"}, "checkpoint_uri": "s3://b/c"},
        r"checkpoint_uri=.*not both",
    ),
    ({"nproc_per_node": 0}, r"nproc_per_node=0"),
    ({"distributed": True}, r"distributed=True.*nproc_per_node"),
    ({"env_vars": {"MLTRAIN_HYPERPARAMETERS": "{}"}}, r"env_vars=.*MLTRAIN_HYPERPARAMETERS"),
    ({"do_xcom_push": False}, r"do_xcom_push=False"),
    ({"unschedulable_timeout_seconds": -5}, r"unschedulable_timeout_seconds=-5"),
]


@pytest.mark.parametrize(("kwargs", "pattern"), BAD_ARGUMENTS)
def test_bad_parameters_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        op_(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    # partial() only knows what it is given: "distributed with no GPUs" needs both sides spelled out.
    [case for case in BAD_ARGUMENTS if case[0] != {"distributed": True}]
    + [({"distributed": True, "gpus": 0, "nproc_per_node": None}, r"distributed=True.*nproc_per_node")],
)
def test_bad_parameters_fail_at_partial_when_the_dag_is_parsed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, **kwargs)


def test_partial_leaves_mapped_and_templated_values_for_later():
    from airflow.sdk import DAG

    with DAG("sweep_dag", schedule=None):
        mapped = GPUTrainingPodOperator.partial(
            task_id="train", image=IMAGE, distributed=True, cpu="{{ params.cpu }}"
        ).expand(gpus=[1, 2], hyperparameters=[{"lr": 0.1}])

    assert mapped.partial_kwargs["distributed"] is True
    assert mapped.expand_input.value["gpus"] == [1, 2]


def test_templated_values_are_accepted_at_construction():
    op = op_(cpu="{{ params.cpu }}", memory="{{ params.mem }}", hyperparameters="{{ params.hp }}")
    assert op.cpu == "{{ params.cpu }}"


def test_valid_quantities_and_resources_accepted():
    op = op_(
        gpus=4, gpu_resource="amd.com/gpu", cpu=0.5, memory="1.5Gi", shm_size="1e9", gpu_type="NVIDIA-L4"
    )
    assert (op.cpu, op.memory, op.gpu_type) == ("0.5", "1.5Gi", ["NVIDIA-L4"])


def test_schema_validation_catches_a_broken_pod(k8s_hook):
    """Guard against a validator that accepts anything."""
    pod = build(op_(gpus=1))
    base(pod)["securityContext"]["runAsNonRoot"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        assert_valid(pod)


def test_templated_resources_render_and_are_validated(k8s_hook):
    op = op_(gpus=1, cpu="{{ params.cpu }}", memory="{{ params.mem }}")
    op.cpu, op.memory = "4", "8Gi"  # what rendering produced
    assert base(build(op))["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    op.memory = "8 gigs"
    with pytest.raises(ValueError, match=r"memory='8 gigs'"):
        build(op)
