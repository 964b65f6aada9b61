"""checkov on the pods GPUTrainingPodOperator renders, xcom sidecar included.

Any failed check that is not on the documented allow-list
(:data:`airflow_provider_mltrain.hardening.CHECKOV_NOT_APPLICABLE`) fails the test, and so does an
allow-list entry that no longer fails anywhere (a stale exception). A plain KubernetesPodOperator pod is
scanned in the same run to show the scan finds what the defaults fix.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import ApiClient

from airflow_provider_mltrain.hardening import CHECKOV_NOT_APPLICABLE
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from tests.fixtures.scanners import checkov_failures

IMAGE = "ghcr.io/example/trainer:1.0"
#: What the defaults fix; a plain KubernetesPodOperator pod fails each of these.
FIXED_BY_DEFAULT = {"CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_22", "CKV_K8S_38", "CKV_K8S_40"}


def manifest(op: KubernetesPodOperator) -> dict[str, Any]:
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(None))
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def test_rendered_pods_fail_only_documented_checks(k8s_hook, tmp_path):
    pods = {
        # The README's production shape: one GPU, sized, credentials from a Secret.
        "gpu-pod": GPUTrainingPodOperator(
            task_id="train",
            image=IMAGE,
            namespace="ml",
            gpus=1,
            cpu="8",
            memory="32Gi",
            mlflow_secret="mlflow-credentials",
        ),
        "torchrun-pvc-pod": GPUTrainingPodOperator(
            task_id="train_8",
            image=IMAGE,
            namespace="ml",
            gpus=8,
            cpu="64",
            memory="512Gi",
            gpu_type="NVIDIA-H100-80GB-HBM3",
            checkpoint_volume={"claim_name": "ckpt"},
        ),
        "plain-kpo-pod": KubernetesPodOperator(
            task_id="plain", image=IMAGE, namespace="ml", cmds=["python"], do_xcom_push=True
        ),
    }
    failed = checkov_failures({name: [manifest(op)] for name, op in pods.items()}, tmp_path)

    for name in ("gpu-pod", "torchrun-pvc-pod"):
        undocumented = failed[name] - set(CHECKOV_NOT_APPLICABLE)
        assert not undocumented, (
            f"{name}: checkov checks failed that are not on the allow-list: {undocumented}"
        )
    seen = failed["gpu-pod"] | failed["torchrun-pvc-pod"]
    stale = set(CHECKOV_NOT_APPLICABLE) - seen
    assert not stale, f"allow-listed checks that no longer fail (remove them): {stale}"
    # The scan is able to fail: the plain pod fails what the defaults fix.
    assert failed["plain-kpo-pod"] >= FIXED_BY_DEFAULT, failed["plain-kpo-pod"]


def test_token_and_root_filesystem_are_opt_in(k8s_hook):
    pod = manifest(
        GPUTrainingPodOperator(
            task_id="train", image=IMAGE, namespace="ml", gpus=1, automount_service_account_token=True
        )
    )
    assert pod["spec"]["automountServiceAccountToken"] is True
    base = next(c for c in pod["spec"]["containers"] if c["name"] == "base")
    assert base["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "mltrain-tmp", "mountPath": "/tmp"} in base["volumeMounts"]
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "airflow-xcom-sidecar")
    assert sidecar["resources"]["limits"] == {"cpu": "100m", "memory": "64Mi"}
    assert sidecar["resources"]["requests"] == {"cpu": "1m", "memory": "10Mi"}
