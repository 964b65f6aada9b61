"""scripts/lowest_constraints.py: the pins `make test-lowest` installs are the lower bounds pyproject states."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "lowest_constraints.py"
_spec = importlib.util.spec_from_file_location("lowest_constraints", SCRIPT)
assert _spec is not None and _spec.loader is not None
lowest_constraints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lowest_constraints)

PYPROJECT = """
[project]
name = "x"
dependencies = [
    "apache-airflow>=3.2.0,<4",
    "Mlflow_Skinny >= 3.0.0, <4",
    "tomli>=1.1; python_version < '3.11'",
]
[project.optional-dependencies]
trainer = ["mlflow-skinny>=3.1", "torch>=2.13.0", "pandas~=2.2"]
dev = ["mlflow[auth]==3.0.0"]
"""


@pytest.fixture
def pyproject(tmp_path: Path) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT)
    return path


def test_each_direct_dependency_pinned_to_its_lower_bound(pyproject):
    pins = lowest_constraints.lowest_pins(pyproject, ["trainer", "dev"], exclude={"torch"})
    assert pins == [
        "apache-airflow==3.2.0",
        # required in two places: the higher lower bound is the lowest version both accept
        "mlflow-skinny==3.1",
        "tomli==1.1; python_version < '3.11'",
        "pandas==2.2",
        "mlflow==3.0.0",
    ]


def test_no_core_gives_the_extra_alone(pyproject):
    pins = lowest_constraints.lowest_pins(pyproject, ["trainer"], exclude=set(), core=False)
    assert pins == ["mlflow-skinny==3.1", "torch==2.13.0", "pandas==2.2"]


def test_a_dependency_without_lower_bound_is_refused(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\ndependencies = ["kubernetes<37"]\n')
    with pytest.raises(ValueError, match=r"'kubernetes<37' has no lower bound"):
        lowest_constraints.lowest_pins(path, [], exclude=set())


def test_unknown_extra_is_refused(pyproject):
    with pytest.raises(
        ValueError, match=r"unknown extra\(s\) \['gpu'\]; pyproject.toml defines \['dev', 'trainer'\]"
    ):
        lowest_constraints.lowest_pins(pyproject, ["gpu"], exclude=set())


def test_the_projects_own_bounds_all_resolve_to_pins():
    """The real pyproject.toml: every dependency the lowest-versions jobs install has a lower bound."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--extra", "dev", "--extra", "trainer"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = dict(line.split("==", 1) for line in out.splitlines() if not line.startswith("#"))
    assert pins["apache-airflow-providers-cncf-kubernetes"] == "10.23.0"
    assert "torch" in pins and "apache-airflow" in pins
