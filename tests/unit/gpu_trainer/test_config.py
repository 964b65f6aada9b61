from __future__ import annotations

import json

import pytest

from gpu_trainer import contract
from gpu_trainer.config import TrainConfig, resolve_config
from gpu_trainer.errors import TrainerError


def test_flag_beats_hyperparameters_beats_env_beats_default():
    env = {
        contract.ENV_HYPERPARAMETERS: json.dumps({"batch_size": 32, "lr": 0.01}),
        contract.ENV_RESULT_PATH: "/env/result.json",
        contract.ENV_CHECKPOINT_DIR: "/ckpt",
        contract.ENV_EXPERIMENT_NAME: "exp",
        contract.ENV_RUN_NAME: "run-1",
    }
    cfg = resolve_config(["--data", "d", "--lr", "0.5", "--compile"], env)
    assert cfg.lr == 0.5  # flag
    assert cfg.batch_size == 32  # hyperparameters
    assert cfg.output == "/env/result.json"  # the launcher's location
    assert cfg.checkpoint_dir == "/ckpt" and cfg.experiment == "exp" and cfg.run_name == "run-1"
    assert cfg.compile is True
    assert cfg.epochs == TrainConfig.epochs and cfg.optimizer == "adamw"  # defaults


def test_defaults_without_environment():
    cfg = resolve_config(["--data", "s3://bucket/prefix"], {})
    assert cfg == TrainConfig(data="s3://bucket/prefix")
    assert cfg.output == contract.DEFAULT_RESULT_PATH
    assert cfg.checkpoint_dir is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--data", "d", "--epochs", "0"], "--epochs: epochs must be an integer >= 1, got '0'"),
        (
            ["--data", "d", "--val-fraction", "1.5"],
            "--val-fraction: val_fraction must be a number > 0.0 and < 1.0",
        ),
        (
            ["--data", "d", "--precision", "fp8"],
            "--precision: precision must be one of ['auto', 'fp32', 'bf16', 'fp16']",
        ),
        (["--data", "d", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "--data is required"),
    ],
)
def test_bad_values_name_option_value_and_allowed(argv, needle):
    with pytest.raises(TrainerError) as info:
        resolve_config(argv, {})
    assert needle in str(info.value)


def test_hyperparameter_errors_name_the_variable():
    with pytest.raises(
        TrainerError, match=r"MLTRAIN_HYPERPARAMETERS\['batch_size'\]: batch_size must be an integer"
    ):
        resolve_config(["--data", "d"], {contract.ENV_HYPERPARAMETERS: json.dumps({"batch_size": 1.5})})
    with pytest.raises(TrainerError, match="must be a JSON object"):
        resolve_config(["--data", "d"], {contract.ENV_HYPERPARAMETERS: "[1]"})


def test_params_are_flat_and_json_serializable():
    cfg = resolve_config(["--data", "d", "--feature-columns", "a, b"], {})
    assert cfg.feature_columns == ("a", "b")
    params = cfg.params()
    assert params["feature_columns"] == "a,b"
    json.dumps(params)


@pytest.mark.parametrize("key", sorted(contract.RESERVED_HYPERPARAMETERS))
def test_locations_and_run_naming_are_not_hyperparameters(key):
    # A hyperparameter "output" used to outrank MLTRAIN_RESULT_PATH: the result landed where the operator
    # never looks. Now the launcher's variables are the only source besides the flag.
    env = {
        contract.ENV_HYPERPARAMETERS: json.dumps({"lr": 0.01, key: "/elsewhere"}),
        contract.ENV_RESULT_PATH: "/env/result.json",
        contract.ENV_CHECKPOINT_DIR: "/ckpt",
    }
    with pytest.raises(TrainerError) as info:
        resolve_config(["--data", "d"], env)
    message = str(info.value)
    assert f"MLTRAIN_HYPERPARAMETERS: {key!r} is not a hyperparameter" in message
    assert contract.RESERVED_HYPERPARAMETERS[key] in message
    assert "--" + key.replace("_", "-") in message


def test_flags_still_set_the_locations_by_hand():
    env = {contract.ENV_RESULT_PATH: "/env/result.json", contract.ENV_CHECKPOINT_DIR: "/env/ckpt"}
    cfg = resolve_config(["--data", "d", "--output", "/mine.json", "--checkpoint-dir", "/my/ckpt"], env)
    assert (cfg.output, cfg.checkpoint_dir) == ("/mine.json", "/my/ckpt")
    assert resolve_config(["--data", "d"], env).output == "/env/result.json"


def test_unknown_key_lists_only_real_hyperparameters():
    with pytest.raises(TrainerError) as info:
        resolve_config(["--data", "d"], {contract.ENV_HYPERPARAMETERS: json.dumps({"learning_rate": 0.1})})
    allowed = str(info.value).split("allowed: ", 1)[1]
    assert "'lr'" in allowed
    assert not [key for key in contract.RESERVED_HYPERPARAMETERS if repr(key) in allowed]
