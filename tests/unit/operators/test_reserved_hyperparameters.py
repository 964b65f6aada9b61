"""Locations and run naming are not hyperparameters: refused at DAG parse, and after rendering/mapping.

Before, ``hyperparameters={"output": ...}`` moved the result away from where the operator reads it (a
full training, then "trainer wrote no result"), and ``{"checkpoint_dir": "/shared"}`` made every later
DAG run resume the first one's checkpoint and return its metrics without training.
"""

from __future__ import annotations

import datetime
import json
import textwrap

import pytest

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.gpu_operator import IMAGE, build, env_of

RESERVED = sorted(contract.RESERVED_HYPERPARAMETERS)


@pytest.mark.parametrize("key", RESERVED)
def test_refused_when_the_dag_is_parsed(key):
    with pytest.raises(ValueError) as info:
        GPUTrainingPodOperator(task_id="train", image=IMAGE, hyperparameters={"lr": 0.1, key: "/shared"})
    message = str(info.value)
    assert message.startswith("GPUTrainingPodOperator: invalid hyperparameters=")
    assert f"{key!r} is not a hyperparameter: {contract.RESERVED_HYPERPARAMETERS[key]}" in message


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("output", "MLTRAIN_RESULT_PATH"),
        ("checkpoint_dir", "checkpoint_volume= or checkpoint_uri="),
        ("experiment", "experiment_name="),
        ("run_name", "names the run"),
    ],
)
def test_refused_in_partial_and_as_a_json_string(key, instead):
    with pytest.raises(ValueError, match=rf"{key!r} is not a hyperparameter: .*{instead}"):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, hyperparameters={key: "x"})
    with pytest.raises(ValueError, match=rf"{key!r} is not a hyperparameter"):
        GPUTrainingPodOperator(task_id="train", image=IMAGE, hyperparameters=json.dumps({key: "x"}))


def test_refused_once_a_template_rendered_it(k8s_hook):
    op = GPUTrainingPodOperator(task_id="train", image=IMAGE, hyperparameters="{{ params.hp }}")
    op.hyperparameters = '{"lr": 0.1, "checkpoint_dir": "/shared"}'  # what rendering produced
    with pytest.raises(ValueError, match=r"hyperparameters=.*'checkpoint_dir' is not a hyperparameter"):
        build(op)
    op.hyperparameters = '{"lr": 0.1}'
    assert json.loads(env_of(build(op))[contract.ENV_HYPERPARAMETERS]) == {"lr": 0.1}


# A trainer that reports success whatever it is given: only the operator's check can fail a mapped task.
TRAINER = textwrap.dedent(
    """
    from gpu_trainer import contract

    contract.report_result(run_id="r", model_uri=None, metrics={"loss": 0.1}, params=contract.hyperparameters())
    """
)


def test_refused_in_expand_values_once_mapped(airflow_db, tmp_path, monkeypatch):
    from airflow.sdk import DAG

    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    with DAG("reserved_in_expand", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        GPUTrainingPodOperator.partial(
            task_id="train", cmds=["python", str(script)], launcher="local"
        ).expand(hyperparameters=[{"lr": 0.1}, {"lr": 0.2, "output": str(tmp_path / "elsewhere.json")}])

    dag_run = run_dag(dag)

    states = {ti.map_index: ti.state for ti in dag_run.get_task_instances()}
    assert states == {0: "success", 1: "failed"}
    assert not (tmp_path / "elsewhere.json").exists()
