"""The distributed_training example DAG end to end on the local launcher: 2 nodes (torchrun agents, gloo
on CPU) train, the quality gate passes and the model is registered as champion in the real MLflow server.

The example asks for 8 GPUs per node; here each node runs one process (``nproc_per_node=1``), the only
change, so the run fits a CI machine. Everything else (the JobSet's own node command, Kueue settings,
the shared checkpoint volume) is what the DAG file says.
"""

from __future__ import annotations

from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json
from airflow_provider_mltrain.testing import run_dag, xcom_value
from tests.fixtures.example_dags import load_example_dag


def test_example_trains_on_two_local_nodes_gates_and_registers(
    airflow_db, airflow_conn, mlflow_server, monkeypatch, tmp_path
):
    from gpu_trainer.digits import write_digits

    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    data = tmp_path / "prepared"
    write_digits(str(data))
    model_name = f"digits-distributed-{tmp_path.name}"
    experiment = f"distributed-{tmp_path.name}"
    dag = load_example_dag("distributed_training")
    dag.get_task("train").nproc_per_node = 1

    dag_run = run_dag(
        dag,
        run_conf={"data": str(data), "epochs": 6, "model_name": model_name, "experiment_name": experiment},
    )

    assert dag_run.state == "success"
    assert dag_run.get_task_instance("register").state == "success"
    assert dag_run.get_task_instance("skip_registration").state == "skipped"
    result = xcom_value(dag_run, "train")
    client = MLflowHook().get_conn()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # rank 0 alone logs, once
    # Two nodes x one process: one DDP job of world size 2, logged by global rank 0 alone.
    assert runs[0].data.params["world_size"] == "2" and result["params"]["world_size"] == 2
    assert result["metrics"]["val_accuracy"] >= 0.90
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id == result["run_id"]
