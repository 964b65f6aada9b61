"""Provider metadata behind the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_mltrain import __version__

PACKAGE_NAME = "airflow-provider-mltrain"


def get_provider_info() -> dict[str, Any]:
    """What Airflow's ProvidersManager reads: connection types, hooks, operators, sensors, triggers, links."""
    return {
        # Must equal the distribution name, or Airflow refuses the provider.
        "package-name": PACKAGE_NAME,
        "name": "ML Training (mltrain)",
        "description": "GPU training pods, MLflow model registry, quality gates and dataset sensors "
        "for ML training pipelines.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": "mlflow",
                "hook-class-name": "airflow_provider_mltrain.hooks.mlflow.MLflowHook",
                "hook-name": "MLflow",
                "conn-fields": {
                    "token": {
                        "label": "Bearer token",
                        "description": "Instead of username/password.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                        "sensitive": True,
                    },
                    "registry_uri": {
                        "label": "Registry URI",
                        "description": "Model registry URI; defaults to the tracking URI.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "insecure": {
                        "label": "Skip TLS verification",
                        "schema": {"type": ["boolean", "null"], "default": False},
                    },
                    "ca_bundle": {
                        "label": "CA bundle path",
                        "description": "Verify the server against this CA bundle.",
                        "schema": {"type": ["string", "null"]},
                    },
                    "ui_url": {
                        "label": "MLflow UI base URL",
                        "description": "For links from task pages; defaults to the tracking URI.",
                        "schema": {"type": ["string", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {"host": "Tracking URI", "login": "Username", "password": "Password"},
                    "placeholders": {"host": "https://mlflow.example.com or sqlite:////data/mlflow.db"},
                },
            }
        ],
        "hooks": [
            {
                "integration-name": "MLflow",
                "python-modules": ["airflow_provider_mltrain.hooks.mlflow"],
            }
        ],
        "integrations": [
            {
                "integration-name": "MLflow",
                "external-doc-url": "https://mlflow.org/docs/latest/",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "Kubernetes GPU training",
                "python-modules": ["airflow_provider_mltrain.operators.gpu_training"],
            },
            {
                "integration-name": "Kubernetes multi-node training (JobSet, Kubeflow Trainer, Kueue)",
                "python-modules": ["airflow_provider_mltrain.operators.distributed_training"],
            },
            {
                "integration-name": "MLflow",
                "python-modules": [
                    "airflow_provider_mltrain.operators.mlflow_register",
                    "airflow_provider_mltrain.operators.model_quality",
                ],
            },
        ],
        "sensors": [
            {
                "integration-name": "Datasets (S3 and local files)",
                "python-modules": ["airflow_provider_mltrain.sensors.dataset"],
            },
        ],
        "triggers": [
            {
                "integration-name": "Datasets (S3 and local files)",
                "python-modules": [
                    "airflow_provider_mltrain.triggers.dataset",
                    "airflow_provider_mltrain.triggers.dataset_event",
                ],
            },
            {
                "integration-name": "Kubernetes multi-node training (JobSet, Kubeflow Trainer, Kueue)",
                "python-modules": ["airflow_provider_mltrain.triggers.training_job"],
            },
            {
                "integration-name": "Kubernetes GPU training",
                "python-modules": ["airflow_provider_mltrain.triggers.training_job"],
            },
        ],
        "extra-links": [
            "airflow_provider_mltrain.links.mlflow.MLflowRunLink",
            "airflow_provider_mltrain.links.mlflow.MLflowModelVersionLink",
        ],
        "config": {
            "mltrain": {
                "description": "airflow-provider-mltrain settings.",
                "options": {
                    "launcher": {
                        "description": "How GPUTrainingPodOperator runs trainers when the operator does not "
                        "say: 'kubernetes' (pods) or 'local' (a subprocess on the worker, for laptops and CI).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "local",
                        "default": "kubernetes",
                    },
                    "local_checkpoint_root": {
                        "description": "Base directory of the local launcher's checkpoints (one directory "
                        "per dag/task/run/map index below it, so a retry resumes). Empty: "
                        "$AIRFLOW_HOME/mltrain/checkpoints.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/data/mltrain/checkpoints",
                        "default": "",
                    },
                },
            }
        },
    }
