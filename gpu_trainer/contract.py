"""The operator <-> trainer contract.

Both sides import this module: ``airflow_provider_mltrain`` to build the pod's environment and to
validate what the trainer wrote, ``gpu_trainer`` to read its inputs and write its result. It uses the
standard library only, so it can be imported inside Airflow (no torch) and inside the training image
(no Airflow), and the two sides can never drift apart.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

#: JSON object of hyperparameters; command-line flags, when given, win over it.
ENV_HYPERPARAMETERS = "MLTRAIN_HYPERPARAMETERS"
#: Where the trainer writes its result JSON.
ENV_RESULT_PATH = "MLTRAIN_RESULT_PATH"
#: Checkpoint directory, stable across retries of one task so a retry resumes.
ENV_CHECKPOINT_DIR = "MLTRAIN_CHECKPOINT_DIR"
#: JSON object with the Airflow lineage (dag_id, run_id, task_id, map_index, try_number).
ENV_LINEAGE = "MLTRAIN_LINEAGE"
#: MLflow's own variables, used as MLflow defines them.
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
ENV_RUN_NAME = "MLFLOW_RUN_NAME"
#: Credentials: only ever from a Kubernetes Secret reference, never a literal in the pod spec.
CREDENTIAL_ENV_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

#: Where KubernetesPodOperator's xcom sidecar picks the return value up.
DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"

SCHEMA_VERSION = 1
LINEAGE_KEYS = ("dag_id", "run_id", "task_id", "map_index", "try_number")
#: Metrics every classification trainer reports.
CLASSIFICATION_METRICS = ("val_accuracy", "val_loss", "train_loss", "val_f1")
RESULT_KEYS = ("schema_version", "run_id", "model_uri", "metrics", "params", "resumed_from_epoch")


class ContractError(ValueError):
    """The trainer's inputs or result do not follow the contract."""


def parse_hyperparameters(raw: str | None) -> dict[str, Any]:
    """Parse ``MLTRAIN_HYPERPARAMETERS``; empty or unset means no hyperparameters.

    :param raw: the variable's value, or None when unset.
    """
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ContractError(f"{ENV_HYPERPARAMETERS} is not valid JSON ({err}): {raw[:200]!r}") from err
    if not isinstance(value, dict):
        raise ContractError(f"{ENV_HYPERPARAMETERS} must be a JSON object, got {type(value).__name__}")
    return value


def encode_hyperparameters(hyperparameters: Mapping[str, Any]) -> str:
    """Serialize hyperparameters for ``MLTRAIN_HYPERPARAMETERS``.

    :param hyperparameters: a mapping of JSON-serializable values.
    :raises ContractError: when a value is not JSON-serializable.
    """
    try:
        return json.dumps(dict(hyperparameters), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ContractError(f"hyperparameters must be JSON-serializable: {err}") from err


def parse_lineage(raw: str | None) -> dict[str, Any]:
    """Parse ``MLTRAIN_LINEAGE``; unset gives an empty mapping (trainer run outside Airflow).

    :param raw: the variable's value, or None when unset.
    """
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ContractError(f"{ENV_LINEAGE} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ContractError(f"{ENV_LINEAGE} must be a JSON object, got {type(value).__name__}")
    return {key: value[key] for key in LINEAGE_KEYS if key in value}


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """MLflow run tags for the Airflow lineage, namespaced so they never clash with user tags.

    :param lineage: the parsed ``MLTRAIN_LINEAGE``.
    """
    return {f"airflow.{key}": str(value) for key, value in lineage.items() if value is not None}


def result_path(environ: Mapping[str, str] | None = None) -> str:
    """The result path from the environment, or the default the xcom sidecar reads.

    :param environ: the environment to read; ``os.environ`` when None.
    """
    env = os.environ if environ is None else environ
    return env.get(ENV_RESULT_PATH) or DEFAULT_RESULT_PATH


def validate_result(result: Any, *, require_metrics: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a trainer result against the contract and return it.

    :param result: the decoded result JSON.
    :param require_metrics: metric names that must be present (e.g. ``CLASSIFICATION_METRICS``).
    :raises ContractError: naming every field that is missing or malformed and what was expected.
    """
    if not isinstance(result, dict):
        raise ContractError(
            f"trainer result must be a JSON object with keys {list(RESULT_KEYS)}, got {type(result).__name__}"
        )
    problems: list[str] = []
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        problems.append(f"missing keys {missing}")
    version = result.get("schema_version")
    if "schema_version" in result and (not isinstance(version, int) or isinstance(version, bool)):
        problems.append(f"schema_version must be an int, got {version!r}")
    elif isinstance(version, int) and version > SCHEMA_VERSION:
        problems.append(f"schema_version {version} is newer than this side understands ({SCHEMA_VERSION})")
    for key in ("run_id", "model_uri"):
        if key in result and result[key] is not None and not isinstance(result[key], str):
            problems.append(f"{key} must be a string or null, got {type(result[key]).__name__}")
    metrics = result.get("metrics")
    if "metrics" in result:
        if not isinstance(metrics, dict):
            problems.append(f"metrics must be an object of name -> number, got {type(metrics).__name__}")
        else:
            bad = {
                name: value
                for name, value in metrics.items()
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            }
            if bad:
                problems.append(f"metrics must be finite numbers, got {bad}")
            absent = [name for name in require_metrics if name not in metrics]
            if absent:
                problems.append(f"metrics lack {absent} (have {sorted(metrics)})")
    if "params" in result and not isinstance(result["params"], dict):
        problems.append(f"params must be an object, got {type(result['params']).__name__}")
    resumed = result.get("resumed_from_epoch")
    if resumed is not None and (not isinstance(resumed, int) or isinstance(resumed, bool)):
        problems.append(f"resumed_from_epoch must be an int or null, got {resumed!r}")
    if problems:
        raise ContractError("trainer result does not follow the contract: " + "; ".join(problems))
    return result


def load_result(path: str) -> dict[str, Any]:
    """Read and validate the result file the trainer wrote.

    :param path: the result file.
    :raises ContractError: when the file is missing, not JSON, or not a valid result.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError as err:
        raise ContractError(
            f"trainer wrote no result at {path}: expected a JSON object with keys {list(RESULT_KEYS)}"
        ) from err
    try:
        decoded = json.loads(text)
    except json.JSONDecodeError as err:
        raise ContractError(f"trainer result at {path} is not valid JSON ({err}): {text[:200]!r}") from err
    return validate_result(decoded)


def write_result(path: str, result: Mapping[str, Any]) -> None:
    """Validate and atomically write a result (temp file + rename: readers never see half a file).

    :param path: destination, usually :func:`result_path`.
    :param result: the result object.
    """
    payload = validate_result(dict(result))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".result-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, sort_keys=True, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_result(
    *,
    run_id: str | None,
    model_uri: str | None,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    resumed_from_epoch: int | None,
) -> dict[str, Any]:
    """Build a result object with the current schema version.

    :param run_id: the MLflow run id.
    :param model_uri: the logged model's URI (``runs:/<run_id>/model``).
    :param metrics: final metrics.
    :param params: the effective training parameters.
    :param resumed_from_epoch: the epoch resumed from, or None for a fresh start.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "model_uri": model_uri,
        "metrics": {name: float(value) for name, value in metrics.items()},
        "params": dict(params),
        "resumed_from_epoch": resumed_from_epoch,
    }
