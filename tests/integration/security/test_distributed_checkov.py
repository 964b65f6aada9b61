"""checkov on DistributedTrainingOperator's node pods (the shared training template), both backends.

checkov has no JobSet or TrainJob checks, so each node's pod is scanned as a Pod; the JobSet document goes
into the same run to show it is readable YAML that checkov accepts. The allow-list is the pod operator's
(:data:`airflow_provider_mltrain.hardening.CHECKOV_NOT_APPLICABLE`): one template, one list.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient

from airflow_provider_mltrain.hardening import CHECKOV_NOT_APPLICABLE
from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
from tests.fixtures.scanners import checkov_failures

IMAGE = "ghcr.io/example/trainer:1.0"
SHARED = {"claim_name": "ckpt", "mount_path": "/ckpt", "access_mode": "ReadWriteMany"}


def node_pod(op: DistributedTrainingOperator) -> dict[str, Any]:
    spec = ApiClient().sanitize_for_serialization(op.build_node_pod_spec(None))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": op.task_id, "namespace": "ml"},
        "spec": spec,
    }


def test_node_pods_fail_only_documented_checks(tmp_path):
    common = {"image": IMAGE, "namespace": "ml", "num_nodes": 2, "gpus": 8, "cpu": "64", "memory": "512Gi"}
    jobset = DistributedTrainingOperator(
        task_id="jobset-node", checkpoint_volume=SHARED, mlflow_secret="mlflow-credentials", **common
    )
    trainjob = DistributedTrainingOperator(
        task_id="trainjob-node",
        backend="trainjob",
        checkpoint_uri="s3://b/ckpt",
        queue_name="team-a",
        **common,
    )

    failed = checkov_failures(
        {
            "jobset-node": [node_pod(jobset)],
            "trainjob-node": [node_pod(trainjob)],
            "jobset": [jobset.build_manifest()],
        },
        tmp_path,
    )

    for name in ("jobset-node", "trainjob-node"):
        # The scan did read this pod: a batch job has no probes, an allow-listed failure.
        assert failed[name] >= {"CKV_K8S_8", "CKV_K8S_9"}, failed[name]
        undocumented = failed[name] - set(CHECKOV_NOT_APPLICABLE)
        assert not undocumented, (
            f"{name}: checkov checks failed that are not on the allow-list: {undocumented}"
        )
