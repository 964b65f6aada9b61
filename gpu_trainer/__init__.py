"""The PyTorch trainer that GPUTrainingPodOperator launches; never imports Airflow."""

from __future__ import annotations
