"""Apache Airflow provider for ML training pipelines: GPU training pods, MLflow registry, quality gates."""

from __future__ import annotations

__version__ = "0.1.0"
