"""DAG parsing is the hot path: importing the provider must not import heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("mlflow", "torch", "pandas", "numpy", "boto3", "botocore", "sklearn", "pyarrow")

# A fresh interpreter: this test process has long since imported all of them.
PROBE = """
import importlib, json, pkgutil, sys
import airflow_provider_mltrain, gpu_trainer.contract
names = [m.name for m in pkgutil.walk_packages(airflow_provider_mltrain.__path__, "airflow_provider_mltrain.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_importing_every_provider_module_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])

    assert "airflow_provider_mltrain.hooks.mlflow" in report["modules"]
    assert "airflow_provider_mltrain.get_provider_info" in report["modules"]
    heavy = sorted(set(HEAVY) & set(report["loaded"]))
    assert heavy == [], f"importing airflow_provider_mltrain loaded {heavy}"


def test_gpu_trainer_contract_uses_the_standard_library_only():
    probe = (
        "import sys, gpu_trainer.contract; print(sorted(m for m in sys.modules if m.startswith('airflow')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
