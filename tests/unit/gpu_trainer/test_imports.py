"""The training image has no Airflow: the trainer must never import it."""

from __future__ import annotations

import subprocess
import sys


def test_trainer_modules_never_import_airflow():
    code = (
        "import sys, gpu_trainer.train, gpu_trainer.evaluate, gpu_trainer.digits, gpu_trainer.tracking\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith(('airflow.', 'airflow_provider'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
