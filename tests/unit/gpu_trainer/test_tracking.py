"""The trainer's tracking limits: MLflow's HTTP bounds as defaults only, and the retry interval setting.

The outage itself (a real server stopped and restarted mid-run) is tested in
tests/integration/gpu_trainer/test_tracking_outage.py.
"""

from __future__ import annotations

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
