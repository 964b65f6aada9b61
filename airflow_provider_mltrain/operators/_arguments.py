"""GPUTrainingPodOperator's own arguments: validated once, whether the task is built or mapped.

``GPUTrainingPodOperator(...)`` validates in its constructor; ``GPUTrainingPodOperator.partial(...)``
never calls the constructor until a mapped task instance runs, so without a check of its own a typo in
a sweep's ``partial()`` would surface hours later on a worker. Both paths call :func:`check_arguments`
with what they know; values that are rendered later (Jinja, XComArg, mapped) are checked after
rendering by the operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_mltrain._templating import renders_later
from airflow_provider_mltrain.operators import _pod_spec as spec
from gpu_trainer import contract

#: Environment variables the operator owns; set them through its parameters, not env_vars.
RESERVED_ENV = contract.TRAINER_ENV_VARS


#: Arguments Airflow does not render (not template fields): Jinja or an XComArg there stays as written.
NOT_TEMPLATED = (
    "gpus",
    "gpu_resource",
    "gpu_type",
    "gpu_type_label",
    "shm_size",
    "distributed",
    "nproc_per_node",
    "launcher",
    "queue_name",
    "unschedulable_timeout_seconds",
    "local_kill_grace_seconds",
    "max_preemptions",
)


def check_env_vars(env: Any) -> None:
    """Refuse ``env_vars`` that would override the variables the operator sets from its parameters."""
    if env is None or renders_later(env):
        return
    names = list(env) if isinstance(env, dict) else [getattr(e, "name", None) for e in env]
    clash = sorted(set(RESERVED_ENV) & {str(n) for n in names})
    if clash:
        raise spec.bad_param(
            "env_vars",
            clash,
            "these variables are set by the operator: use hyperparameters=, mlflow_conn_id=, "
            "experiment_name=, mlflow_secret=, checkpoint_volume=/checkpoint_uri= instead",
        )
    literal_credentials = sorted(
        str(name)
        for name, value in (
            env.items()
            if isinstance(env, dict)
            else [(getattr(e, "name", None), getattr(e, "value", None)) for e in env]
        )
        if name in contract.DATA_STORE_CREDENTIAL_ENV_VARS and value is not None
    )
    if literal_credentials:
        raise spec.bad_param(
            "env_vars",
            literal_credentials,
            "data-store credentials never go into a pod spec as values: pass data_secret=<Secret name> "
            "(or a service account with a cloud identity), or aws_conn_id= for the local launcher",
        )


def check_arguments(args: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the operator's arguments present in ``args``; return them normalized.

    Only the keys present are checked (``partial()`` sees a subset), and cross-parameter rules apply
    when both sides are known. Raises ``ValueError`` naming the parameter, the value and what is allowed.

    :param args: argument name -> value, as passed by the user (or the constructor's defaults)
    """
    out = dict(args)

    def known(name: str) -> bool:
        return name in args and not renders_later(args[name])

    for name in NOT_TEMPLATED:
        if name in args and renders_later(args[name]):
            raise spec.bad_param(
                name,
                args[name],
                "this argument is not a template field, so Jinja or an XComArg is never rendered here; "
                f"pass a literal value, or map it with .partial(...).expand({name}=[...])",
            )

    if known("do_xcom_push") and not args["do_xcom_push"]:
        raise spec.bad_param(
            "do_xcom_push",
            args["do_xcom_push"],
            "must be True: the trainer's result is this operator's output",
        )
    if known("gpus"):
        out["gpus"] = spec.check_gpus(args["gpus"])
    if known("gpu_resource"):
        out["gpu_resource"] = spec.check_resource_name("gpu_resource", args["gpu_resource"])
    if known("gpu_type_label"):
        out["gpu_type_label"] = spec.check_label_key("gpu_type_label", args["gpu_type_label"])
    if known("gpu_type"):
        out["gpu_type"] = spec.check_gpu_type(args["gpu_type"])
    for name in ("cpu", "memory"):
        if known(name):
            out[name] = spec.check_quantity(name, args[name])
    shm_size = args.get("shm_size")
    if known("shm_size") and shm_size is not None and not isinstance(shm_size, bool):
        spec.check_quantity("shm_size", shm_size)
    if known("hyperparameters"):
        hyperparameters = spec.check_hyperparameters(args["hyperparameters"])
        if "cmds" not in args or known("cmds"):
            spec.check_trainer_hyperparameters(hyperparameters, args.get("cmds"))
    if known("mlflow_secret"):
        spec.check_secret_name("mlflow_secret", args["mlflow_secret"])
    if known("data_secret"):
        spec.check_secret_name("data_secret", args["data_secret"])
    aws_conn_id = args.get("aws_conn_id")
    if (
        known("aws_conn_id")
        and aws_conn_id is not None
        and (not isinstance(aws_conn_id, str) or not aws_conn_id.strip())
    ):
        raise spec.bad_param(
            "aws_conn_id", aws_conn_id, "expected an Airflow connection id (a string) or None"
        )
    if known("checkpoint_volume"):
        out["checkpoint_volume"] = spec.check_checkpoint_volume(args["checkpoint_volume"])
    checkpoint_uri = args.get("checkpoint_uri")
    if args.get("checkpoint_volume") is not None and checkpoint_uri is not None:
        raise spec.bad_param(
            "checkpoint_uri", checkpoint_uri, "set either checkpoint_volume or checkpoint_uri, not both"
        )
    if (
        known("checkpoint_uri")
        and checkpoint_uri is not None
        and (not isinstance(checkpoint_uri, str) or not checkpoint_uri.strip())
    ):
        raise spec.bad_param("checkpoint_uri", checkpoint_uri, "expected a non-empty path or URI string")
    if known("checkpoint_key") and args["checkpoint_key"] is not None:
        spec.check_checkpoint_key(args["checkpoint_key"])
    for name in ("nproc_per_node", "unschedulable_timeout_seconds"):
        if known(name):
            out[name] = spec.check_positive_int(name, args[name])
    if known("distributed") and not isinstance(args["distributed"], bool):
        raise spec.bad_param("distributed", args["distributed"], "expected True or False")
    # Cross-parameter rules only where both sides are known: partial() may leave gpus to expand().
    if (
        args.get("distributed") is True
        and "nproc_per_node" in args
        and out["nproc_per_node"] is None
        and ("gpus" in args and out["gpus"] == 0)
    ):
        raise spec.bad_param(
            "distributed",
            args.get("distributed"),
            "with gpus=0, set nproc_per_node= (one process per GPU needs GPUs)",
        )
    if known("queue_name"):
        spec.check_kueue_name("queue_name", args["queue_name"])
    if known("launcher") and args["launcher"] is not None and args["launcher"] not in spec.LAUNCHERS:
        raise spec.bad_param("launcher", args["launcher"], f"expected one of {list(spec.LAUNCHERS)} or None")
    grace = args.get("local_kill_grace_seconds")
    if known("local_kill_grace_seconds"):
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise spec.bad_param("local_kill_grace_seconds", grace, "expected seconds >= 0")
        out["local_kill_grace_seconds"] = float(grace)
    preemptions = args.get("max_preemptions")
    if known("max_preemptions") and (
        isinstance(preemptions, bool) or not isinstance(preemptions, int) or preemptions < 0
    ):
        raise spec.bad_param(
            "max_preemptions",
            preemptions,
            "expected an int >= 0 (replacement pods per try after a preemption; 0 fails on the first)",
        )
    if args.get("container_resources") is not None and (
        out.get("gpus") or args.get("cpu") is not None or args.get("memory") is not None
    ):
        raise spec.bad_param(
            "container_resources",
            args["container_resources"],
            "set either container_resources or gpus=/cpu=/memory=, not both (they would conflict)",
        )
    if "env_vars" in args:
        check_env_vars(args["env_vars"])
    return out
