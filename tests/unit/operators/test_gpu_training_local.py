"""GPUTrainingPodOperator on the local launcher: timeout, on_kill, retries resuming, and credentials.

The credentials test runs against the real basic-auth MLflow server (``mlflow_auth_server``): the local
trainer logs a run with the connection's credentials, while the Kubernetes pod spec, the rendered template
fields, XCom and the task log never contain them.
"""

from __future__ import annotations

import datetime
import json
import logging
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.exceptions import AirflowException
from kubernetes.client import ApiClient

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import FakeCluster, make_context, pushed, status_pod
from tests.fixtures.processes import assert_all_gone, wait_for
from tests.fixtures.trainer_scripts import FAKE_TRAINER

SLEEPER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(f"{child.pid}\\n")
    time.sleep(600)
    """
)

MLFLOW_TRAINER = textwrap.dedent(
    """
    import os, uuid
    import requests
    from gpu_trainer import contract

    # Credentials come from the child's environment only (MLflowHook.child_environment()). Plain REST
    # calls rather than the mlflow client: the same authentication, without seconds of import time.
    uri = os.environ["MLFLOW_TRACKING_URI"]
    auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"])
    name = f"{os.environ['MLFLOW_EXPERIMENT_NAME']}-{uuid.uuid4().hex[:8]}"
    exp = requests.post(f"{uri}/api/2.0/mlflow/experiments/create", json={"name": name}, auth=auth, timeout=30)
    exp.raise_for_status()
    run = requests.post(
        f"{uri}/api/2.0/mlflow/runs/create",
        json={"experiment_id": exp.json()["experiment_id"], "run_name": os.environ["MLFLOW_RUN_NAME"]},
        auth=auth,
        timeout=30,
    )
    run.raise_for_status()
    run_id = run.json()["run"]["info"]["run_id"]
    print("logged run", run_id, flush=True)
    contract.write_result(
        contract.result_path(),
        contract.make_result(
            run_id=run_id,
            model_uri=f"runs:/{run_id}/model",
            metrics={"val_accuracy": 0.9},
            params={},
            resumed_from_epoch=None,
        ),
    )
    """
)


@pytest.fixture
def local_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ckpt"
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(root))
    return root


def local_op(cmds: list[str], **kwargs: Any) -> GPUTrainingPodOperator:
    return GPUTrainingPodOperator(task_id="train", cmds=cmds, launcher="local", **kwargs)


def test_retry_resumes_from_the_same_checkpoint_dir(tmp_path, local_root):
    script = tmp_path / "trainer.py"
    script.write_text(FAKE_TRAINER)
    first = local_op(["python", str(script)], hyperparameters={"lr": 0.5}).execute(make_context(try_number=1))
    second = local_op(["python", str(script)], hyperparameters={"lr": 0.5}).execute(
        make_context(try_number=2)
    )
    assert first["resumed_from_epoch"] is None
    assert second["resumed_from_epoch"] == 1  # the retry found the first try's checkpoint
    assert first["params"]["ckpt"] == second["params"]["ckpt"]
    assert Path(first["params"]["ckpt"]).is_relative_to(local_root)


def test_malformed_result_fails_clearly(tmp_path, local_root):
    script = tmp_path / "bad.py"
    script.write_text(
        "import json, os\nopen(os.environ['MLTRAIN_RESULT_PATH'], 'w').write(json.dumps({'metrics': 1}))\n"
    )
    with pytest.raises(AirflowException, match=r"missing keys.*schema_version"):
        local_op(["python", str(script)]).execute(make_context())
    script.write_text("print('forgot to write a result')\n")
    with pytest.raises(AirflowException, match=r"wrote no result.*expected a JSON object"):
        local_op(["python", str(script)]).execute(make_context())


def test_cuda_oom_is_triaged_locally(tmp_path, local_root):
    script = tmp_path / "oom.py"
    script.write_text(
        "import sys\nprint('torch.OutOfMemoryError: CUDA out of memory.', flush=True)\nsys.exit(1)\n"
    )
    with pytest.raises(AirflowException, match=r"(?s)out of GPU memory.*exited with code 1"):
        local_op(["python", str(script)]).execute(make_context())


def test_execution_timeout_kills_the_process_group(tmp_path, local_root):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pids = tmp_path / "pids"
    op = local_op(
        ["python", str(script), str(pids)],
        execution_timeout=datetime.timedelta(seconds=2),
        local_kill_grace_seconds=0.5,
    )
    started = time.monotonic()
    with pytest.raises(AirflowException, match="execution_timeout"):
        op.execute(make_context())
    assert time.monotonic() - started < 15
    grandchild = int(wait_for(pids))
    assert_all_gone([grandchild], "the trainer's grandchild survived")


def test_on_kill_stops_the_trainer(tmp_path, local_root):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    pids = tmp_path / "pids"
    op = local_op(["python", str(script), str(pids)], local_kill_grace_seconds=0.5)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            op.execute(make_context())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    grandchild = int(wait_for(pids))
    op.on_kill()
    thread.join(15)
    assert not thread.is_alive()
    assert errors and "exited with code" in str(errors[0])
    assert_all_gone([grandchild], "the trainer's grandchild survived")


def test_credentials_reach_only_the_child(
    mlflow_auth_server, airflow_conn, tmp_path, local_root, mocker, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    user, password = next(iter(mlflow_auth_server.users.items()))
    airflow_conn("mlflow_auth", connection_json(mlflow_auth_server.uri, login=user, password=password))
    script = tmp_path / "mlflow_trainer.py"
    script.write_text(MLFLOW_TRAINER)
    common = {
        "cmds": ["python", str(script)],
        "mlflow_conn_id": "mlflow_auth",
        "experiment_name": "cred-test",
        "hyperparameters": {"lr": 0.1},
    }

    # Local: the trainer authenticates with the connection's credentials and logs a real run.
    op = GPUTrainingPodOperator(task_id="train", launcher="local", **common)
    context = make_context()
    result = op.execute(context)
    xcoms = pushed(context)
    assert xcoms["run_id"] == result["run_id"]
    # The extra link was built from the real server (experiment id read with the scoped client).
    assert xcoms["mlflow_run_url"].startswith(f"{mlflow_auth_server.uri}/#/experiments/")
    assert xcoms["mlflow_run_url"].endswith(f"/runs/{result['run_id']}")

    # Kubernetes: the pod gets a Secret reference, never the value.
    k8s_op = GPUTrainingPodOperator(
        task_id="train", image="trainer:1", namespace="ml", mlflow_secret="mlflow-creds", **common
    )
    cluster = FakeCluster(k8s_op, mocker, final=status_pod(), xcom=json.dumps(result))
    k8s_context = make_context()
    k8s_op.execute(k8s_context)
    pod_json = json.dumps(ApiClient().sanitize_for_serialization(cluster.created[0]))
    env = {e.name: e for e in cluster.created[0].spec.containers[0].env}
    assert env["MLFLOW_TRACKING_PASSWORD"].value is None
    assert env["MLFLOW_TRACKING_PASSWORD"].value_from.secret_key_ref.name == "mlflow-creds"
    assert env[contract.ENV_TRACKING_URI].value == mlflow_auth_server.uri

    rendered = json.dumps(
        {field: getattr(k8s_op, field, None) for field in k8s_op.template_fields}, default=str
    ) + json.dumps({field: getattr(op, field, None) for field in op.template_fields}, default=str)
    everything_visible = "\n".join(
        [
            pod_json,
            rendered,
            json.dumps(pushed(context), default=str),
            json.dumps(pushed(k8s_context), default=str),
            json.dumps(result),
            caplog.text,
            *capfd.readouterr(),
        ]
    )
    assert password not in everything_visible
    assert "Basic " not in pod_json


def test_the_log_says_what_the_local_launcher_does_not_building_pod(tmp_path, local_root, caplog, capfd):
    caplog.set_level(logging.INFO)
    script = tmp_path / "trainer.py"
    script.write_text(FAKE_TRAINER)

    local_op(["python", str(script)], hyperparameters={"lr": 0.5}).execute(make_context())

    log = caplog.text + "".join(capfd.readouterr())
    assert "Local launcher: checking the pod spec the Kubernetes launcher would submit" in log
    assert "Building pod" not in log
