"""Bad inputs found by the adversarial pass (issue 16): each refused with the parameter, the value and
what is allowed, at DAG parse time where the value is known then, else when the pod is built."""

from __future__ import annotations

import json

import pytest

from airflow_provider_mltrain.operators import _pod_spec as spec
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import IMAGE, build, env_of


def op_(**kwargs) -> GPUTrainingPodOperator:
    return GPUTrainingPodOperator(task_id="train", image=IMAGE, namespace="ml", **kwargs)


def test_oversized_hyperparameters_refused_at_parse_with_the_limit():
    big = {"lr": 0.1, "vocabulary": ["token"] * 20_000}  # ~180 KB as JSON: execve would fail with E2BIG
    with pytest.raises(ValueError) as info:
        op_(hyperparameters=big)
    message = str(info.value)
    assert "invalid hyperparameters" in message and "over the 65536-byte limit" in message
    assert "largest keys: ['vocabulary'" in message
    assert "token" not in message  # the value itself does not flood the log
    with pytest.raises(ValueError, match="65536-byte limit"):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, hyperparameters=big)
    # Just under the limit is fine.
    fits = {"note": "x" * (spec.MAX_HYPERPARAMETERS_BYTES - 100)}
    assert op_(hyperparameters=fits, cmds=["python", "my_trainer.py"]).hyperparameters == fits


def test_oversized_hyperparameters_refused_after_rendering(k8s_hook):
    op = op_(hyperparameters="{{ params.hp }}")
    op.hyperparameters = json.dumps({"data": "x" * 70_000})  # what rendering produced
    with pytest.raises(ValueError, match="over the 65536-byte limit"):
        build(op)


@pytest.mark.parametrize("name", ["gpus", "nproc_per_node", "launcher", "gpu_type", "shm_size"])
def test_jinja_in_an_argument_that_is_not_templated_is_refused_at_parse(name):
    with pytest.raises(ValueError) as info:
        op_(**{name: "{{ params.value }}"})
    message = str(info.value)
    assert message.startswith(f"GPUTrainingPodOperator: invalid {name}='{{{{ params.value }}}}'")
    assert "not a template field" in message and f".expand({name}=[...])" in message
    with pytest.raises(ValueError, match="not a template field"):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, **{name: "{{ params.value }}"})


def test_jinja_in_template_fields_is_still_accepted():
    op = op_(cpu="{{ params.cpu }}", memory="{{ params.mem }}", mlflow_secret="{{ params.secret }}")
    assert (op.cpu, op.mlflow_secret) == ("{{ params.cpu }}", "{{ params.secret }}")


@pytest.mark.parametrize("memory", ["1e400", "1e99999999999", "9.3e18", "8Ei", "10E"])
def test_quantities_kubernetes_cannot_store_are_refused(memory):
    with pytest.raises(ValueError, match=rf"invalid memory='{memory}'; .*no larger than 2\^63-1"):
        op_(memory=memory)


@pytest.mark.parametrize("memory", ["7Ei", "1e18", "512Gi", "1E3", "2.5e+9"])
def test_large_but_storable_quantities_are_accepted(memory):
    assert op_(memory=memory).memory == memory


@pytest.mark.parametrize("secret", ["Bad_Name!", "", "UPPER", "-lead", "a" * 254, 42])
def test_mlflow_secret_must_be_a_kubernetes_secret_name(secret):
    with pytest.raises(ValueError) as info:
        op_(mlflow_secret=secret)
    message = str(info.value)
    assert f"invalid mlflow_secret={secret!r}" in message
    assert "name of a Kubernetes Secret: a DNS subdomain" in message


def test_mlflow_secret_accepted_and_checked_again_after_rendering(k8s_hook):
    assert op_(mlflow_secret="mlflow.credentials-1").mlflow_secret == "mlflow.credentials-1"
    op = op_(mlflow_secret="{{ params.secret }}")
    op.mlflow_secret = "Team_Secret"  # what rendering produced
    with pytest.raises(ValueError, match="invalid mlflow_secret='Team_Secret'"):
        build(op)


def test_unknown_trainer_hyperparameter_caught_at_parse_for_the_bundled_trainer():
    with pytest.raises(ValueError) as info:
        op_(hyperparameters={"lrr": 0.01, "epochs": 3})
    message = str(info.value)
    assert "unknown key(s) ['lrr'] for the bundled trainer (python -m gpu_trainer.train)" in message
    assert "did you mean 'lrr' -> 'lr'?" in message
    assert "'batch_size'" in message and "'output'" not in message.split("allowed:")[1]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lrr'\]"):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, hyperparameters={"lrr": 0.01})
    # Same command spelled with python3 / torchrun-style prefixes is still the bundled trainer.
    with pytest.raises(ValueError, match="unknown key"):
        op_(cmds=["python3", "-m", "gpu_trainer.train"], hyperparameters={"lrr": 0.01})


def test_other_trainers_keep_their_own_keys(k8s_hook):
    op = op_(cmds=["python", "my_trainer.py"], hyperparameters={"lrr": 0.01})
    assert json.loads(env_of(build(op))[contract.ENV_HYPERPARAMETERS]) == {"lrr": 0.01}


def test_unknown_trainer_hyperparameter_caught_after_rendering(k8s_hook):
    op = op_(hyperparameters="{{ params.hp }}")
    op.hyperparameters = '{"epochs": 2, "batchsize": 8}'
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batchsize'\].*'batchsize' -> 'batch_size'"):
        build(op)


def test_bundled_trainer_key_check_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from airflow_provider_mltrain.operators import _pod_spec as spec\n"
        "spec.check_trainer_hyperparameters({'lr': 0.1}, None)\n"
        "heavy = [m for m in ('torch', 'numpy', 'pandas', 'mlflow') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("aliases", [123, 1.5, {"champion": 1}, {"champion"}])
def test_register_aliases_of_the_wrong_type_are_a_clear_value_error(aliases):
    with pytest.raises(ValueError) as info:
        MLflowRegisterOperator(task_id="register", model_name="m", run_id="abc", aliases=aliases)
    assert f"aliases={aliases!r} is invalid: expected an alias string" in str(info.value)
