"""Successive halving end to end: real ``dag.test()``, the local launcher, a real MLflow server.

The trainer is :data:`tests.fixtures.trainer_scripts.SWEEP_TRAINER` (no torch): epoch-aware, resumable
from its checkpoint directory, one MLflow run per trial. So these tests check the sweep's plumbing:
resumption through ``checkpoint_key``, dropping a failed trial, the parent/child runs and artifacts.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import requests

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.sweeps import successive_halving
from airflow_provider_mltrain.testing import run_dag, xcom_value
from tests.fixtures.trainer_scripts import SWEEP_TRAINER


@pytest.fixture
def sweep_env(airflow_db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    script = tmp_path / "sweep_trainer.py"
    script.write_text(SWEEP_TRAINER)
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    return {"script": script, "epoch_log": tmp_path / "epochs.log", "ckpt": tmp_path / "ckpt"}


def _trainer(env: dict[str, Path], **kwargs):
    return GPUTrainingPodOperator.partial(
        task_id="train",
        image="unused-locally:1",
        cmds=["python", str(env["script"])],
        gpus=0,
        retries=0,
        env_vars={"SWEEP_EPOCH_LOG": str(env["epoch_log"]), "SWEEP_FAIL_LR": "0.25"},
        **kwargs,
    )


def test_sweep_resumes_survivors_drops_a_failed_trial_and_nests_runs_in_mlflow(
    sweep_env, airflow_conn, mlflow_server, tmp_path
):
    from airflow.sdk import DAG

    from airflow_provider_mltrain import _sweep_tracking as tracking
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

    airflow_conn("mlflow_sweep", connection_json(mlflow_server.uri))
    experiment = f"sweep-{tmp_path.name}"
    with DAG("sh_sweep", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        successive_halving(
            group_id="tune",
            trainer=_trainer(sweep_env, mlflow_conn_id="mlflow_sweep", experiment_name=experiment),
            search_space={"lr": [0.1, 0.25, 0.3, 0.5]},  # lr=0.25 fails
            n_configs=4,
            eta=2,
            min_epochs=1,
            max_epochs=2,
        )

    dag_run = run_dag(dag)

    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "success", states
    # The failed trial failed its task; the sweep went on without it.
    assert states[("tune.round_1", 1)] == "failed"
    assert states[("tune.select_1", -1)] == "success"
    best = xcom_value(dag_run, "tune.best")
    assert best["params"]["lr"] == 0.3
    assert best["trial"] == "tune-trial_002"
    assert best["metrics"]["val_accuracy"] == pytest.approx(1 - 0.2 / 2)

    # Round 2 ran the two best of round 1's three successful trials (lr 0.3, then 0.1 before 0.5 on the
    # tie by map index), each resuming its own round-1 checkpoint for one more epoch.
    round_2 = [xcom_value(dag_run, "tune.round_2", map_index=i) for i in range(2)]
    assert [r["params"]["lr"] for r in round_2] == [0.3, 0.1]
    assert [r["params"]["epochs"] for r in round_2] == [2, 2]
    assert [r["resumed_from_epoch"] for r in round_2] == [1, 1]
    assert xcom_value(dag_run, "tune.round_2", map_index=2) is None
    trained = sweep_env["epoch_log"].read_text().split("\n")
    assert sorted(line for line in trained if line) == sorted(["0.1 1", "0.3 1", "0.5 1", "0.3 2", "0.1 2"])
    assert best["trained_epochs"] == 5
    checkpoint_dirs = sorted(p.name for p in (sweep_env["ckpt"] / "sh_sweep").glob("*/*"))
    assert checkpoint_dirs == [f"checkpoint_key=tune-trial_00{i}" for i in (0, 1, 2, 3)]

    board = best["leaderboard"]
    assert [(row["trial"], row["status"], row["epochs"]) for row in board] == [
        ("tune-trial_002", "finished", 2),
        ("tune-trial_000", "finished", 2),
        ("tune-trial_003", "pruned", 1),
        ("tune-trial_001", "failed", 0),
    ]

    # MLflow: one parent run tagged for this sweep, the three trials that reported runs as its children
    # (a resumed trial keeps its run), the leaderboard and the plot as artifacts.
    client = MLflowHook("mlflow_sweep").get_conn()
    parent = client.get_run(best["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.SWEEP_TAG] == f"sh_sweep/{dag_run.run_id}/tune"
    assert parent.data.params["eta"] == "2"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(0.9)
    assert parent.data.metrics["trained_epochs"] == 5
    exp_id = parent.info.experiment_id
    children = client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags[tracking.TRIAL_TAG] for r in children) == [
        "tune-trial_000",
        "tune-trial_002",
        "tune-trial_003",
    ]
    winner = client.get_run(best["run_id"])
    assert [m.value for m in client.get_metric_history(winner.info.run_id, "val_accuracy")] == [
        pytest.approx(0.8),
        pytest.approx(0.9),
    ]
    # Read back over the server's REST API, as a browser would (no artifact repository, no global URI).
    listing = requests.get(
        f"{mlflow_server.uri}/api/2.0/mlflow/artifacts/list",
        params={"run_id": parent.info.run_id},
        timeout=10,
    ).json()
    assert {tracking.LEADERBOARD_ARTIFACT, tracking.PLOT_ARTIFACT} <= {f["path"] for f in listing["files"]}

    def artifact(path: str) -> str:
        params = {"run_uuid": parent.info.run_id, "path": path}
        response = requests.get(f"{mlflow_server.uri}/get-artifact", params=params, timeout=10)
        response.raise_for_status()
        return response.text

    table = json.loads(artifact(tracking.LEADERBOARD_ARTIFACT))
    assert table["columns"][:3] == ["rank", "trial", "status"]
    assert [row[1] for row in table["data"]] == [row["trial"] for row in board]
    svg = artifact(tracking.PLOT_ARTIFACT)
    assert svg.count("<polyline") == 3  # the failed trial has no point
    assert "tune-trial_002" in svg


def test_round_with_too_few_successful_trials_fails_the_sweep(sweep_env):
    from airflow.sdk import DAG

    with DAG("sh_fail", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        successive_halving(
            group_id="tune",
            trainer=_trainer(sweep_env),
            search_space={"lr": [0.25, 0.3]},
            n_configs=2,
            eta=2,
            min_epochs=1,
            max_epochs=2,
            min_successful=2,
        )

    dag_run = run_dag(dag)

    states = {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "failed", states
    assert states[("tune.round_1", 0)] == "failed"
    assert states[("tune.round_1", 1)] == "success"
    assert states[("tune.select_1", -1)] == "failed"
    assert states[("tune.best", -1)] == "failed"
    assert xcom_value(dag_run, "tune.best") is None


def test_adaptive_sweep_example_has_the_rounds_of_its_budget(airflow_db):
    from tests.fixtures.example_dags import load_example_dag

    dag = load_example_dag("adaptive_sweep")

    # 9 configs, eta 3, 1..9 epochs: three rounds (9 x 1, 3 x 3, 1 x 9), two selections.
    assert {t for t in dag.task_ids if t.startswith("tune.")} == {
        "tune.sample",
        "tune.round_1",
        "tune.select_1",
        "tune.round_2",
        "tune.select_2",
        "tune.round_3",
        "tune.best",
    }
    assert dag.get_task("report").upstream_task_ids == {"tune.best"}
    round_3 = dag.get_task("tune.round_3")
    assert round_3.partial_kwargs["gpus"] == 1
    assert round_3.partial_kwargs["mlflow_conn_id"] == "mlflow_default"


def test_retried_trial_resumes_its_checkpoint(sweep_env):
    import datetime as dt

    from airflow.sdk import DAG

    with DAG("sh_retry", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        successive_halving(
            group_id="tune",
            trainer=GPUTrainingPodOperator.partial(
                task_id="train",
                cmds=["python", str(sweep_env["script"])],
                gpus=0,
                retries=1,
                retry_delay=dt.timedelta(seconds=0),
                env_vars={"SWEEP_EPOCH_LOG": str(sweep_env["epoch_log"]), "SWEEP_FAIL_ONCE_LR": "0.3"},
            ),
            search_space={"lr": [0.3]},
            n_configs=1,
            eta=2,
            min_epochs=2,
            max_epochs=2,
        )

    dag_run = run_dag(dag)

    assert dag_run.state == "success"
    (trial,) = [ti for ti in dag_run.get_task_instances() if ti.task_id == "tune.round_1"]
    assert trial.try_number == 2
    result = xcom_value(dag_run, "tune.round_1", map_index=0)
    # The first try trained both epochs and checkpointed, then failed; the retry resumed, training none.
    assert result["resumed_from_epoch"] == 2
    assert sweep_env["epoch_log"].read_text().split() == ["0.3", "1", "0.3", "2"]
    assert xcom_value(dag_run, "tune.best")["trained_epochs"] == 0
