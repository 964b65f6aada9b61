"""hadolint on the trainer image's Dockerfile: no finding, each inline ignore justified beside it."""

from __future__ import annotations

import subprocess

from tests.fixtures.scanners import REPO_ROOT, tool

DOCKERFILE = REPO_ROOT / "gpu_trainer" / "Dockerfile"


def test_hadolint_finds_nothing():
    proc = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignore_has_a_reason_above_it():
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "expected the justified DL3008 ignores"
    for i in ignores:
        assert lines[i - 1].startswith("#") and not lines[i - 1].startswith("# hadolint"), (
            f"line {i + 1}: say why next to `{lines[i]}`"
        )


def test_hadolint_reports_an_unpinned_install():
    """The scan can fail: the same checks flag an unpinned pip install."""
    proc = subprocess.run(
        [str(tool("hadolint")), "--no-color", "-"],
        input="FROM python:3.11-slim\nRUN pip install --no-cache-dir requests\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "DL3013" in proc.stdout, proc.stdout + proc.stderr
