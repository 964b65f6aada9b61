"""MLflowRegisterOperator: parse-time validation (the registry work is tested against a real server)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from airflow_provider_mltrain.hooks.mlflow import MLflowHook
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator

BASE = {"task_id": "register", "model_name": "digits", "run_id": "a" * 32}


def make(**overrides) -> MLflowRegisterOperator:
    return MLflowRegisterOperator(**{**BASE, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_name": ""}, r"model_name must be a non-empty string"),
        ({"model_name": "team/digits"}, r"model_name 'team/digits' is not a valid registered model name"),
        (
            {"model_name": "m%?#&x"},
            r"model_name 'm%\?#&x' cannot be used in MLflow model URIs .* it contains '#%\?'; names may not "
            r"contain \? # % ; @ or control characters",
        ),
        ({"model_name": "digits@v2"}, r"model_name 'digits@v2' cannot be used in MLflow model URIs"),
        ({"model_name": "a;b"}, r"it contains ';'"),
        ({"model_name": "tab\tname"}, r"it contains '\\t'"),
        ({"model_name": " digits"}, r"no leading or trailing spaces"),
        ({"model_name": ".."}, r"not '\.' or '\.\.'"),
        ({"model_name": 'it\'s "x"'}, r"contains both ' and \": MLflow's search filters cannot match"),
        ({"run_id": None}, r"set run_id and/or model_uri"),
        ({"run_id": 42}, r"run_id must be a string, got int"),
        ({"aliases": ["champion", "prod ready"]}, r"alias 'prod ready' is invalid: aliases may only contain"),
        ({"aliases": ["latest"]}, r"alias 'latest' is reserved by MLflow"),
        ({"aliases": "V2"}, r"alias 'V2' is reserved by MLflow \(v<number> names a version\)"),
        ({"aliases": [""]}, r"an alias must be a non-empty string"),
        ({"aliases": ["x" * 256]}, r"longer than 255 characters"),
        ({"await_ready_timeout": 0}, r"await_ready_timeout must be a positive number of seconds, got 0"),
        ({"await_ready_timeout": True}, r"await_ready_timeout must be a positive number"),
        ({"artifact_path": "/"}, r"artifact_path must be a non-empty relative path"),
        ({"tags": ["a"]}, r"tags must be a dict of name -> value"),
        ({"tags": {"": "x"}}, r"tags: keys must be non-empty strings"),
        (
            {"stage": "Prod"},
            r"stage must be one of \['Staging', 'Production', 'Archived'\] \(or None\), got 'Prod'",
        ),
    ],
)
def test_bad_inputs_are_rejected_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


@pytest.mark.parametrize("name", ["o'brien's model", 'say "hi"', "digits v2", "team.digits_cnn-1", "ünïcode"])
def test_names_mlflow_uris_can_carry_are_accepted(name):
    assert make(model_name=name).model_name == name


def test_defaults_and_normalisation():
    op = make(aliases="champion", model_uri="models:/m-abc", artifact_path="/model/")
    assert op.aliases == ["champion"]
    assert op.artifact_path == "model"
    assert op.mlflow_conn_id == MLflowHook.default_conn_name
    assert op.await_ready_timeout == 300.0
    assert op.stage is None
    assert [link.name for link in op.operator_extra_links] == ["MLflow model version"]
    assert set(op.template_fields) == {"model_name", "run_id", "model_uri", "tags", "description"}


def test_templated_values_are_checked_after_rendering():
    op = make(model_name="{{ params.model_name }}", run_id="{{ ti.xcom_pull('train')['run_id'] }}")
    assert op.model_name == "{{ params.model_name }}"


def test_legacy_stage_warns_and_is_normalised():
    from airflow.exceptions import AirflowProviderDeprecationWarning

    with pytest.warns(AirflowProviderDeprecationWarning, match=r"use aliases=\[...\] instead"):
        op = make(stage="production")
    assert op.stage == "Production"


def test_aliases_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(aliases=["champion", "challenger-2"])


def test_importing_the_operators_does_not_import_mlflow():
    code = (
        "import sys\n"
        "import airflow_provider_mltrain.operators.mlflow_register, airflow_provider_mltrain.operators.model_quality\n"
        "heavy = sorted(m for m in ('mlflow', 'torch', 'pandas', 'numpy', 'sklearn') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
