"""MLflowRegisterOperator and the hook's registry methods against a real ``mlflow server``."""

from __future__ import annotations

import pytest

from airflow_provider_mltrain.hooks.mlflow import (
    MLflowConnectionError,
    MLflowHook,
    MLflowRegistryError,
    connection_json,
)
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.mlflow_servers import free_port
from tests.integration.operators.mlflow_models import dag_run_xcoms, log_tiny_model, task_states, unique_name


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
    assert hook.rollback_alias(name, "champion") == "1"
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def test_every_form_of_the_same_result_resolves_to_one_version(hook, mlflow_server, monkeypatch):
    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    run_id, model_id = result["run_id"], result["model_uri"].removeprefix("models:/")
    name = unique_name("forms")

    forms = [
        hook.resolve_model_source(run_id=run_id, model_uri=result["model_uri"]),
        hook.resolve_model_source(run_id=None, model_uri=result["model_uri"]),
        hook.resolve_model_source(run_id=None, model_uri=f"runs:/{run_id}/model"),
        hook.resolve_model_source(run_id=run_id, model_uri=None, artifact_path="model"),
    ]

    assert {tuple(f) for f in forms} == {(f"models:/{model_id}", run_id, model_id)}
    versions = [hook.register_model_version(name, source, await_ready_timeout=30) for source in forms]
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

    source = hook.resolve_model_source(run_id=run.info.run_id, model_uri=None, artifact_path="exported")

    assert source.source == f"{run.info.artifact_uri}/exported"
    assert source.run_id == run.info.run_id and source.model_id is None


def test_run_not_found_is_a_clear_error(hook):
    with pytest.raises(MLflowRegistryError, match=r"MLflow run '0{32}' not found on http://127\.0\.0\.1"):
        hook.resolve_model_source(run_id="0" * 32, model_uri=None)


def test_logged_model_not_found_is_a_clear_error(hook):
    with pytest.raises(MLflowRegistryError, match=r"logged model 'm-0{32}' .* not found"):
        hook.resolve_model_source(run_id=None, model_uri="models:/m-" + "0" * 32)


def test_missing_artifact_path_lists_what_the_run_holds(hook, mlflow_server, monkeypatch, tmp_path):
    import mlflow

    result = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with mlflow.start_run(run_id=result["run_id"]):
        mlflow.log_artifact(str(notes))

    with pytest.raises(MLflowRegistryError) as err:
        hook.resolve_model_source(run_id=result["run_id"], model_uri=None, artifact_path="weights")

    message = str(err.value)
    assert f"run '{result['run_id']}' has no model at artifact path 'weights'" in message
    assert "['notes.txt']" in message and "['model']" in message


def test_run_id_and_model_uri_of_different_runs_are_rejected(hook, mlflow_server, monkeypatch):
    a = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    b = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.9})
    with pytest.raises(MLflowRegistryError, match="disagree"):
        hook.resolve_model_source(run_id=a["run_id"], model_uri=b["model_uri"])


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

    source = hook.resolve_model_source(run_id=result["run_id"], model_uri=None)  # lists artifacts over REST
    version, created = hook.register_model_version(name, source, await_ready_timeout=30)
    previous = hook.move_alias(name, "champion", version.version)

    assert (version.version, created, previous) == ("1", True, None)
    assert source.source == result["model_uri"]
    assert hook.get_champion(name)["metrics"] == {"val_accuracy": 0.9}
    with pytest.raises(
        MLflowRegistryError, match=r"its artifacts are \(none\) and its logged models are \['model'\]"
    ):
        hook.resolve_model_source(run_id=result["run_id"], model_uri=None, artifact_path="weights")
