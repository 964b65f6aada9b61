"""MLflowHook against real MLflow servers on loopback (with and without basic auth)."""

from __future__ import annotations

import os
import time

import pytest

from airflow_provider_mltrain.hooks.mlflow import MLflowConnectionError, MLflowHook, connection_json


def test_get_conn_talks_to_the_server(mlflow_server, airflow_conn):
    airflow_conn("mlflow_plain", connection_json(mlflow_server.uri))
    client = MLflowHook("mlflow_plain").get_conn()

    experiment_id = client.create_experiment(f"hook-plain-{time.time_ns()}")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "val_accuracy", 0.93)

    assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.93}
    assert client.tracking_uri == mlflow_server.uri


def test_two_hooks_with_different_credentials_each_authenticate_as_themselves(
    mlflow_auth_server, airflow_conn
):
    users = mlflow_auth_server.users
    airflow_conn(
        "mlflow_alice", connection_json(mlflow_auth_server.uri, login="alice", password=users["alice"])
    )
    airflow_conn("mlflow_bob", connection_json(mlflow_auth_server.uri, login="bob", password=users["bob"]))
    environ_before = dict(os.environ)

    alice = MLflowHook("mlflow_alice").get_conn()
    bob = MLflowHook("mlflow_bob").get_conn()
    # Interleaved on purpose: a client that resolved credentials from shared state would mix them up.
    run_alice = alice.create_run(alice.create_experiment(f"alice-{time.time_ns()}"))
    run_bob = bob.create_run(bob.create_experiment(f"bob-{time.time_ns()}"))

    # The server gives the creator of an experiment MANAGE on it and everyone else READ (the
    # default permission): each may write to their own run and only read the other's.
    alice.log_metric(run_alice.info.run_id, "written_by_alice", 1.0)
    bob.log_metric(run_bob.info.run_id, "written_by_bob", 1.0)
    with pytest.raises(Exception, match="(?i)permission|403"):
        bob.log_metric(run_alice.info.run_id, "stolen", 1.0)
    with pytest.raises(Exception, match="(?i)permission|403"):
        alice.log_metric(run_bob.info.run_id, "stolen", 1.0)
    assert alice.get_run(run_bob.info.run_id).data.metrics == {"written_by_bob": 1.0}
    assert bob.get_run(run_alice.info.run_id).data.metrics == {"written_by_alice": 1.0}
    assert dict(os.environ) == environ_before
    assert not any(key.startswith("MLFLOW_TRACKING_") for key in os.environ)


def test_wrong_credentials_give_a_clear_error(mlflow_auth_server, airflow_conn):
    airflow_conn(
        "mlflow_wrong", connection_json(mlflow_auth_server.uri, login="alice", password="not-her-password")
    )
    hook = MLflowHook("mlflow_wrong")

    with pytest.raises(MLflowConnectionError, match=r"'mlflow_wrong'.*refused user 'alice' \(HTTP 401\)"):
        hook.ping()
    ok, message = hook.test_connection()
    assert ok is False
    assert "mlflow_wrong" in message and "401" in message
    assert "not-her-password" not in message


def test_right_credentials_pass_test_connection(mlflow_auth_server, airflow_conn):
    users = mlflow_auth_server.users
    airflow_conn("mlflow_ok", connection_json(mlflow_auth_server.uri, login="bob", password=users["bob"]))

    assert MLflowHook("mlflow_ok").test_connection() == (
        True,
        f"Connected to MLflow at {mlflow_auth_server.uri}",
    )


def test_unreachable_server_fails_fast_with_a_clear_error(airflow_conn):
    from tests.fixtures.mlflow_servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    airflow_conn("mlflow_down", connection_json(uri))
    hook = MLflowHook("mlflow_down")

    started = time.monotonic()
    ok, message = hook.test_connection()
    elapsed = time.monotonic() - started

    assert ok is False
    assert message.startswith(f"MLflow connection 'mlflow_down': server {uri} is unreachable")
    # Bounded: MLflow's default policy (7 retries, exponential backoff) would take minutes.
    assert elapsed < 30


def test_local_sqlite_store(tmp_path, airflow_conn):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    airflow_conn("mlflow_local", connection_json(uri))
    hook = MLflowHook("mlflow_local")

    assert hook.test_connection() == (True, f"Connected to MLflow at {uri}")
    client = hook.get_conn()
    experiment_id = client.create_experiment("local")
    assert client.get_experiment(experiment_id).name == "local"
    assert hook.child_environment() == {"MLFLOW_TRACKING_URI": uri}
