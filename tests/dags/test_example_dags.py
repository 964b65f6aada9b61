"""The example DAGs: they parse cleanly and cheaply, and run end to end on the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.testing import run_dag, xcom_value
from tests.fixtures.example_dags import EXAMPLES, land_day, load_example_dag

EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*.py") if p.name != "__init__.py")

# Parses the examples in a fresh interpreter with the network cut off, and reports what got imported.
PARSE_PROBE = """
import json, socket, sys
def no_network(*args, **kwargs):
    raise RuntimeError("an example DAG opened a network connection at parse time")
socket.socket.connect = no_network
socket.create_connection = no_network
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({
    "dags": sorted(bag.dag_ids),
    "errors": {k: v[-300:] for k, v in bag.import_errors.items()},
    "loaded": sorted({m.split(".")[0] for m in sys.modules}),
}))
"""


def test_every_example_parses_without_errors_network_or_heavy_imports():
    out = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(EXAMPLES)], capture_output=True, text=True, check=True
    ).stdout
    report = json.loads(out.strip().splitlines()[-1])

    assert report["errors"] == {}
    assert report["dags"] == [
        "adaptive_sweep",
        "distributed_training",
        "hyperparameter_sweep",
        "ml_training_pipeline",
        "quickstart_taskflow",
    ]
    heavy = {"torch", "mlflow", "pandas", "numpy", "sklearn", "boto3", "pyarrow"} & set(report["loaded"])
    assert heavy == set()
    assert len(EXAMPLE_FILES) == 5


def test_pipeline_has_the_production_shape(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(EXAMPLES / "ml_training_pipeline.py")).get_dag("ml_training_pipeline")

    assert dag.max_active_runs == 1 and dag.doc_md and dag.tags
    assert {t.task_id for t in dag.tasks} >= {
        "wait_for_data",
        "data_preparation.validate",
        "data_preparation.preprocess",
        "hyperparameter_grid",
        "train",
        "pick_best",
        "score_champion",
        "quality_gate",
        "register",
        "skip_registration",
        "notify",
    }
    assert dag.get_task("notify").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("quality_gate").downstream_task_ids == {"register", "skip_registration"}
    # Like for like: the gate reads the champion's score on the same holdout the challengers used.
    assert dag.get_task("quality_gate").upstream_task_ids == {"pick_best", "score_champion"}
    assert dag.get_task("quality_gate").like_for_like
    assert dag.get_task("score_champion").upstream_task_ids == {"data_preparation.preprocess"}
    assert all(t.retries >= 1 for t in dag.tasks if t.task_id not in ("wait_for_data",))
    assert all(t.execution_timeout is not None for t in dag.tasks)


@pytest.fixture
def local_pipeline_env(airflow_db, airflow_conn, mlflow_server, monkeypatch, tmp_path):
    """The embedded default: the local launcher and the real MLflow server."""
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    return tmp_path


def test_pipeline_end_to_end_registers_a_champion_then_skips_an_unreachable_gate(
    local_pipeline_env, mlflow_server, monkeypatch
):
    import datetime as dt

    from mlflow import MlflowClient

    tmp_path = local_pipeline_env
    logical_date = dt.datetime(2026, 11, 20, 6, tzinfo=dt.timezone.utc)
    day = land_day(tmp_path / "data", "2026-11-20")
    model_name = f"digits-e2e-{tmp_path.name}"
    conf = {
        "data_root": f"file://{tmp_path / 'data'}",
        "model_name": model_name,
        "experiment_name": f"e2e-{tmp_path.name}",
        "epochs": 3,
        "learning_rates": [0.003],
        "hidden_dims": [64, 128],
    }
    dag = load_example_dag("ml_training_pipeline")

    first = run_dag(dag, logical_date=logical_date, run_conf=conf)

    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

    client: MlflowClient = MLflowHook().get_conn()
    assert first.state == "success"
    assert first.get_task_instance("register").state == "success"
    assert first.get_task_instance("skip_registration").state == "skipped"
    champion = client.get_model_version_by_alias(model_name, "champion")
    champion_metrics = client.get_run(champion.run_id).data.metrics
    assert champion.version == "1"
    assert champion_metrics["val_accuracy"] >= 0.90 and champion_metrics["val_loss"] <= 0.5
    first_report = xcom_value(first, "quality_gate", key="quality_report")
    assert first_report["like_for_like"] is True and first_report["champion"] is None
    assert first_report["candidate"]["run_id"] == champion.run_id
    assert xcom_value(first, "score_champion")["params"]["model_found"] is False
    # The model carries its preprocessing: the registered champion, loaded by MLflow's own client, scores
    # the raw held-out rows.
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # MLflow's client, as a user runs it
    held_out = pd.read_parquet(day / "prepared" / "val.parquet")
    raw = held_out.drop(columns=["label"]).to_numpy("float32")
    assert raw.max() == 16.0  # raw pixel intensities, nothing scaled them
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    assert (model.predict(raw).argmax(axis=1) == held_out["label"].to_numpy()).mean() >= 0.90

    unreachable = {**conf, "max_val_loss": 0.0}
    # Same day (same ``ds``, so the same landed data), a later run.
    second = run_dag(dag, logical_date=logical_date + dt.timedelta(hours=1), run_conf=unreachable)

    assert second.state == "success"
    assert second.get_task_instance("register").state == "skipped"
    assert second.get_task_instance("skip_registration").state == "success"
    assert second.get_task_instance("notify").state == "success"
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.version for v in versions] == ["1"]
    assert client.get_model_version_by_alias(model_name, "champion").run_id == champion.run_id
    # Like for like: the champion was scored on this run's holdout (the same day's split, so the same
    # rows it validated on), and the report shows that score beside the one its run recorded.
    report = xcom_value(second, "quality_gate", key="quality_report")
    rescored = report["champion"]["rescored"]
    assert report["champion"]["version"] == "1" and rescored["run_id"] == champion.run_id
    assert rescored["metrics"]["val_accuracy"] == pytest.approx(champion_metrics["val_accuracy"])
    assert report["champion"]["metrics"]["val_accuracy"] == champion_metrics["val_accuracy"]
    (vs_champion,) = [c for c in report["checks"] if c["check"] == "vs_champion"]
    assert vs_champion["champion_value"] == rescored["metrics"]["val_accuracy"]
    assert vs_champion["champion_recorded_value"] == champion_metrics["val_accuracy"]
    assert report["candidate"]["run_id"] == xcom_value(second, "pick_best", key="run_id")


def test_sweep_dag_runs_one_mlflow_run_per_combination_and_picks_the_best(local_pipeline_env):
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook
    from gpu_trainer.digits import write_digits

    tmp_path = local_pipeline_env
    data = tmp_path / "prepared"
    write_digits(str(data))
    experiment = f"sweep-{tmp_path.name}"
    dag = load_example_dag("hyperparameter_sweep")
    conf = {
        "data": str(data),
        "experiment_name": experiment,
        "epochs": 2,
        "learning_rates": [0.01, 0.001, 0.0001],
        "batch_sizes": [64],
    }

    dag_run = run_dag(dag, run_conf=conf)

    assert dag_run.state == "success"
    client = MLflowHook().get_conn()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == 3
    accuracy = {r.info.run_id: r.data.metrics["val_accuracy"] for r in runs}
    chosen = xcom_value(dag_run, "compare")
    # The trainer's reported metrics are the ones it logged to MLflow; two learning rates may tie.
    assert chosen["metrics"]["val_accuracy"] == pytest.approx(accuracy[chosen["run_id"]])
    assert accuracy[chosen["run_id"]] == max(accuracy.values())
