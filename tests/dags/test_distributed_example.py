"""The distributed_training example DAG: its shape and the JobSet it submits (no training here; the local
run is in test_distributed_example_local.py)."""

from __future__ import annotations

from airflow_provider_mltrain.operators._manifests import PRIORITY_CLASS_LABEL, QUEUE_LABEL
from tests.fixtures.example_dags import load_example_dag
from tests.fixtures.gpu_operator import make_context
from tests.fixtures.webhooks import admit


def test_example_submits_a_two_node_kueue_jobset_then_gates_and_registers(airflow_db, airflow_conn):
    airflow_conn("mlflow_default", "mlflow://mlflow.example.com")
    dag = load_example_dag("distributed_training")
    train = dag.get_task("train")

    manifest = train.build_manifest(make_context(dag_id=dag.dag_id))

    admit(manifest)
    assert manifest["kind"] == "JobSet"
    labels = manifest["metadata"]["labels"]
    assert labels[QUEUE_LABEL] == "team-a" and labels[PRIORITY_CLASS_LABEL] == "training-high"
    assert manifest["spec"]["suspend"] is True
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == 2
    container = job["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    # The same tail as the production pipeline.
    assert dag.get_task("quality_gate").upstream_task_ids == {"train"}
    assert dag.get_task("quality_gate").downstream_task_ids == {"register", "skip_registration"}
    assert train.execution_timeout is not None and train.retries >= 0
