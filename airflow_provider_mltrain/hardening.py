"""Security-scanner checks that do not apply to the pods this provider builds, each with the reason.

The one documented allow-list: the test suite runs checkov on the rendered pods (trainer and xcom
sidecar together) and fails on any failed check that is not listed here. Everything else checkov
asks for is in the default pod: limits on every container (set ``cpu=`` and ``memory=`` for the
trainer), no service-account token unless ``automount_service_account_token=True``, a read-only root
filesystem with writable emptyDirs where the trainer writes (``/tmp``, checkpoints, ``/airflow/xcom``,
``/dev/shm``), a non-root uid above 10000 in image and pod, dropped capabilities, RuntimeDefault seccomp.
"""

from __future__ import annotations

#: checkov check id -> why it does not apply to a training pod.
CHECKOV_NOT_APPLICABLE: dict[str, str] = {
    "CKV_K8S_8": (
        "liveness probe: a batch job has no endpoint to probe, and a probe that misses an answer during a "
        "long step, a torch.compile or a checkpoint write would kill hours of training; a hung job is "
        "bounded by the task's execution_timeout instead"
    ),
    "CKV_K8S_9": "readiness probe: the pod serves no traffic, so there is nothing to be ready for",
    "CKV_K8S_15": (
        "imagePullPolicy Always: the user's choice (image_pull_policy=); with a tag or digest pinned per "
        "release, IfNotPresent avoids pulling a multi-GB CUDA image for every task"
    ),
    "CKV_K8S_43": (
        "image digest: the image is the user's (image=); pinning it by digest is their release choice, "
        "the operator passes whatever reference it is given"
    ),
    "CKV_K8S_35": (
        "secrets as files: MLflow's client reads credentials only from MLFLOW_TRACKING_* variables; they "
        "come from secretKeyRef (mlflow_secret=), never as literals in the pod spec"
    ),
    "CKV2_K8S_6": (
        "NetworkPolicy: a namespace-level object the cluster's administrators own (the pod must reach "
        "MLflow, the data store and, for several nodes, its peers); a pod spec cannot carry one"
    ),
}
