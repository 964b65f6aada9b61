"""MLflowRegisterOperator and the hook's registry methods against a real ``mlflow server``."""

from __future__ import annotations

import json
import textwrap

import pytest

from airflow_provider_mltrain.hooks.mlflow import (
    MLflowConnectionError,
    MLflowHook,
    MLflowRegistryError,
    connection_json,
)
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.mlflow_models import dag_run_xcoms, log_tiny_model, task_states, unique_name
from tests.fixtures.mlflow_servers import free_port


@pytest.fixture
def hook(mlflow_server, airflow_conn) -> MLflowHook:
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    return MLflowHook()


def test_register_is_idempotent_and_moving_the_alias_records_the_previous_champion(
    airflow_db, hook, mlflow_server, monkeypatch
):
    from airflow.sdk import DAG

    first = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.92})
    second = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.95})
    name = unique_name("digits")
    common = {"model_name": name, "aliases": ["champion"], "tags": {"team": "vision"}}
    with DAG("mltrain_register_idempotent", schedule=None) as dag:
        reg_first = MLflowRegisterOperator(
            task_id="register_first", run_id=first["run_id"], model_uri=first["model_uri"], **common
        )
        # A retry / re-run of the same training result.
        reg_again = MLflowRegisterOperator(
            task_id="register_again", run_id=first["run_id"], model_uri=first["model_uri"], **common
        )
        reg_second = MLflowRegisterOperator(
            task_id="register_second", run_id=second["run_id"], model_uri=second["model_uri"], **common
        )
        reg_first >> reg_again >> reg_second

    dag_run = run_dag(dag)

    assert dag_run.state == "success", task_states(dag_run)
    xcoms = dag_run_xcoms(dag_run)
    one, again, two = (
        xcoms[(t, "return_value")] for t in ("register_first", "register_again", "register_second")
    )
    assert one["version"] == "1" and one["created"] is True
    assert one["model_uri"] == f"models:/{name}/1"
    assert one["run_id"] == first["run_id"] and one["previous_champion"] is None
    assert again["version"] == "1" and again["created"] is False and again["previous_champion"] is None
    assert two["version"] == "2" and two["created"] is True
    assert two["run_id"] == second["run_id"] and two["previous_champion"] == "1"
    assert two["aliases"] == ["champion"]

    client = hook.get_conn()
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] in (["2", "1"], ["1", "2"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "2"
    assert champion.tags["mltrain.previous_version.champion"] == "1"
    assert champion.tags["team"] == "vision"
    assert (
        xcoms[("register_second", "mlflow_model_version_url")]
        == f"{mlflow_server.uri}/#/models/{name}/versions/2"
    )

    # The rollback is one call and lands on the recorded previous holder.
    assert hook.registry.rollback_alias(name, "champion") == "1"
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def test_every_form_of_the_same_result_resolves_to_one_version(hook, mlflow_server, monkeypatch):
    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    run_id, model_id = result["run_id"], result["model_uri"].removeprefix("models:/")
    name = unique_name("forms")

    forms = [
        hook.registry.resolve_model_source(run_id=run_id, model_uri=result["model_uri"]),
        hook.registry.resolve_model_source(run_id=None, model_uri=result["model_uri"]),
        hook.registry.resolve_model_source(run_id=None, model_uri=f"runs:/{run_id}/model"),
        hook.registry.resolve_model_source(run_id=run_id, model_uri=None, artifact_path="model"),
    ]

    assert {tuple(f) for f in forms} == {(f"models:/{model_id}", run_id, model_id)}
    versions = [
        hook.registry.register_model_version(name, source, await_ready_timeout=30) for source in forms
    ]
    assert [(v.version, created) for v, created in versions] == [
        ("1", True),
        ("1", False),
        ("1", False),
        ("1", False),
    ]
    assert versions[0][0].status == "READY"


def test_a_model_in_the_run_artifacts_mlflow2_layout_is_registered_from_there(
    hook, mlflow_server, monkeypatch, tmp_path
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mlflow.set_experiment("mltrain-operator-tests")
    model_dir = tmp_path / "exported"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="exported")

    source = hook.registry.resolve_model_source(
        run_id=run.info.run_id, model_uri=None, artifact_path="exported"
    )

    assert source.source == f"{run.info.artifact_uri}/exported"
    assert source.run_id == run.info.run_id and source.model_id is None


def test_run_not_found_is_a_clear_error(hook):
    with pytest.raises(MLflowRegistryError, match=r"MLflow run '0{32}' not found on http://127\.0\.0\.1"):
        hook.registry.resolve_model_source(run_id="0" * 32, model_uri=None)


def test_logged_model_not_found_is_a_clear_error(hook):
    with pytest.raises(MLflowRegistryError, match=r"logged model 'm-0{32}' .* not found"):
        hook.registry.resolve_model_source(run_id=None, model_uri="models:/m-" + "0" * 32)


def test_missing_artifact_path_lists_what_the_run_holds(hook, mlflow_server, monkeypatch, tmp_path):
    import mlflow

    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with mlflow.start_run(run_id=result["run_id"]):
        mlflow.log_artifact(str(notes))

    with pytest.raises(MLflowRegistryError) as err:
        hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=None, artifact_path="weights")

    message = str(err.value)
    assert f"run '{result['run_id']}' has no model at artifact path 'weights'" in message
    assert "['notes.txt']" in message and "['model']" in message


def test_run_id_and_model_uri_of_different_runs_are_rejected(hook, mlflow_server, monkeypatch):
    a = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    b = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    with pytest.raises(MLflowRegistryError, match="disagree"):
        hook.registry.resolve_model_source(run_id=a["run_id"], model_uri=b["model_uri"])


def test_legacy_stage_description_and_aliases(airflow_db, hook, mlflow_server, monkeypatch):
    from airflow.exceptions import AirflowProviderDeprecationWarning
    from airflow.sdk import DAG

    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    name = unique_name("staged")
    with (
        DAG("mltrain_register_stage", schedule=None) as dag,
        pytest.warns(AirflowProviderDeprecationWarning, match="deprecated since MLflow 2.9"),
    ):
        MLflowRegisterOperator(
            task_id="register",
            model_name=name,
            model_uri=result["model_uri"],
            aliases=["challenger", "nightly"],
            description="digits CNN",
            stage="staging",
        )

    dag_run = run_dag(dag)

    assert dag_run.state == "success", task_states(dag_run)
    version = hook.get_conn().get_model_version(name, "1")
    assert version.current_stage == "Staging"
    assert version.description == "digits CNN"
    assert sorted(version.aliases) == ["challenger", "nightly"]
    assert dag_run_xcoms(dag_run)[("register", "return_value")]["previous_versions"] == {
        "challenger": None,
        "nightly": None,
    }


def test_unreachable_server_fails_the_task_with_a_clear_error(airflow_db, airflow_conn, capfd):
    from airflow.sdk import DAG

    down = f"http://127.0.0.1:{free_port()}"
    airflow_conn("mlflow_down", connection_json(down))
    with DAG("mltrain_register_down", schedule=None) as dag:
        MLflowRegisterOperator(
            task_id="register", model_name="m", run_id="a" * 32, mlflow_conn_id="mlflow_down", retries=0
        )

    dag_run = run_dag(dag)

    assert dag_run.state == "failed"
    text = "".join(capfd.readouterr())
    assert f"server {down} is unreachable" in text
    with pytest.raises(MLflowConnectionError, match="unreachable"):
        MLflowHook("mlflow_down").ping(timeout=1, retries=0)


def test_registration_with_basic_auth_uses_the_connection_credentials_only(
    mlflow_auth_server, airflow_conn, monkeypatch
):
    users = mlflow_auth_server.users
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["alice"])
    result = log_tiny_model(
        monkeypatch, mlflow_auth_server.uri, {"val_accuracy": 0.9}, experiment="alice-exp"
    )
    # From here on only the Airflow connection carries credentials.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    airflow_conn(
        "mlflow_alice", connection_json(mlflow_auth_server.uri, login="alice", password=users["alice"])
    )
    hook = MLflowHook("mlflow_alice")
    name = unique_name("auth")

    source = hook.registry.resolve_model_source(
        run_id=result["run_id"], model_uri=None
    )  # lists artifacts over REST
    version, created = hook.registry.register_model_version(name, source, await_ready_timeout=30)
    previous = hook.registry.move_alias(name, "champion", version.version)

    assert (version.version, created, previous) == ("1", True, None)
    assert source.source == result["model_uri"]
    assert hook.registry.get_champion(name)["metrics"] == {"val_accuracy": 0.9}
    with pytest.raises(
        MLflowRegistryError, match=r"its artifacts are \(none\) and its logged models are \['model'\]"
    ):
        hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=None, artifact_path="weights")


# -- loading what was registered with MLflow's own client (issue 15 item 0) ------------------------------


def _register_and_load(dag_id: str, tracking_uri: str, monkeypatch) -> None:
    """Train-like logging, registration through the operator, then MLflow's client loads the champion."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    from airflow.sdk import DAG

    result = log_tiny_model(monkeypatch, tracking_uri, {"val_accuracy": 0.9})
    name = unique_name("loadable")
    with DAG(dag_id, schedule=None) as dag:
        # runs:/<run>/model is what the bundled trainer reports (gpu_trainer/tracking.py).
        MLflowRegisterOperator(
            task_id="register",
            model_name=name,
            run_id=result["run_id"],
            model_uri=f"runs:/{result['run_id']}/model",
            aliases=["champion"],
        )

    dag_run = run_dag(dag)

    assert dag_run.state == "success", task_states(dag_run)
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version(name, "1")
    logged = client.get_logged_model(result["model_uri"].removeprefix("models:/"))
    assert version.run_id == result["run_id"]
    # The version is made from the logged model (its URI on a server, its files on a local store) and the
    # logged model lists the version, as after mlflow.register_model.
    assert version.source == (
        result["model_uri"] if tracking_uri.startswith("http") else logged.artifact_location
    )
    linked = json.loads(logged.tags["mlflow.modelVersions"])
    assert [(e["name"], str(e["version"])) for e in linked] == [(name, "1")]
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    mlflow.set_tracking_uri(tracking_uri)
    try:
        for uri in (f"models:/{name}@champion", f"models:/{name}/1"):
            loaded = mlflow.pyfunc.load_model(uri)
            pd.testing.assert_frame_equal(loaded.predict(frame), frame)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_champion_loads_with_mlflows_client_from_a_local_sqlite_store(
    airflow_db, airflow_conn, tmp_path, monkeypatch
):
    # The embedded default (make demo): a SQLite store whose artifacts live under ./mlruns.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    airflow_conn("mlflow_default", connection_json(uri))
    _register_and_load("mltrain_register_loadable_local", uri, monkeypatch)


def test_the_champion_loads_with_mlflows_client_from_a_tracking_server(
    airflow_db, hook, mlflow_server, monkeypatch
):
    _register_and_load("mltrain_register_loadable_server", mlflow_server.uri, monkeypatch)


# -- concurrency (issue 16) --------------------------------------------------------------------------


def _race(*jobs):
    """Run the jobs in threads released at the same instant; their results in order (errors re-raised)."""
    import threading

    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i: int, job) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = job()
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _promote(name: str, result: dict) -> tuple[str, bool, str | None]:
    """What MLflowRegisterOperator.execute does, on a hook of its own (one per task, as in Airflow)."""
    hook = MLflowHook()
    source = hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=result["model_uri"])
    version, created = hook.registry.register_model_version(name, source, await_ready_timeout=30)
    return str(version.version), created, hook.registry.move_alias(name, "champion", version.version)


@pytest.mark.parametrize("attempt", range(4))
def test_concurrent_promotions_of_two_runs_keep_a_correct_rollback_chain(
    hook, mlflow_server, monkeypatch, attempt
):
    first = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.91})
    second = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.92})
    name = unique_name("race")

    outcomes = _race(lambda: _promote(name, first), lambda: _promote(name, second))

    client = hook.get_conn()
    tag = "mltrain.previous_version.champion"
    holder = client.get_model_version_by_alias(name, "champion")
    other = next(v for v, _, _ in outcomes if v != holder.version)
    # The alias moved twice, the later move recorded the earlier holder, and each task reported the
    # previous holder it really replaced: no promotion is lost.
    assert sorted(v for v, _, _ in outcomes) == ["1", "2"]
    assert holder.tags.get(tag) == other
    assert tag not in client.get_model_version(name, other).tags
    reported = {v: previous for v, _, previous in outcomes}
    assert reported == {other: None, holder.version: other}
    assert hook.registry.rollback_alias(name, "champion") == other
    assert (
        client.search_registered_models(f"name = '{hook.registry.alias_lock_name(name, 'champion')}'") == []
    )


@pytest.mark.parametrize("attempt", range(4))
def test_the_same_run_registered_twice_concurrently_yields_one_version(
    hook, mlflow_server, monkeypatch, attempt
):
    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    name = unique_name("race-same")
    MLflowHook().registry.ensure_registered_model(name)

    outcomes = _race(lambda: _promote(name, result), lambda: _promote(name, result))

    versions = hook.get_conn().search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"]
    logged = hook.get_conn().get_logged_model(result["model_uri"].removeprefix("models:/"))
    assert {str(e["version"]) for e in json.loads(logged.tags["mlflow.modelVersions"])} == {"1"}
    assert [v for v, _, _ in outcomes] == ["1", "1"]
    assert all(previous is None for _, _, previous in outcomes)
    assert hook.get_conn().get_model_version_by_alias(name, "champion").version == "1"


# -- model names (issue 16) ----------------------------------------------------------------------------


def test_a_name_with_a_quote_is_found_again_on_retry(hook, mlflow_server, monkeypatch):
    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    name = unique_name("o'brien's model")
    source = hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=result["model_uri"])

    first, created_first = hook.registry.register_model_version(name, source, await_ready_timeout=30)
    again, created_again = hook.registry.register_model_version(name, source, await_ready_timeout=30)

    assert (first.version, created_first, again.version, created_again) == ("1", True, "1", False)
    assert [v.version for v in hook.get_conn().search_model_versions(f'name = "{name}"')] == ["1"]


# -- secrets in the connection's URL, and no error lines that are not errors (issue 16) -------------------

# A trainer that uses MLflow's own client, so MLflow's "View run ... at <tracking URI>" line is printed.
URL_CREDENTIALS_TRAINER = textwrap.dedent(
    """
    import os
    import mlflow, mlflow.pyfunc
    from gpu_trainer import contract

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    with mlflow.start_run(run_name=os.environ.get("MLFLOW_RUN_NAME")) as run:
        mlflow.log_metric("val_accuracy", 0.9)
        mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=[])
    print("tracking URI seen by the trainer:", mlflow.get_tracking_uri(), flush=True)
    contract.write_result(
        contract.result_path(),
        contract.make_result(
            run_id=run.info.run_id,
            model_uri=f"runs:/{run.info.run_id}/model",
            metrics={"val_accuracy": 0.9},
            params={},
            resumed_from_epoch=None,
        ),
    )
    """
)


def test_credentials_in_the_connection_url_never_leave_the_hook(
    airflow_db, airflow_conn, mlflow_auth_server, tmp_path, monkeypatch, caplog, capfd
):
    import logging
    from urllib.parse import urlsplit

    from airflow.sdk import DAG
    from kubernetes.client import ApiClient

    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator, _OfflineKubernetesHook
    from tests.fixtures.gpu_operator import make_context

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    password = mlflow_auth_server.users["alice"]
    server = urlsplit(mlflow_auth_server.uri)
    url_with_password = f"http://alice:{password}@{server.netloc}"
    airflow_conn("mlflow_url_creds", connection_json(url_with_password))
    script = tmp_path / "trainer.py"
    script.write_text(URL_CREDENTIALS_TRAINER)
    name = unique_name("url-creds")
    common = {"cmds": ["python", str(script)], "mlflow_conn_id": "mlflow_url_creds"}
    with DAG("mltrain_url_credentials", schedule=None) as dag:
        train = GPUTrainingPodOperator(
            task_id="train", launcher="local", experiment_name="url-creds", retries=0, **common
        )
        MLflowRegisterOperator(
            task_id="register",
            model_name=name,
            run_id=train.output["run_id"],
            model_uri=train.output["model_uri"],
            aliases=["champion"],
            mlflow_conn_id="mlflow_url_creds",
            retries=0,
        )

    dag_run = run_dag(dag)

    states = task_states(dag_run)
    output = "".join(capfd.readouterr())
    assert dag_run.state == "success", (states, output[-3000:])
    xcoms = dag_run_xcoms(dag_run)
    hook = MLflowHook("mlflow_url_creds")
    # The trainer and the registry authenticated as alice with the URL's credentials.
    assert hook.host_creds().username == "alice"
    assert hook.get_conn().get_model_version(name, "1").run_id == xcoms[("train", "run_id")]
    assert f"tracking URI seen by the trainer: {mlflow_auth_server.uri}" in output
    assert "View run" in output  # MLflow's own line went through the task log
    assert xcoms[("train", "mlflow_run_url")].startswith(f"{mlflow_auth_server.uri}/#/experiments/")
    assert xcoms[("register", "mlflow_model_version_url")].startswith(mlflow_auth_server.uri)
    # The pod a Kubernetes launch would create, rendered offline.
    k8s_op = GPUTrainingPodOperator(
        task_id="train_k8s", image="trainer:1", mlflow_secret="mlflow-creds", **common
    )
    vars(k8s_op)["hook"] = _OfflineKubernetesHook()
    pod = json.dumps(
        ApiClient().sanitize_for_serialization(k8s_op.build_pod_request_obj(make_context(), dry_run=True))
    )
    assert mlflow_auth_server.uri in pod
    ok, message = hook.test_connection()
    assert ok and message == f"Connected to MLflow at {mlflow_auth_server.uri}"

    everything_visible = "\n".join(
        [output, caplog.text, repr(xcoms), pod, message, repr(hook), json.dumps(states)]
    )
    assert password not in everything_visible
    assert "alice:" not in everything_visible


def test_failed_tasks_log_no_error_about_the_link_xcom(
    airflow_db, airflow_conn, tmp_path, monkeypatch, capfd
):
    from airflow.sdk import DAG

    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "ckpt"))
    airflow_conn("mlflow_down", connection_json(f"http://127.0.0.1:{free_port()}"))
    with DAG("mltrain_failed_links", schedule=None) as dag:
        GPUTrainingPodOperator(
            task_id="train",
            launcher="local",
            cmds=["python", "-c", "raise SystemExit(3)"],
            mlflow_conn_id="mlflow_down",
            retries=0,
        )
        MLflowRegisterOperator(
            task_id="register", model_name="m", run_id="a" * 32, mlflow_conn_id="mlflow_down", retries=0
        )

    dag_run = run_dag(dag)

    assert task_states(dag_run) == {"train": "failed", "register": "failed"}
    output = "".join(capfd.readouterr())
    assert "exited with code 3" in output and "is unreachable" in output  # the real errors are there
    error_lines = [line for line in output.splitlines() if "error" in line.lower()[:40] or "ERROR" in line]
    assert not [line for line in error_lines if "xcom" in line.lower()], error_lines


def test_a_held_alias_lock_times_out_with_its_name_and_a_stale_one_is_broken(
    hook, mlflow_server, monkeypatch
):
    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    name = unique_name("locked")
    source = hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=result["model_uri"])
    version, _ = hook.registry.register_model_version(name, source, await_ready_timeout=30)
    lock = hook.registry.alias_lock_name(name, "champion")
    hook.get_conn().create_registered_model(lock)  # a lock another task holds right now

    waiting = MLflowHook()
    waiting.registry.ALIAS_LOCK_TIMEOUT_S = 0.5
    with pytest.raises(MLflowRegistryError, match=rf"stayed locked for 0.5 s by registered model '{lock}'"):
        waiting.registry.move_alias(name, "champion", version.version)
    assert hook.registry.get_version_by_alias(name, "champion") is None

    # The holder died: once the lock is older than ALIAS_LOCK_STALE_S it is broken and the move goes on.
    breaking = MLflowHook()
    breaking.registry.ALIAS_LOCK_STALE_S = 0.0
    assert breaking.registry.move_alias(name, "champion", version.version) is None
    assert hook.registry.get_version_by_alias(name, "champion").version == version.version
    assert hook.get_conn().search_registered_models(f"name = '{lock}'") == []
