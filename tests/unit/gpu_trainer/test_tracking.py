"""The trainer's tracking limits: MLflow's HTTP bounds as defaults only, and the retry interval setting.

The outage itself (a real server stopped and restarted mid-run) is tested in
tests/integration/gpu_trainer/test_tracking_outage.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_trainer.errors import TrainerError
from gpu_trainer.tracking import (
    DEFAULT_TRACKING_RETRY_SECONDS,
    TRACKING_HTTP_DEFAULTS,
    bound_tracking_requests,
    tracking_retry_seconds,
)


def test_http_bounds_are_defaults_the_pod_can_override():
    environ = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    bound_tracking_requests(environ)
    assert environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"  # the user's value stays
    assert (
        environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == TRACKING_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )
    # Far below MLflow's own defaults (120 s timeout, 7 retries) that idled GPUs for minutes per call.
    assert int(TRACKING_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]) < 120
    assert int(TRACKING_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) < 7


def test_retry_interval_from_the_environment():
    assert tracking_retry_seconds({}) == DEFAULT_TRACKING_RETRY_SECONDS
    assert tracking_retry_seconds({"MLTRAIN_TRACKING_RETRY_SECONDS": "2.5"}) == 2.5
    assert tracking_retry_seconds({"MLTRAIN_TRACKING_RETRY_SECONDS": "0"}) == 0.0


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_bad_retry_interval_is_a_clear_error(raw):
    with pytest.raises(TrainerError, match=rf"MLTRAIN_TRACKING_RETRY_SECONDS='{raw}': expected seconds >= 0"):
        tracking_retry_seconds({"MLTRAIN_TRACKING_RETRY_SECONDS": raw})


def test_model_logging_skips_the_installed_package_scan_and_the_model_still_loads(tmp_path, monkeypatch):
    """MLflow's requirement check maps every installed module to its distribution (about a second per
    trainer process, tests/benchmarks/bench_trainer_phases.py); log_model must not build that map, and
    the logged model must still load and score as the trained one does."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.utils import requirements_utils

    from gpu_trainer.models import build_model
    from gpu_trainer.tracking import Tracker, model_pip_requirements

    monkeypatch.chdir(tmp_path)
    # A file store: the trainer's own extra (mlflow-skinny, its lowest-bounds job) has no SQLAlchemy for a
    # sqlite one; recent MLflow refuses a file store unless told it is wanted.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    scans: list[int] = []
    real_scan = requirements_utils.importlib_metadata.packages_distributions
    monkeypatch.setattr(
        requirements_utils.importlib_metadata,
        "packages_distributions",
        lambda: scans.append(1) or real_scan(),
    )
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    tracker = Tracker(
        experiment="scan", run_name="r", resume_run_id=None, lineage={"dag_id": "d", "task_id": "t"}
    )
    tracker.log_params({"lr": 0.1, "note": None}, tags={"mltrain.extra": "x"})
    torch.manual_seed(0)
    model = build_model("mlp", 8, 3, 16).eval()
    example = torch.randn(5, 8)
    uri = tracker.log_model(model, example)
    tracker.end()

    assert scans == []
    assert requirements_utils._MODULES_TO_PACKAGES is None  # reset: a later caller scans as before
    run = mlflow.get_run(tracker.run_id)
    assert run.data.params == {"lr": "0.1", "note": ""}
    assert run.data.tags["mltrain.extra"] == "x"
    assert run.data.tags["mltrain.trainer"] == "gpu_trainer"
    assert run.data.tags["airflow.dag_id"] == "d"
    loaded = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        assert torch.allclose(loaded(example), model(example), atol=1e-6)
    logged = mlflow.pyfunc.get_model_dependencies(uri)
    pins = Path(logged).read_text().split()
    assert set(model_pip_requirements()) <= set(pins)
