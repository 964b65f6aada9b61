"""The operator <-> trainer contract, and the public API for your own training code.

Both sides import this module: ``airflow_provider_mltrain`` to build the trainer's environment
(:func:`trainer_environment`) and to validate what the trainer wrote, ``gpu_trainer`` (or your own
script) to read its inputs and write its result. It uses the standard library only, so it can be
imported inside Airflow (no torch) and inside the training image (no Airflow), and the two sides can
never drift apart.

A training script of your own needs five calls and no knowledge of the variables below::

    from gpu_trainer import contract

    hp = contract.hyperparameters()        # {} when unset
    ckpt = contract.checkpoint_dir()       # where to save and look for checkpoints, or None
    tags = contract.lineage_tags(contract.lineage())
    if contract.is_main_process():
        contract.report_result(run_id=..., model_uri=..., metrics={...}, params=hp)

Preemption: on SIGTERM (an evicted pod, a drained or reclaimed spot node) save a checkpoint and exit with
:data:`PREEMPTED_EXIT_CODE`; the launcher starts the script again on the same checkpoint directory without
spending one of the task's retries (``gpu_trainer.preemption`` does this for the bundled trainer).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

#: JSON object of hyperparameters; command-line flags, when given, win over it.
ENV_HYPERPARAMETERS = "MLTRAIN_HYPERPARAMETERS"
#: Where the trainer writes its result JSON.
ENV_RESULT_PATH = "MLTRAIN_RESULT_PATH"
#: Checkpoint directory, stable across retries of one task so a retry resumes.
ENV_CHECKPOINT_DIR = "MLTRAIN_CHECKPOINT_DIR"
#: JSON object with the Airflow lineage (dag_id, dag_run_id, task_id, map_index, try_number).
ENV_LINEAGE = "MLTRAIN_LINEAGE"
#: MLflow's own variables, used as MLflow defines them.
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY_URI = "MLFLOW_REGISTRY_URI"
ENV_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
ENV_RUN_NAME = "MLFLOW_RUN_NAME"
ENV_TRACKING_USERNAME = "MLFLOW_TRACKING_USERNAME"
ENV_TRACKING_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_TRACKING_INSECURE_TLS = "MLFLOW_TRACKING_INSECURE_TLS"
ENV_TRACKING_SERVER_CERT_PATH = "MLFLOW_TRACKING_SERVER_CERT_PATH"
#: Credentials: in a pod only ever from a Kubernetes Secret reference, never a literal in the pod spec.
CREDENTIAL_ENV_VARS = (ENV_TRACKING_USERNAME, ENV_TRACKING_PASSWORD, ENV_TRACKING_TOKEN)
#: The data store's (S3 or S3-compatible) credentials, as botocore (so s3fs/fsspec in the trainer) reads
#: them. In a pod only from a Kubernetes Secret reference (``data_secret``) or the pod's service account
#: (IRSA, workload identity); the local launcher sets them from the task's Airflow connection.
DATA_STORE_CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Everything the trainer needs to reach the data store: the credentials, the endpoint (MinIO, Ceph,
#: a loopback test server; botocore's own variable) and the region.
DATA_STORE_ENV_VARS = (*DATA_STORE_CREDENTIAL_ENV_VARS, "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
#: The MLflow client variables a trainer may receive for its connection (credentials included).
MLFLOW_CLIENT_ENV_VARS = (
    ENV_TRACKING_URI,
    ENV_REGISTRY_URI,
    *CREDENTIAL_ENV_VARS,
    ENV_TRACKING_INSECURE_TLS,
    ENV_TRACKING_SERVER_CERT_PATH,
)
#: The variables the launcher always owns (:func:`trainer_environment` sets them from the operator's
#: parameters): a user's env_vars or extra variables may not set them.
TRAINER_ENV_VARS = (
    ENV_HYPERPARAMETERS,
    ENV_RESULT_PATH,
    ENV_CHECKPOINT_DIR,
    ENV_LINEAGE,
    ENV_TRACKING_URI,
    ENV_EXPERIMENT_NAME,
    ENV_RUN_NAME,
    *CREDENTIAL_ENV_VARS,
)

#: Where KubernetesPodOperator's xcom sidecar picks the return value up.
DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"
#: Multi-node jobs (JobSet, TrainJob) have no xcom sidecar: the leader container's result path is its
#: termination message file (Kubernetes' default ``terminationMessagePath``). The kubelet bind-mounts that
#: file and copies at most ``TERMINATION_MESSAGE_LIMIT`` bytes of it (the file's tail) into the pod status,
#: where the operator reads it without exec or a sidecar.
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT = 4096
#: Start of the one log line that repeats a result written to the termination message: the operator's
#: fallback for a result over ``TERMINATION_MESSAGE_LIMIT`` (the kubelet keeps only its tail).
RESULT_LOG_MARKER = "MLTRAIN_RESULT_JSON "
#: Where checkpoints live in the trainer's container: the image creates it (and makes it the default
#: checkpoint directory) and the operator mounts its checkpoint volume there unless told otherwise.
CHECKPOINT_MOUNT = "/mltrain/checkpoints"
#: The trainer image's user and group; the pod runs every container as this uid. Above 10000 so it
#: never maps to a user of the node (a common hardening rule, e.g. checkov CKV_K8S_40).
TRAINER_UID = 10001
TRAINER_GID = 10001

#: The trainer's exit status after a preemption: it got SIGTERM, finished the optimizer step in
#: progress, wrote a checkpoint and ended its MLflow run as KILLED. 128 + SIGTERM(15), what a shell
#: reports for a process killed by SIGTERM. A launcher that did not send the SIGTERM itself restarts
#: the trainer on the same checkpoint directory: it resumes at the next sample of the same MLflow run.
PREEMPTED_EXIT_CODE = 143

#: torchrun's rendezvous settings, which it reads from the environment (``PET_<OPTION>``). Every multi-node
#: launcher (JobSet, TrainJob, the local launcher) runs ``torchrun`` without rendezvous flags and passes
#: these instead: the node count, processes per node, this node's rank, and the leader's address and port.
ENV_NNODES = "PET_NNODES"
ENV_NPROC_PER_NODE = "PET_NPROC_PER_NODE"
ENV_NODE_RANK = "PET_NODE_RANK"
ENV_MASTER_ADDR = "PET_MASTER_ADDR"
ENV_MASTER_PORT = "PET_MASTER_PORT"
TORCHRUN_ENV_VARS = (ENV_NNODES, ENV_NPROC_PER_NODE, ENV_NODE_RANK, ENV_MASTER_ADDR, ENV_MASTER_PORT)
#: The leader's rendezvous port on a cluster (the one Kubeflow Trainer injects).
DEFAULT_MASTER_PORT = 29500

SCHEMA_VERSION = 1
LINEAGE_KEYS = ("dag_id", "dag_run_id", "task_id", "map_index", "try_number")
#: Lineage keys of older operators -> today's name; read for compatibility, never written.
LEGACY_LINEAGE_KEYS = {"run_id": "dag_run_id"}
#: Metrics every classification trainer reports.
CLASSIFICATION_METRICS = ("val_accuracy", "val_loss", "train_loss", "val_f1")
RESULT_KEYS = ("schema_version", "run_id", "model_uri", "metrics", "params", "resumed_from_epoch")
#: Result keys a trainer may leave out (older trainers do): the operator then asks MLflow instead.
OPTIONAL_RESULT_KEYS = ("experiment_id",)

#: Locations and run naming are the launcher's, not hyperparameters: key -> what to use instead.
RESERVED_HYPERPARAMETERS = {
    "output": f"the result path is set by the launcher ({ENV_RESULT_PATH})",
    "checkpoint_dir": f"use the operator's checkpoint_volume= or checkpoint_uri= ({ENV_CHECKPOINT_DIR})",
    "experiment": f"use the operator's experiment_name= ({ENV_EXPERIMENT_NAME})",
    "run_name": f"the operator names the run after the DAG run, task and map index ({ENV_RUN_NAME})",
}


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


def check_reserved_hyperparameters(names: Any) -> None:
    """Refuse hyperparameter names that are the launcher's locations or run naming.

    A hyperparameter ``output`` would move the result away from where the operator reads it, and a
    shared ``checkpoint_dir`` would make every later run resume the first one's checkpoint.

    :param names: the hyperparameter names (a mapping's keys).
    :raises ContractError: naming the key and what to use instead.
    """
    reserved = sorted(set(names) & set(RESERVED_HYPERPARAMETERS))
    if reserved:
        reasons = "; ".join(
            f"{name!r} is not a hyperparameter: {RESERVED_HYPERPARAMETERS[name]}" for name in reserved
        )
        raise ContractError(f"{reasons} (reserved names: {sorted(RESERVED_HYPERPARAMETERS)})")


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
    return normalize_lineage(value)


def normalize_lineage(lineage: Mapping[str, Any]) -> dict[str, Any]:
    """The known lineage keys, with an older operator's names (``run_id``) read as today's.

    :param lineage: a lineage mapping, possibly written by an older operator.
    """
    values = dict(lineage)
    for old, new in LEGACY_LINEAGE_KEYS.items():
        if old in values and new not in values:
            values[new] = values[old]
    return {key: values[key] for key in LINEAGE_KEYS if key in values}


def encode_lineage(lineage: Mapping[str, Any]) -> str:
    """Serialize lineage for ``MLTRAIN_LINEAGE`` (today's key names only).

    :param lineage: dag_id, dag_run_id, task_id, map_index, try_number of the Airflow task.
    """
    return json.dumps(normalize_lineage(lineage), sort_keys=True)


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """MLflow run tags for the Airflow lineage, namespaced so they never clash with user tags.

    :param lineage: the parsed ``MLTRAIN_LINEAGE`` (an older operator's key names are read too).
    """
    return {
        f"airflow.{key}": str(value) for key, value in normalize_lineage(lineage).items() if value is not None
    }


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
    for key in ("run_id", "model_uri", *OPTIONAL_RESULT_KEYS):
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
    if os.path.abspath(path) == TERMINATION_MESSAGE_PATH:
        _write_termination_message(payload)
        return
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


def _write_termination_message(payload: Mapping[str, Any]) -> None:
    """Write the result in place (the kubelet's bind mount cannot be renamed over; the uid cannot create
    files in /dev) and print it as one marker line, which the operator reads when the result is too long
    for the termination message."""
    text = json.dumps(payload, sort_keys=True, allow_nan=False)
    print(RESULT_LOG_MARKER + text, flush=True)
    with open(TERMINATION_MESSAGE_PATH, "w", encoding="utf-8") as fh:
        fh.write(text)


def parse_result_log_line(lines: Sequence[str]) -> Any:
    """The decoded JSON of the last result marker line among ``lines`` (None when there is none).

    :param lines: log lines, e.g. the leader's log tail; a timestamp prefix before the marker is allowed.
    :raises ValueError: the last marker line is not valid JSON (a truncated log line).
    """
    for line in reversed(lines):
        _, marker, text = line.partition(RESULT_LOG_MARKER)
        if marker:
            return json.loads(text)
    return None


def make_result(
    *,
    run_id: str | None,
    model_uri: str | None,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    resumed_from_epoch: int | None,
    experiment_id: str | None = None,
) -> dict[str, Any]:
    """Build a result object with the current schema version.

    :param run_id: the MLflow run id.
    :param model_uri: the logged model's URI (``runs:/<run_id>/model``).
    :param metrics: final metrics.
    :param params: the effective training parameters.
    :param resumed_from_epoch: the epoch resumed from, or None for a fresh start.
    :param experiment_id: the MLflow experiment of ``run_id`` (lets the operator link the run without
        asking MLflow); left out of the result when None, as older trainers do.
    """
    result = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "model_uri": model_uri,
        "metrics": {name: _metric(name, value) for name, value in metrics.items()},
        "params": dict(params),
        "resumed_from_epoch": resumed_from_epoch,
    }
    if experiment_id is not None:
        result["experiment_id"] = experiment_id
    return result


def _metric(name: str, value: Any) -> float:
    # A tensor or numpy scalar converts with float(); a string or a list is a mistake worth one clear line.
    if isinstance(value, (bool, str, bytes)):
        raise ContractError(f"metric {name!r} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise ContractError(f"metric {name!r} must be a number, got {type(value).__name__}") from err


# -- the public trainer API ---------------------------------------------------------------------------
# What a training script of your own calls; each reads os.environ unless given an environment.


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def hyperparameters(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This task's hyperparameters (``{}`` when none were given).

    :param environ: the environment to read; ``os.environ`` when None.
    :raises ContractError: when they are not a JSON object or use a reserved name.
    """
    values = parse_hyperparameters(_env(environ).get(ENV_HYPERPARAMETERS))
    check_reserved_hyperparameters(values)
    return values


def checkpoint_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """Where to save checkpoints and look for one to resume from, or None (no checkpointing).

    The same directory for every try of one task, so a retry finds the last try's checkpoints. A local
    path (a volume; create it with ``os.makedirs(..., exist_ok=True)``) or, with the operator's
    ``checkpoint_uri=``, a URI such as ``s3://bucket/prefix/...``.

    :param environ: the environment to read; ``os.environ`` when None.
    """
    return _env(environ).get(ENV_CHECKPOINT_DIR) or None


def lineage(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Airflow task behind this run: dag_id, dag_run_id, task_id, map_index, try_number.

    Empty outside Airflow. :func:`lineage_tags` turns it into MLflow tags.

    :param environ: the environment to read; ``os.environ`` when None.
    """
    return parse_lineage(_env(environ).get(ENV_LINEAGE))


def run_name(environ: Mapping[str, str] | None = None) -> str | None:
    """The MLflow run name the operator chose (``<dag_id>.<task_id>[.<map_index>]@<dag run id>``), or None.

    MLflow does not read it by itself: pass it to ``mlflow.start_run(run_name=...)`` for a new run.

    :param environ: the environment to read; ``os.environ`` when None.
    """
    return _env(environ).get(ENV_RUN_NAME) or None


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process reports: global rank 0 under torchrun (one node or several), True otherwise.

    Reads torchrun's ``RANK``; without it, asks ``torch.distributed`` when the script already set up a
    process group some other way (this module never imports torch itself).

    :param environ: the environment to read; ``os.environ`` when None.
    :raises ContractError: when ``RANK`` is not an integer.
    """
    raw = _env(environ).get("RANK")
    if raw is not None and raw.strip():
        try:
            return int(raw) == 0
        except ValueError as err:
            raise ContractError(f"RANK must be an integer (torchrun's global rank), got {raw!r}") from err
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()) == 0
    return True


def report_result(
    *,
    run_id: str | None,
    model_uri: str | None,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
    experiment_id: str | None = None,
    resumed_from_epoch: int | None = None,
    require_metrics: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> str:
    """Validate the run's result and write it where the operator reads it; call it once, on rank 0.

    :param run_id: the MLflow run id (``mlflow.active_run().info.run_id``).
    :param model_uri: the logged model's URI, e.g. ``runs:/<run_id>/model``; None when no model was logged.
    :param metrics: final metrics, name -> number (floats, ints, 0-d tensors); a classification trainer
        reports at least ``val_accuracy``, ``val_loss``, ``train_loss`` and ``val_f1``.
    :param params: the effective training parameters (usually the hyperparameters plus defaults).
    :param experiment_id: the run's MLflow experiment id; lets the operator link the run without asking
        MLflow.
    :param resumed_from_epoch: the epoch the run resumed from, None for a fresh start.
    :param require_metrics: metric names that must be present, e.g. ``CLASSIFICATION_METRICS``.
    :param environ: the environment to read; ``os.environ`` when None.
    :returns: the path written.
    :raises ContractError: one line naming what is wrong (and nothing is written).
    """
    env = _env(environ)
    if not is_main_process(env):
        raise ContractError(
            f"report_result called on rank {env.get('RANK')}: only the main process reports "
            "(guard the call with contract.is_main_process())"
        )
    if not isinstance(metrics, Mapping):
        raise ContractError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    if not isinstance(params, Mapping):
        raise ContractError(f"params must be a mapping, got {type(params).__name__}")
    result = make_result(
        run_id=run_id,
        model_uri=model_uri,
        metrics=metrics,
        params=params,
        resumed_from_epoch=resumed_from_epoch,
        experiment_id=experiment_id,
    )
    validate_result(result, require_metrics=require_metrics)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ContractError(f"params must be JSON-serializable: {err}") from err
    path = result_path(env)
    write_result(path, result)
    return path


# -- the trainer's environment (the launchers' side) --------------------------------------------------


def trainer_environment(
    *,
    hyperparameters: Mapping[str, Any],
    checkpoint_dir: str | None,
    lineage: Mapping[str, Any] | None = None,
    result_path: str = DEFAULT_RESULT_PATH,
    run_name: str | None = None,
    experiment_name: str | None = None,
    mlflow: Mapping[str, str] | None = None,
    literal_credentials: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole contract environment of one trainer: the one place the pod builder and the local
    launcher get it from.

    :param hyperparameters: the rendered hyperparameters (reserved names are refused).
    :param checkpoint_dir: the task's checkpoint directory, or None for none.
    :param lineage: the Airflow task (dag_id, dag_run_id, task_id, map_index, try_number).
    :param result_path: where the trainer writes its result.
    :param run_name: the MLflow run name.
    :param experiment_name: the MLflow experiment.
    :param mlflow: the connection's MLflow client variables (names from ``MLFLOW_CLIENT_ENV_VARS``,
        e.g. ``MLflowHook.child_environment()``).
    :param literal_credentials: keep the credentials in ``mlflow`` as values (a local subprocess);
        when False they are dropped, because a pod gets them only as Secret references.
    :param extra: further variables for the trainer (e.g. a data store's); they may not set a
        contract variable.
    :raises ContractError: for reserved hyperparameters, unknown MLflow variables or a clash in ``extra``.
    """
    check_reserved_hyperparameters(hyperparameters)
    env = {
        ENV_HYPERPARAMETERS: encode_hyperparameters(hyperparameters),
        ENV_RESULT_PATH: result_path,
        ENV_LINEAGE: encode_lineage(lineage or {}),
    }
    if checkpoint_dir:
        env[ENV_CHECKPOINT_DIR] = checkpoint_dir
    if run_name:
        env[ENV_RUN_NAME] = run_name
    if experiment_name:
        env[ENV_EXPERIMENT_NAME] = experiment_name
    unknown = sorted(set(mlflow or {}) - set(MLFLOW_CLIENT_ENV_VARS))
    if unknown:
        raise ContractError(f"unknown MLflow variables {unknown}; allowed: {list(MLFLOW_CLIENT_ENV_VARS)}")
    for name, value in (mlflow or {}).items():
        if value and (literal_credentials or name not in CREDENTIAL_ENV_VARS):
            env[name] = value
    clash = sorted(set(extra or {}) & set(TRAINER_ENV_VARS))
    if clash:
        raise ContractError(f"extra variables {clash} would override the contract's own; set them through it")
    env.update(extra or {})
    return env
