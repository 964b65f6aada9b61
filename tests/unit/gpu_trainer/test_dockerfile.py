"""The trainer image: pinned CUDA base, non-root user, the trainer as entry point, the trainer extra."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = (ROOT / "gpu_trainer" / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in DOCKERFILE.splitlines() if line.startswith(name + " ")]


def test_base_is_an_exactly_pinned_cuda_runtime_image():
    args = dict(arg.split("=", 1) for arg in _instructions("ARG") if "=" in arg)
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    stages = _instructions("FROM")
    assert len(stages) >= 2, "multi-stage build expected"
    assert all(stage.startswith("${CUDA_IMAGE} AS ") for stage in stages)


def test_runs_as_non_root_with_the_trainer_as_entry_point():
    users = _instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entrypoint = json.loads(_instructions("ENTRYPOINT")[-1])
    assert entrypoint == ["python", "-m", "gpu_trainer.train"]


def test_installs_the_trainer_extra_without_airflow():
    assert "--no-deps ." in DOCKERFILE and "{'extra': 'trainer'}" in DOCKERFILE
    assert "apache-airflow" not in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "tests" in ignored
