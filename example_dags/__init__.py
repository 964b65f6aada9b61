"""Example DAGs shipped with the provider (copy them with ``python -m airflow_provider_mltrain.examples``)."""

from __future__ import annotations
