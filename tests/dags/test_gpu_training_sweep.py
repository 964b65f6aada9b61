"""End to end on the local launcher: real ``dag.test()`` runs on SQLite, a real trainer subprocess.

The trainer is a small script that follows :mod:`gpu_trainer.contract` (``tests/fixtures/trainer_scripts.py``,
so these tests do not depend on the real trainer): it reads its hyperparameters, lineage and checkpoint directory from the
environment and writes a contract result.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.trainer_scripts import FAKE_TRAINER

SWEEP = [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}, {"lr": 0.4}]


@pytest.fixture
def trainer(tmp_path: Path) -> Path:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    return script


def test_sweep_with_expand_on_local_launcher(airflow_db, trainer, tmp_path, monkeypatch):
    from airflow.sdk import DAG, task

    # The deployment-wide setting, not an operator argument: what CI and laptops use.
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    collected = tmp_path / "collected.json"

    with DAG("gpu_sweep", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        train = GPUTrainingPodOperator.partial(
            task_id="train", image="unused-locally:1", cmds=["python", str(trainer)], gpus=0
        ).expand(hyperparameters=SWEEP)

        @task
        def collect(results, ti=None):
            # The per-key XComs (run_id, model_uri, metrics) are there for templates and pulls too.
            run_ids = ti.xcom_pull(task_ids="train", key="run_id")
            collected.write_text(json.dumps({"results": list(results), "run_ids": list(run_ids)}))

        collect(train.output) << train

    dag_run = run_dag(dag)
    assert dag_run.state == "success"
    data = json.loads(collected.read_text())
    results = data["results"]
    assert len(results) == 4
    by_lr = {r["params"]["lr"]: r for r in results}
    assert set(by_lr) == {0.1, 0.2, 0.3, 0.4}
    for index, hp in enumerate(SWEEP):
        r = by_lr[hp["lr"]]
        assert r["metrics"]["val_accuracy"] == pytest.approx(1.0 - hp["lr"])
        assert r["run_id"] == f"run-{index}"
        assert r["params"]["run_name"] == f"gpu_sweep.train.{index}@{dag_run.run_id}"
        assert r["params"]["ckpt"].startswith(str(tmp_path / "ckpt" / "gpu_sweep" / "train"))
        assert r["params"]["ckpt"].endswith(f"map_{index}")
        assert r["resumed_from_epoch"] is None
    assert sorted(data["run_ids"]) == [f"run-{i}" for i in range(4)]


def test_failing_trainer_fails_the_task_and_downstream_does_not_run(airflow_db, trainer, tmp_path):
    from airflow.sdk import DAG, task

    reached = tmp_path / "reached"
    with DAG("gpu_fail", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        train = GPUTrainingPodOperator(
            task_id="train",
            cmds=["python", str(trainer)],
            hyperparameters={"lr": 0.1, "fail": True},
            launcher="local",
        )

        @task
        def after(result):
            reached.write_text("yes")

        after(train.output)

    dag_run = run_dag(dag)
    assert dag_run.state == "failed"
    assert not reached.exists()
