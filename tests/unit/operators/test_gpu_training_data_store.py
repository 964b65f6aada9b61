"""GPUTrainingPodOperator and the data store: Secret references in pods, the connection for local trainers."""

from __future__ import annotations

import json

import pytest
from kubernetes.client import models as k8s

from airflow_provider_mltrain.hooks.data_store import aws_child_environment
from airflow_provider_mltrain.launchers.local import child_environment
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import assert_valid, build, env_of, op_

# The Kubernetes hook (the API boundary) is faked: tests/fixtures/kubernetes.py.
pytestmark = pytest.mark.usefixtures("k8s_hook")

SECRET_KEY = "wJalrXUtnFEMI-not-a-real-secret"


def _aws_conn(airflow_conn, conn_id: str = "data_store", **extra: str) -> str:
    airflow_conn(
        conn_id,
        json.dumps(
            {
                "conn_type": "aws",
                "login": "AKIDEXAMPLE",
                "password": SECRET_KEY,
                "extra": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1", **extra},
            }
        ),
    )
    return conn_id


def test_data_secret_reaches_the_pod_as_secret_references_only(airflow_conn):
    conn_id = _aws_conn(airflow_conn)
    pod = build(op_(data_secret="training-data", aws_conn_id=conn_id))

    assert_valid(pod)
    env = env_of(pod)
    for name in contract.DATA_STORE_ENV_VARS:
        assert env[name] == {"secretKeyRef": {"name": "training-data", "key": name, "optional": True}}
    # The connection's keys never reach a pod spec, whatever aws_conn_id says.
    assert SECRET_KEY not in json.dumps(pod)
    assert "AKIDEXAMPLE" not in json.dumps(pod)


def test_a_literal_endpoint_in_env_vars_wins_over_the_secret_key():
    pod = build(op_(data_secret="training-data", env_vars={"AWS_ENDPOINT_URL": "http://minio.data:9000"}))

    env = env_of(pod)
    assert env["AWS_ENDPOINT_URL"] == "http://minio.data:9000"
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "training-data", "key": "AWS_ACCESS_KEY_ID", "optional": True}
    }
    assert [e["name"] for e in build(op_(data_secret="training-data"))["spec"]["containers"][0]["env"]].count(
        "AWS_ENDPOINT_URL"
    ) == 1


def test_without_data_secret_the_pod_has_no_data_store_variables():
    env = env_of(build(op_()))
    assert not set(env) & set(contract.DATA_STORE_ENV_VARS)


@pytest.mark.parametrize("bad", ["Training_Data", "-data", "data-", "a" * 254, "", 3])
def test_bad_data_secret_names_fail_at_construction_and_at_partial(bad):
    with pytest.raises(ValueError, match=r"invalid data_secret=.*DNS subdomain"):
        op_(data_secret=bad)
    with pytest.raises(ValueError, match=r"invalid data_secret=.*DNS subdomain"):
        GPUTrainingPodOperator.partial(task_id="t", data_secret=bad)


@pytest.mark.parametrize("bad", ["", "  ", 42, ["aws_default"]])
def test_bad_aws_conn_id_fails_at_construction_and_at_partial(bad):
    with pytest.raises(ValueError, match=r"invalid aws_conn_id=.*connection id"):
        op_(aws_conn_id=bad)
    with pytest.raises(ValueError, match=r"invalid aws_conn_id=.*connection id"):
        GPUTrainingPodOperator.partial(task_id="t", aws_conn_id=bad)


def test_templated_data_secret_is_checked_after_rendering():
    op = op_(data_secret="{{ params.secret }}")
    op.data_secret = "Not A Name"  # what rendering produced
    with pytest.raises(ValueError, match=r"invalid data_secret='Not A Name'"):
        build(op)


@pytest.mark.parametrize(
    "env_vars",
    [
        {"AWS_SECRET_ACCESS_KEY": "literal"},
        [k8s.V1EnvVar(name="AWS_ACCESS_KEY_ID", value="AKID")],
    ],
)
def test_literal_data_store_credentials_in_env_vars_are_refused(env_vars):
    with pytest.raises(ValueError, match=r"invalid env_vars=.*data_secret="):
        op_(env_vars=env_vars)


def test_a_secret_reference_in_env_vars_is_allowed():
    ref = k8s.V1EnvVar(
        name="AWS_ACCESS_KEY_ID",
        value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name="s", key="k")),
    )
    assert op_(env_vars=[ref]).env_vars


# -- the local launcher's child environment -------------------------------------------------------------


def test_connection_credentials_endpoint_and_region_for_the_child(airflow_conn):
    env = aws_child_environment(_aws_conn(airflow_conn))
    assert env == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }


def test_s3_service_config_endpoint_is_the_one_the_child_gets(airflow_conn):
    conn_id = "per_service"
    airflow_conn(
        conn_id,
        json.dumps(
            {
                "conn_type": "aws",
                "login": "a",
                "password": "b",
                "extra": {
                    "endpoint_url": "http://127.0.0.1:1",
                    "service_config": {"s3": {"endpoint_url": "http://127.0.0.1:2"}},
                },
            }
        ),
    )
    assert aws_child_environment(conn_id)["AWS_ENDPOINT_URL"] == "http://127.0.0.1:2"


def test_a_missing_connection_gives_nothing_and_never_the_workers_own(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-own-key")
    assert aws_child_environment("no_such_connection") == {}


def test_the_workers_own_aws_variables_never_reach_the_trainer():
    worker = {
        "PATH": "/usr/bin",
        "AWS_ACCESS_KEY_ID": "worker-key",
        "AWS_SECRET_ACCESS_KEY": "worker-secret",
        "AWS_PROFILE": "worker",
        "AWS_ENDPOINT_URL_S3": "http://worker-only:1",
        "FSSPEC_S3_ENDPOINT_URL": "http://worker-only:2",
    }
    task = {"AWS_ACCESS_KEY_ID": "task-key", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}

    env = child_environment(task, base=worker)

    assert env["AWS_ACCESS_KEY_ID"] == "task-key"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_PROFILE" not in env
    # Either would win over the task's AWS_ENDPOINT_URL (botocore's service-specific variable, s3fs's kwargs).
    assert "AWS_ENDPOINT_URL_S3" not in env and "FSSPEC_S3_ENDPOINT_URL" not in env
    assert env["PATH"] == "/usr/bin"
