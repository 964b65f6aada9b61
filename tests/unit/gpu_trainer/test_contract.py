"""The public trainer API of ``gpu_trainer.contract`` and the one function that builds the trainer's env."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_trainer import contract
from gpu_trainer.contract import ContractError

METRICS = {"val_accuracy": 0.9, "val_loss": 0.3, "train_loss": 0.2, "val_f1": 0.88}


def test_the_api_is_importable_with_the_standard_library_alone():
    # -S -I: no site-packages at all, as in an image that only copied the contract.
    code = "import sys; sys.path.insert(0, '.'); from gpu_trainer import contract; print(contract.SCHEMA_VERSION)"
    out = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == str(contract.SCHEMA_VERSION)


def test_hyperparameters_checkpoint_dir_and_lineage_read_the_environment():
    env = {
        contract.ENV_HYPERPARAMETERS: json.dumps({"lr": 0.1, "epochs": 3}),
        contract.ENV_CHECKPOINT_DIR: "/mltrain/checkpoints/d/t/r",
        contract.ENV_LINEAGE: json.dumps({"dag_id": "d", "dag_run_id": "r", "task_id": "t", "x": 1}),
    }
    assert contract.hyperparameters(env) == {"lr": 0.1, "epochs": 3}
    assert contract.checkpoint_dir(env) == "/mltrain/checkpoints/d/t/r"
    assert contract.lineage(env) == {"dag_id": "d", "dag_run_id": "r", "task_id": "t"}


def test_outside_airflow_everything_is_empty():
    assert contract.hyperparameters({}) == {}
    assert contract.checkpoint_dir({}) is None
    assert contract.checkpoint_dir({contract.ENV_CHECKPOINT_DIR: ""}) is None
    assert contract.lineage({}) == {}


def test_an_older_operators_lineage_run_id_is_read_as_dag_run_id():
    old = {"dag_id": "d", "run_id": "manual__1", "task_id": "t", "map_index": -1, "try_number": 2}
    parsed = contract.lineage({contract.ENV_LINEAGE: json.dumps(old)})
    assert parsed["dag_run_id"] == "manual__1" and "run_id" not in parsed
    # MLflow tags follow the new name, whichever name the lineage came with.
    assert contract.lineage_tags(old)["airflow.dag_run_id"] == "manual__1"
    assert "airflow.run_id" not in contract.lineage_tags(old)
    # The new key wins when both are there.
    assert contract.normalize_lineage({"run_id": "old", "dag_run_id": "new"}) == {"dag_run_id": "new"}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "MLTRAIN_HYPERPARAMETERS is not valid JSON"),
        ("[1, 2]", "MLTRAIN_HYPERPARAMETERS must be a JSON object, got list"),
        (
            '{"output": "/tmp/x.json"}',
            "'output' is not a hyperparameter: the result path is set by the launcher",
        ),
        (
            '{"checkpoint_dir": "/shared"}',
            "'checkpoint_dir' is not a hyperparameter: use the operator's checkpoint_volume=",
        ),
    ],
)
def test_bad_hyperparameters_are_one_clear_line(raw, needle):
    with pytest.raises(ContractError) as info:
        contract.hyperparameters({contract.ENV_HYPERPARAMETERS: raw})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "main"),
    [
        ({}, True),
        ({"RANK": "0", "WORLD_SIZE": "8"}, True),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, False),
        # Second node of a multi-node job: local rank 0, global rank 8 -> not the reporter.
        ({"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}, False),
        ({"RANK": ""}, True),
    ],
)
def test_is_main_process_is_global_rank_zero(env, main):
    assert contract.is_main_process(env) is main


def test_a_malformed_rank_is_an_error():
    with pytest.raises(ContractError, match=r"RANK must be an integer \(torchrun's global rank\), got 'one'"):
        contract.is_main_process({"RANK": "one"})


def test_report_result_writes_a_valid_result_where_the_operator_reads_it(tmp_path):
    path = tmp_path / "xcom" / "return.json"
    env = {contract.ENV_RESULT_PATH: str(path)}
    written = contract.report_result(
        run_id="abc",
        model_uri="runs:/abc/model",
        metrics={**METRICS, "epochs": 3},
        params={"lr": 0.1},
        experiment_id="7",
        resumed_from_epoch=2,
        require_metrics=contract.CLASSIFICATION_METRICS,
        environ=env,
    )
    assert written == str(path)
    result = contract.load_result(str(path))
    assert result == {
        "schema_version": contract.SCHEMA_VERSION,
        "run_id": "abc",
        "model_uri": "runs:/abc/model",
        "metrics": {**METRICS, "epochs": 3.0},
        "params": {"lr": 0.1},
        "resumed_from_epoch": 2,
        "experiment_id": "7",
    }


def test_report_result_accepts_tensor_metrics(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "return.json"
    contract.report_result(
        run_id="r",
        model_uri=None,
        metrics={"val_loss": torch.tensor(0.25)},
        params={},
        environ={contract.ENV_RESULT_PATH: str(path)},
    )
    assert json.loads(path.read_text())["metrics"] == {"val_loss": 0.25}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"metrics": {"val_loss": float("nan")}}, "metrics must be finite numbers, got {'val_loss': nan}"),
        ({"metrics": {"val_loss": "0.3"}}, "metric 'val_loss' must be a number, got '0.3'"),
        ({"metrics": [0.3]}, "metrics must be a mapping of name -> number, got list"),
        (
            {"metrics": {"val_loss": 0.3}, "require": True},
            "metrics lack ['val_accuracy', 'train_loss', 'val_f1']",
        ),
        ({"params": {"when": object()}}, "params must be JSON-serializable"),
        ({"run_id": 5}, "run_id must be a string or null, got int"),
        ({"experiment_id": 7}, "experiment_id must be a string or null, got int"),
        ({"resumed_from_epoch": "2"}, "resumed_from_epoch must be an int or null, got '2'"),
    ],
)
def test_report_result_refuses_a_bad_result_and_writes_nothing(tmp_path, kwargs, needle):
    path = tmp_path / "return.json"
    args = {"run_id": "r", "model_uri": "runs:/r/model", "metrics": METRICS, "params": {}}
    require = kwargs.pop("require", False)
    args.update(kwargs)
    with pytest.raises(ContractError) as info:
        contract.report_result(
            **args,
            require_metrics=contract.CLASSIFICATION_METRICS if require else (),
            environ={contract.ENV_RESULT_PATH: str(path)},
        )
    assert needle in str(info.value)
    assert not path.exists()


def test_report_result_on_another_rank_is_refused(tmp_path):
    path = tmp_path / "return.json"
    with pytest.raises(ContractError, match=r"rank 2: only the main process reports"):
        contract.report_result(
            run_id="r",
            model_uri=None,
            metrics=METRICS,
            params={},
            environ={"RANK": "2", contract.ENV_RESULT_PATH: str(path)},
        )
    assert not path.exists()


def test_results_without_experiment_id_still_validate():
    # Older trainers do not report it; the operator then asks MLflow.
    old = contract.make_result(
        run_id="r", model_uri=None, metrics=METRICS, params={}, resumed_from_epoch=None
    )
    assert "experiment_id" not in old
    assert contract.validate_result(old) == old


# -- trainer_environment ------------------------------------------------------------------------------


def test_trainer_environment_builds_every_contract_variable():
    lineage = {"dag_id": "d", "dag_run_id": "manual__1", "task_id": "t", "map_index": 2, "try_number": 1}
    env = contract.trainer_environment(
        hyperparameters={"lr": 0.1},
        checkpoint_dir="/mltrain/checkpoints/d/t/manual__1/map_2",
        lineage=lineage,
        run_name="d.t.2@manual__1",
        experiment_name="digits",
        mlflow={contract.ENV_TRACKING_URI: "http://mlflow:5000"},
    )
    assert env == {
        contract.ENV_HYPERPARAMETERS: '{"lr": 0.1}',
        contract.ENV_RESULT_PATH: contract.DEFAULT_RESULT_PATH,
        contract.ENV_CHECKPOINT_DIR: "/mltrain/checkpoints/d/t/manual__1/map_2",
        contract.ENV_LINEAGE: json.dumps(lineage, sort_keys=True),
        contract.ENV_RUN_NAME: "d.t.2@manual__1",
        contract.ENV_EXPERIMENT_NAME: "digits",
        contract.ENV_TRACKING_URI: "http://mlflow:5000",
    }
    # What the trainer reads back is what went in.
    assert contract.hyperparameters(env) == {"lr": 0.1}
    assert contract.lineage(env) == lineage


def test_trainer_environment_keeps_literal_credentials_only_when_asked():
    mlflow = {
        contract.ENV_TRACKING_URI: "https://mlflow",
        contract.ENV_TRACKING_USERNAME: "u",
        contract.ENV_TRACKING_PASSWORD: "p",
        contract.ENV_TRACKING_INSECURE_TLS: "true",
    }
    pod = contract.trainer_environment(hyperparameters={}, checkpoint_dir=None, mlflow=mlflow)
    assert not set(pod) & set(contract.CREDENTIAL_ENV_VARS)
    assert pod[contract.ENV_TRACKING_INSECURE_TLS] == "true"
    assert contract.ENV_CHECKPOINT_DIR not in pod
    local = contract.trainer_environment(
        hyperparameters={}, checkpoint_dir=None, mlflow=mlflow, literal_credentials=True
    )
    assert (local[contract.ENV_TRACKING_USERNAME], local[contract.ENV_TRACKING_PASSWORD]) == ("u", "p")


def test_trainer_environment_takes_extra_variables_but_not_over_the_contract():
    env = contract.trainer_environment(
        hyperparameters={}, checkpoint_dir=None, extra={"AWS_ENDPOINT_URL": "http://s3:9000"}
    )
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    with pytest.raises(ContractError, match=r"extra variables \['MLTRAIN_RESULT_PATH'\] would override"):
        contract.trainer_environment(
            hyperparameters={}, checkpoint_dir=None, extra={contract.ENV_RESULT_PATH: "/elsewhere"}
        )


@pytest.mark.parametrize("key", sorted(contract.RESERVED_HYPERPARAMETERS))
def test_trainer_environment_refuses_reserved_hyperparameters(key):
    with pytest.raises(ContractError, match=rf"{key!r} is not a hyperparameter"):
        contract.trainer_environment(hyperparameters={key: "x"}, checkpoint_dir=None)


def test_trainer_environment_refuses_unknown_mlflow_variables():
    with pytest.raises(ContractError, match=r"unknown MLflow variables \['MLFLOW_TRACKING_URL'\]"):
        contract.trainer_environment(
            hyperparameters={}, checkpoint_dir=None, mlflow={"MLFLOW_TRACKING_URL": "http://x"}
        )


def test_every_reserved_key_is_named_at_once():
    with pytest.raises(ContractError) as info:
        contract.check_reserved_hyperparameters({"lr": 0.1, "run_name": "x", "output": "y"})
    message = str(info.value)
    assert "'output' is not a hyperparameter" in message and "'run_name' is not a hyperparameter" in message
    assert "'lr'" not in message.split("(reserved names")[0]
