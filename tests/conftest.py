"""Test-session setup shared by every test package.

Airflow reads ``AIRFLOW_HOME`` and its configuration when it is first imported, so the isolated home is
prepared here, at conftest import, before any test module imports Airflow. The servers (MLflow, S3) are
session fixtures in ``tests/fixtures/``: started once per session, never once per test.
"""

from __future__ import annotations

import os
import tempfile

_AIRFLOW_HOME = tempfile.mkdtemp(prefix="mltrain-airflow-home-")
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ["AIRFLOW__CORE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_AIRFLOW_HOME, "dags")
os.makedirs(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

pytest_plugins = [
    "tests.fixtures.airflow_env",
    "tests.fixtures.k8s_emulator",
    "tests.fixtures.kubernetes",
    "tests.fixtures.mlflow_servers",
    "tests.fixtures.s3",
]
