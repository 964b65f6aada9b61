"""MLflowHook: connection parsing, errors and secret masking (no server needed)."""

from __future__ import annotations

import json

import pytest

from airflow_provider_mltrain.hooks.mlflow import MLflowConnectionError, MLflowHook, connection_json


def test_missing_connection_names_the_id_and_the_fix():
    with pytest.raises(
        MLflowConnectionError, match=r"'no_such_conn' is not defined.*AIRFLOW_CONN_NO_SUCH_CONN"
    ):
        MLflowHook("no_such_conn").tracking_uri


def test_missing_connection_explains_airflow_3_database_connections_outside_tasks():
    """A connection stored in the database is invisible to code outside a task on Airflow 3: say so."""
    with pytest.raises(MLflowConnectionError) as caught:
        MLflowHook("in_the_db_only").tracking_uri
    message = str(caught.value)
    assert "Airflow 3 reads database connections only inside a running task" in message
    assert "`airflow connections test in_the_db_only`" in message
    assert "export AIRFLOW_CONN_IN_THE_DB_ONLY" in message


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", r"'bad' has no host: set it to the tracking URI"),
        (
            "ftp://mlflow:21",
            r"host 'ftp://mlflow:21' has unsupported scheme 'ftp'; allowed: http, https, sqlite",
        ),
        ("http://mlflow:notaport", r"host 'http://mlflow:notaport' has a malformed port"),
        ("http://", r"host 'http://' has no host name"),
    ],
)
def test_malformed_uri_is_a_clear_error(airflow_conn, host, expected):
    airflow_conn("bad", json.dumps({"conn_type": "mlflow", "host": host}))
    with pytest.raises(MLflowConnectionError, match=expected):
        MLflowHook("bad").tracking_uri


def test_uri_form_connection(airflow_conn):
    airflow_conn("uri_form", "mlflow://airflow:pw@mlflow.example.com:5000")
    hook = MLflowHook("uri_form")
    assert hook.tracking_uri == "http://mlflow.example.com:5000"
    assert hook.ui_url == "http://mlflow.example.com:5000"
    assert hook.host_creds().username == "airflow"


def test_extras_map_onto_mlflow_host_creds(airflow_conn):
    airflow_conn(
        "extras",
        connection_json(
            "https://mlflow.example.com",
            token="tok-123",
            registry_uri="https://registry.example.com",
            ca_bundle="/etc/ca.pem",
            ui_url="https://ui.example.com/",
        ),
    )
    hook = MLflowHook("extras")
    creds = hook.host_creds()

    assert (creds.host, creds.token, creds.server_cert_path) == (
        "https://mlflow.example.com",
        "tok-123",
        "/etc/ca.pem",
    )
    assert creds.username is None and creds.ignore_tls_verification is False
    assert hook.registry_uri == "https://registry.example.com"
    assert hook.run_url("7", "abc") == "https://ui.example.com/#/experiments/7/runs/abc"
    assert (
        hook.model_version_url("digits clf", 3) == "https://ui.example.com/#/models/digits%20clf/versions/3"
    )
    assert hook.child_environment() == {
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com",
        "MLFLOW_REGISTRY_URI": "https://registry.example.com",
        "MLFLOW_TRACKING_TOKEN": "tok-123",
        "MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem",
    }


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        (
            connection_json("https://m", insecure=True, ca_bundle="/ca.pem"),
            "'insecure' and 'ca_bundle' exclude",
        ),
        (connection_json("https://m", login="u", password="p", token="t"), "login/password or the 'token'"),
        (
            connection_json("https://m", registry_uri="gopher://r"),
            "registry_uri 'gopher://r' has unsupported",
        ),
    ],
)
def test_conflicting_extras_are_rejected(airflow_conn, conn, expected):
    airflow_conn("conflict", conn)
    with pytest.raises(MLflowConnectionError, match=expected):
        MLflowHook("conflict").tracking_uri


def test_password_and_token_are_registered_with_the_secrets_masker(airflow_conn):
    from airflow.sdk.log import mask_logs

    airflow_conn("masked_pw", connection_json("https://m.example.com", login="u", password="pw-Secret-9137"))
    airflow_conn("masked_tok", connection_json("https://m.example.com", token="tok-Secret-4412"))
    MLflowHook("masked_pw").tracking_uri
    MLflowHook("masked_tok").tracking_uri

    # mask_logs is the structlog processor every task log line passes through (task process or supervisor).
    event = mask_logs(
        None,
        "info",
        {"event": "connecting with pw-Secret-9137 and tok-Secret-4412", "auth": "tok-Secret-4412"},
    )
    assert event == {"event": "connecting with *** and ***", "auth": "***"}


def test_hook_repr_has_no_credentials(airflow_conn):
    airflow_conn("repr", connection_json("https://m", login="u", password="hunter2"))
    hook = MLflowHook("repr")
    hook.tracking_uri
    assert "hunter2" not in repr(hook)


def test_credentials_in_the_host_url_become_login_and_password_and_are_masked(airflow_conn):
    from airflow.sdk.log import mask_logs

    # "p@ss:w/rd" percent-encoded, as a URL must carry it.
    airflow_conn(
        "url_creds", connection_json("https://alice:p%40ss%3Aw%2Frd-7731@mlflow.example.com:5000/api")
    )
    hook = MLflowHook("url_creds")

    assert hook.tracking_uri == "https://mlflow.example.com:5000/api"
    assert (hook.host_creds().username, hook.host_creds().password) == ("alice", "p@ss:w/rd-7731")
    assert hook.ui_url == "https://mlflow.example.com:5000/api"
    assert hook.run_url("1", "r") == "https://mlflow.example.com:5000/api/#/experiments/1/runs/r"
    assert hook.child_environment()["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com:5000/api"
    assert hook.child_environment()["MLFLOW_TRACKING_PASSWORD"] == "p@ss:w/rd-7731"
    event = mask_logs(None, "info", {"event": "pw p@ss:w/rd-7731 raw p%40ss%3Aw%2Frd-7731"})
    assert event == {"event": "pw *** raw ***"}


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        (
            connection_json("http://bob:url-Secret-5521@m:5000", login="bob", password="other"),
            r"host 'http://m:5000' carries credentials \(user:password@\) and login/password are set too",
        ),
        (
            connection_json("http://m:5000", registry_uri="http://bob:url-Secret-5521@r:5000"),
            r"extra 'registry_uri' \(http://\*\*\*@r:5000\) carries credentials",
        ),
        (
            connection_json("http://m:5000", ui_url="https://bob:url-Secret-5521@ui"),
            r"extra 'ui_url' \(https://\*\*\*@ui\) carries credentials",
        ),
    ],
)
def test_url_credentials_that_conflict_are_refused_without_quoting_them(airflow_conn, conn, expected):
    airflow_conn("url_conflict", conn)
    with pytest.raises(MLflowConnectionError, match=expected) as err:
        MLflowHook("url_conflict").tracking_uri
    assert "url-Secret-5521" not in str(err.value)
