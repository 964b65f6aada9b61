"""Validation and pod-spec building blocks for :class:`GPUTrainingPodOperator`.

Kept apart from the operator so each piece (quantities, affinity merging, torchrun wrapping, checkpoint
paths) can be read and tested on its own. Only the Kubernetes models are imported here: they are already
loaded by ``KubernetesPodOperator`` on every parse, so this adds nothing to DAG parse time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation, Overflow
from typing import Any

from kubernetes.client import models as k8s

from airflow_provider_mltrain._templating import renders_later
from gpu_trainer import contract

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
#: Label NVIDIA GPU Feature Discovery puts on GPU nodes, e.g. "NVIDIA-A100-SXM4-80GB".
DEFAULT_GPU_TYPE_LABEL = "nvidia.com/gpu.product"
DEFAULT_CMDS = ("python", "-m", "gpu_trainer.train")
SHM_VOLUME = "mltrain-shm"
CHECKPOINT_VOLUME = "mltrain-checkpoints"
#: The root filesystem is read-only; the trainer (and MLflow, matplotlib, torch.compile) write temporary
#: files under /tmp, so /tmp is a writable emptyDir.
TMP_VOLUME = "mltrain-tmp"
TMP_MOUNT = "/tmp"
#: Limits for KPO's xcom sidecar (it only sleeps, then `cat`s the result file): it requests 1m CPU and
#: 10Mi but has no limits, which leaves the pod without Guaranteed QoS and fails CKV_K8S_11/13.
XCOM_SIDECAR_LIMITS = {"cpu": "100m", "memory": "64Mi"}
#: The image's checkpoint directory (one value, owned by the contract).
DEFAULT_CHECKPOINT_MOUNT = contract.CHECKPOINT_MOUNT
LAUNCHERS = ("kubernetes", "local")

# Kubernetes quantity grammar (resource.Quantity): a decimal number with an optional binary (Ki..Ei),
# decimal (m, k, M..E) or exponent suffix. Signs are left out: a request is never negative.
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(?=.{0,63}$)([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
#: Largest encoded MLTRAIN_HYPERPARAMETERS. The value travels as one environment variable, and Linux
#: refuses to start a process with a single "NAME=value" string over 128 KiB (MAX_ARG_STRLEN: E2BIG,
#: in the pod and for the local launcher alike); this leaves room below it.
MAX_HYPERPARAMETERS_BYTES = 64 * 1024
#: Kubernetes stores a quantity as a 64-bit integer (of milli-units for small values): larger ones are
#: refused by the API server.
_MAX_QUANTITY = Decimal(2**63 - 1)
_SUFFIX_SCALE = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    **{f"{p}i": Decimal(1024) ** (n + 1) for n, p in enumerate("KMGTPE")},
}


def bad_param(name: str, value: Any, allowed: str) -> ValueError:
    """The error every check raises: the parameter, the value and what is allowed."""
    return ValueError(f"GPUTrainingPodOperator: invalid {name}={value!r}; {allowed}")


def check_gpus(gpus: Any) -> int:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise bad_param("gpus", gpus, "expected an int >= 0 (0 = CPU-only job)")
    return gpus


def check_resource_name(name: str, value: Any) -> str:
    """A Kubernetes extended resource name such as ``nvidia.com/gpu`` or ``amd.com/gpu``."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise bad_param(
            name, value, "expected 'vendor-domain/resource', e.g. 'nvidia.com/gpu' or 'amd.com/gpu'"
        )
    domain, resource = value.split("/")
    if not _DNS_SUBDOMAIN.match(domain) or not _NAME.match(resource):
        raise bad_param(
            name, value, "expected 'vendor-domain/resource', e.g. 'nvidia.com/gpu' or 'amd.com/gpu'"
        )
    return value


def check_label_key(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise bad_param(name, value, "expected a node label key such as 'nvidia.com/gpu.product'")
    prefix, _, key = value.rpartition("/")
    if (prefix and not _DNS_SUBDOMAIN.match(prefix)) or not _NAME.match(key):
        raise bad_param(name, value, "expected a node label key such as 'nvidia.com/gpu.product'")
    return value


def check_gpu_type(value: Any) -> list[str]:
    """Normalise ``gpu_type`` to a list of accepted products (label values)."""
    if value is None:
        return []
    products = [value] if isinstance(value, str) else value
    allowed = "expected a GPU product label value or a non-empty list of them, e.g. 'NVIDIA-A100-SXM4-80GB'"
    if not isinstance(products, (list, tuple)) or not products:
        raise bad_param("gpu_type", value, allowed)
    for product in products:
        if not isinstance(product, str) or not product or not _LABEL_VALUE.match(product):
            raise bad_param("gpu_type", value, allowed + " (label values: <= 63 chars of [A-Za-z0-9._-])")
    return list(dict.fromkeys(products))


def check_quantity(name: str, value: Any) -> str | None:
    """A positive Kubernetes quantity (``"4"``, ``"500m"``, ``"16Gi"``); ints and floats are accepted."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad_param(name, value, "expected a Kubernetes quantity such as '4', '500m' or '16Gi'")
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match or float(match.group("num")) <= 0:
        raise bad_param(name, value, "expected a positive Kubernetes quantity such as '4', '500m' or '16Gi'")
    if _quantity_value(match.group("num"), match.group("suffix") or "") > _MAX_QUANTITY:
        raise bad_param(
            name, value, "expected a Kubernetes quantity no larger than 2^63-1 (e.g. '4', '500m' or '16Gi')"
        )
    return text


def _quantity_value(number: str, suffix: str) -> Decimal:
    try:
        if suffix in _SUFFIX_SCALE:
            return Decimal(number) * _SUFFIX_SCALE[suffix]
        return Decimal(number) * Decimal(10) ** int(suffix[1:])  # decimal exponent: "1e3", "2E+6"
    except (InvalidOperation, Overflow):  # an exponent beyond what Decimal represents
        return _MAX_QUANTITY + 1


def check_secret_name(name: str, value: Any) -> str | None:
    """A Kubernetes Secret name (a DNS subdomain: lowercase letters, digits, '-' and '.')."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.match(value):
        raise bad_param(
            name,
            value,
            "expected the name of a Kubernetes Secret: a DNS subdomain (<= 253 characters of lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit), or None",
        )
    return value


def check_hyperparameters(value: Any) -> dict[str, Any]:
    """A JSON object of hyperparameters (a JSON string that decodes to one is accepted too)."""
    allowed = "expected a dict of JSON-serializable values (numbers, strings, booleans, lists, dicts)"
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise bad_param("hyperparameters", value, allowed + f" or a JSON object string ({err})") from err
    if not isinstance(value, Mapping):
        raise bad_param("hyperparameters", value, allowed)
    try:
        encoded = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise bad_param("hyperparameters", value, f"{allowed}: {err}") from err
    size = len(encoded.encode("utf-8"))
    if size > MAX_HYPERPARAMETERS_BYTES:
        # The value itself would flood the log line: name its size and its largest keys instead.
        largest = sorted(value, key=lambda key: -len(json.dumps(value[key])))[:3]
        raise ValueError(
            f"GPUTrainingPodOperator: invalid hyperparameters (keys {sorted(value)[:10]}): {size} bytes "
            f"as JSON, over the {MAX_HYPERPARAMETERS_BYTES}-byte limit (they travel in one environment "
            f"variable, and Linux refuses one over 128 KiB); largest keys: {largest}. Pass large inputs "
            "as a file or URI instead (e.g. a path in the data location)"
        )
    try:
        contract.check_reserved_hyperparameters(value)
    except contract.ContractError as err:
        raise bad_param("hyperparameters", value, str(err)) from err
    return dict(value)


def is_bundled_trainer(cmds: Sequence[str] | None) -> bool:
    """Whether ``cmds`` runs this project's trainer (``python -m gpu_trainer.train``)."""
    return cmds is None or list(cmds[-2:]) == list(DEFAULT_CMDS[-2:])


def check_trainer_hyperparameters(value: Mapping[str, Any], cmds: Sequence[str] | None) -> None:
    """For the bundled trainer, refuse keys it does not know (it would fail on them at run time).

    :param value: the hyperparameters.
    :param cmds: the task's command; other trainers' keys are theirs to check.
    """
    if not is_bundled_trainer(cmds) or not isinstance(value, Mapping):
        return
    # Standard library only (dataclasses, argparse): nothing heavy lands on DAG parsing.
    from gpu_trainer.config import TrainConfig

    options = [field.name for field in dataclasses.fields(TrainConfig)]
    unknown = sorted(
        str(key) for key in value if key not in options and key not in contract.RESERVED_HYPERPARAMETERS
    )
    if not unknown:
        return
    hints = {
        key: close[0]
        for key in unknown
        if (close := difflib.get_close_matches(key, options, n=1, cutoff=0.6))
    }
    suggestion = f" (did you mean {', '.join(f'{k!r} -> {v!r}' for k, v in hints.items())}?)" if hints else ""
    allowed = sorted(set(options) - set(contract.RESERVED_HYPERPARAMETERS))
    raise bad_param(
        "hyperparameters",
        value,
        f"unknown key(s) {unknown} for the bundled trainer ({' '.join(DEFAULT_CMDS)}){suggestion}; "
        f"allowed: {allowed}",
    )


#: A PVC's access modes a user may declare on ``checkpoint_volume`` (what its StorageClass provides).
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany")


def check_checkpoint_volume(value: Any) -> dict[str, str] | None:
    allowed = (
        "expected {'claim_name': <PVC name>, 'mount_path': <absolute path>, 'access_mode': "
        f"one of {list(ACCESS_MODES)}}} (mount_path and access_mode optional)"
    )
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) - {"claim_name", "mount_path", "access_mode"}:
        raise bad_param("checkpoint_volume", value, allowed)
    access_mode = value.get("access_mode")
    if access_mode is not None and access_mode not in ACCESS_MODES:
        raise bad_param("checkpoint_volume", value, allowed)
    claim = value.get("claim_name")
    mount = value.get("mount_path", DEFAULT_CHECKPOINT_MOUNT)
    if not isinstance(claim, str) or not (renders_later(claim) or _DNS_SUBDOMAIN.match(claim)):
        raise bad_param("checkpoint_volume", value, allowed + "; claim_name must be a DNS subdomain name")
    if not isinstance(mount, str) or not mount.startswith("/") or mount.rstrip("/") in ("", "/dev/shm"):
        raise bad_param(
            "checkpoint_volume", value, allowed + "; mount_path must be absolute, not / or /dev/shm"
        )
    checked = {"claim_name": claim, "mount_path": mount.rstrip("/")}
    if access_mode is not None:
        checked["access_mode"] = access_mode
    return checked


#: Kueue object names (LocalQueue, WorkloadPriorityClass) travel as label values: <= 63 lowercase characters.
_KUEUE_NAME = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def check_kueue_name(name: str, value: Any) -> str | None:
    """A Kueue LocalQueue or WorkloadPriorityClass name, used as a label value; None for none."""
    if value is None:
        return None
    if not isinstance(value, str) or not _KUEUE_NAME.match(value):
        raise bad_param(
            name,
            value,
            "expected a Kueue object name usable as a label value (<= 63 lowercase letters, digits, '-' "
            "and '.', starting and ending with a letter or digit) or None",
        )
    return value


def check_positive_int(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_param(name, value, "expected an int >= 1" + (" or None" if allow_none else ""))
    return value


# -- building ---------------------------------------------------------------------------------------


def resources(
    gpus: int, gpu_resource: str, cpu: str | None, memory: str | None
) -> k8s.V1ResourceRequirements | None:
    """Requests and limits set to the same values (GPUs cannot be overcommitted; Guaranteed QoS otherwise)."""
    amounts: dict[str, str] = {}
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    if gpus:
        amounts[gpu_resource] = str(gpus)
    if not amounts:
        return None
    return k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def gpu_toleration(gpu_resource: str) -> k8s.V1Toleration:
    """The taint GPU node pools carry (GKE, EKS and AKS all taint with the resource name)."""
    return k8s.V1Toleration(key=gpu_resource, operator="Exists", effect="NoSchedule")


def merge_tolerations(user: Sequence[k8s.V1Toleration], extra: k8s.V1Toleration) -> list[k8s.V1Toleration]:
    def key(t: k8s.V1Toleration) -> tuple[Any, ...]:
        return (t.key, t.operator or "Equal", t.value, t.effect)

    merged = list(user)
    # A user toleration for the same key and effect (any operator) already covers the taint.
    covered = any(t.key == extra.key and t.effect in (None, extra.effect) for t in merged)
    if not covered and key(extra) not in {key(t) for t in merged}:
        merged.append(extra)
    return merged


def add_required_node_affinity(
    affinity: k8s.V1Affinity | None, requirement: k8s.V1NodeSelectorRequirement
) -> k8s.V1Affinity:
    """AND ``requirement`` into every required node selector term (terms are ORed by Kubernetes)."""
    affinity = affinity or k8s.V1Affinity()
    node_affinity = affinity.node_affinity or k8s.V1NodeAffinity()
    required = node_affinity.required_during_scheduling_ignored_during_execution
    if required is None or not required.node_selector_terms:
        required = k8s.V1NodeSelector(node_selector_terms=[k8s.V1NodeSelectorTerm(match_expressions=[])])
    for term in required.node_selector_terms:
        expressions = list(term.match_expressions or [])
        if not any(e.key == requirement.key for e in expressions):
            expressions.append(requirement)
        term.match_expressions = expressions
    node_affinity.required_during_scheduling_ignored_during_execution = required
    affinity.node_affinity = node_affinity
    return affinity


def restricted_pod_security_context() -> k8s.V1PodSecurityContext:
    """Pod Security Standards "restricted": non-root and the runtime's default seccomp profile.

    One uid for every container: the xcom sidecar (alpine, root by default) must read the result file the
    trainer wrote with mode 0600. fsGroup makes a checkpoint PVC writable for that user.
    """
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=contract.TRAINER_UID,
        run_as_group=contract.TRAINER_GID,
        fs_group=contract.TRAINER_GID,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def restricted_container_security_context() -> k8s.V1SecurityContext:
    """Restricted, plus a read-only root filesystem: the writable places are volumes (/tmp, checkpoints,
    /airflow/xcom, /dev/shm)."""
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        run_as_non_root=True,
        read_only_root_filesystem=True,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def limit_xcom_sidecar(containers: Sequence[k8s.V1Container], sidecar_name: str) -> None:
    """Give the xcom sidecar limits (its requests kept, raised to the limit when above it) unless it has some."""
    for container in containers:
        if container.name != sidecar_name:
            continue
        current = container.resources or k8s.V1ResourceRequirements()
        if current.limits:
            continue
        container.resources = k8s.V1ResourceRequirements(
            requests=dict(current.requests or {}), limits=dict(XCOM_SIDECAR_LIMITS)
        )


def torchrun_command(cmds: Sequence[str], nproc: int) -> list[str]:
    """Run ``cmds`` under torchrun on one node with ``nproc`` processes.

    ``python -m mod`` becomes ``torchrun ... -m mod``, ``python script.py`` becomes ``torchrun ... script.py``
    and any other program runs with ``--no-python``.
    """
    head = ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}"]
    cmds = list(cmds)
    if cmds and (cmds[0] == "python" or re.fullmatch(r"python3(\.\d+)?", cmds[0])):
        return head + cmds[1:]
    return head + ["--no-python", *cmds]


def path_segment(value: Any) -> str:
    """A value as one safe path segment (run ids carry ':' and '+')."""
    return _UNSAFE_PATH_CHARS.sub("_", str(value)).strip("_") or "_"


def checkpoint_suffix(dag_id: str, task_id: str, run_id: str, map_index: int | None) -> str:
    """Per-task checkpoint location; no try number, so a retry finds the previous try's checkpoints."""
    parts = [dag_id, task_id, run_id]
    if map_index is not None and map_index >= 0:
        parts.append(f"map_{map_index}")
    return "/".join(path_segment(p) for p in parts)


#: A checkpoint_key: one path segment, so it can never climb out of (or into another run's) directory.
_CHECKPOINT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_checkpoint_key(value: Any) -> str:
    """A ``checkpoint_key`` as rendered: one path segment of letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(value, str) or not _CHECKPOINT_KEY.fullmatch(value) or ".." in value:
        raise bad_param(
            "checkpoint_key",
            value,
            "expected 1-128 letters, digits, '.', '_' or '-' starting with a letter or digit, no '..' "
            "(one path segment, e.g. 'trial_007')",
        )
    return value


def keyed_checkpoint_suffix(dag_id: str, run_id: str, checkpoint_key: str) -> str:
    """Checkpoint location shared by every task of a DAG run that passes the same ``checkpoint_key``.

    Neither task id nor map index is in it: a sweep's round k+1 task resumes what round k's wrote. The
    ``checkpoint_key=`` segment keeps it apart from :func:`checkpoint_suffix`'s ``dag/task/run`` paths.
    """
    key = check_checkpoint_key(checkpoint_key)
    return "/".join((path_segment(dag_id), path_segment(run_id), f"checkpoint_key={key}"))


def run_name(dag_id: str, task_id: str, map_index: int | None, dag_run_id: str | None = None) -> str:
    """The MLflow run name: ``<dag_id>.<task_id>[.<map_index>]@<dag run id>``.

    The DAG run id makes it unique across runs of the DAG; without it every daily run's trials would
    share the same few names in the MLflow UI.
    """
    name = f"{dag_id}.{task_id}"
    if map_index is not None and map_index >= 0:
        name = f"{name}.{map_index}"
    return f"{name}@{dag_run_id}" if dag_run_id else name


def secret_env(secret_name: str, env_names: Sequence[str]) -> list[k8s.V1EnvVar]:
    """Credentials from a Secret (keys named like the variables; optional, so a token-only Secret works)."""
    return [
        k8s.V1EnvVar(
            name=name,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=secret_name, key=name, optional=True)
            ),
        )
        for name in env_names
    ]
