"""A sweep in MLflow: one parent run, each trial's run made its child, the leaderboard and a plot.

Works with any trainer that reports an MLflow ``run_id``: the trials' runs are made children after they
report (the ``mlflow.parentRunId`` tag, what MLflow's own nested runs set), so nothing reaches the
trainer. The parent is found by its ``mltrain.sweep`` tag before one is created, so a retried ranking
task reuses it. mlflow is imported by the hook, inside the functions, never at DAG parse time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.utils.rest_utils import MlflowHostCreds

log = logging.getLogger(__name__)

#: Tag on the parent run: which sweep (``<dag_id>/<dag run id>/<group_id>``) it stands for.
SWEEP_TAG = "mltrain.sweep"
#: Tag on each trial's run: the trial's checkpoint key.
TRIAL_TAG = "mltrain.sweep.trial"
#: MLflow's own tag for nested runs (what ``mlflow.start_run(nested=True)`` sets).
PARENT_TAG = "mlflow.parentRunId"
LEADERBOARD_ARTIFACT = "leaderboard.json"
PLOT_ARTIFACT = "metric_vs_epochs.svg"


def experiment_of(client: MlflowClient, result: Mapping[str, Any]) -> str:
    """The MLflow experiment of a trial's run (the result says it, or the run does)."""
    return str(result.get("experiment_id") or client.get_run(str(result["run_id"])).info.experiment_id)


def parent_run(
    client: MlflowClient, experiment_id: str, sweep_id: str, run_name: str, params: Mapping[str, Any]
) -> str:
    """The sweep's parent run in ``experiment_id``: the one tagged ``sweep_id``, else a new one."""
    from mlflow.entities import Param

    quoted = sweep_id.replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{quoted}'", max_results=1
    )
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(experiment_id, run_name=run_name, tags={SWEEP_TAG: sweep_id})
    run_id = str(run.info.run_id)
    client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    log.info("sweep %s: parent MLflow run %s in experiment %s", sweep_id, run_id, experiment_id)
    return run_id


def adopt_trials(client: MlflowClient, parent_run_id: str, trials: Sequence[tuple[str, str]]) -> None:
    """Make each ``(trial key, run id)`` a child of the parent run (idempotent: tags are overwritten)."""
    for key, run_id in trials:
        if run_id == parent_run_id:
            continue
        client.set_tag(run_id, PARENT_TAG, parent_run_id)
        client.set_tag(run_id, TRIAL_TAG, key)


def report(
    client: MlflowClient,
    parent_run_id: str,
    *,
    leaderboard: Sequence[Mapping[str, Any]],
    plot_svg: str,
    metrics: Mapping[str, float],
    host_creds: Callable[[], MlflowHostCreds],
    status: str = "FINISHED",
) -> None:
    """Log the leaderboard (MLflow's table JSON: columns + data) and the plot, then end the parent run.

    :param host_creds: the connection's credentials for the tracking server (for proxied artifacts).
    """
    columns = list(leaderboard[0]) if leaderboard else []
    rows = [[_cell(row.get(column)) for column in columns] for row in leaderboard]
    artifact_uri = str(client.get_run(parent_run_id).info.artifact_uri)
    table = json.dumps({"columns": columns, "data": rows}, indent=2)
    upload_text(client, host_creds, parent_run_id, artifact_uri, table, LEADERBOARD_ARTIFACT)
    upload_text(client, host_creds, parent_run_id, artifact_uri, plot_svg, PLOT_ARTIFACT)
    for name, value in metrics.items():
        client.log_metric(parent_run_id, name, float(value))
    client.set_terminated(parent_run_id, status=status)


def upload_text(
    client: MlflowClient,
    host_creds: Callable[[], MlflowHostCreds],
    run_id: str,
    artifact_uri: str,
    text: str,
    artifact_file: str,
) -> None:
    """Write ``text`` as an artifact of the run.

    Artifacts the tracking server proxies (``mlflow-artifacts:``) go over its REST endpoint with the
    connection's credentials: MLflow's own artifact repository resolves that scheme against the
    process-wide tracking URI and reads credentials from ``os.environ``, neither of which a worker sets.
    Other artifact stores (a local store's files) are written by the client.
    """
    if not artifact_uri.startswith("mlflow-artifacts:"):
        client.log_text(run_id, text, artifact_file)
        return
    from mlflow.utils.rest_utils import http_request

    path = urlparse(artifact_uri).path.strip("/")
    response = http_request(
        host_creds(),
        f"/api/2.0/mlflow-artifacts/artifacts/{path}/{artifact_file}",
        "PUT",
        data=text.encode("utf-8"),
    )
    if response.status_code != 200:
        raise RuntimeError(
            f"upload of {artifact_file} failed: HTTP {response.status_code} {response.text[:200]}"
        )


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True)


# -- the plot: hand-written SVG (no plotting library on the worker) ----------------------------------

_WIDTH, _HEIGHT, _MARGIN = 640, 400, 56
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def plot_svg(curves: Mapping[str, Sequence[tuple[int, float]]], metric: str, title: str) -> str:
    """A line per trial of ``metric`` against its epochs; a trial's line ends where it was pruned.

    :param curves: trial key -> ``(epochs, value)`` points, one per round the trial finished.
    """
    points = [p for curve in curves.values() for p in curve]
    if not points:
        return _svg([f'<text x="{_MARGIN}" y="{_MARGIN}">no trial reported {escape(metric)}</text>'])
    x_max = max(x for x, _ in points)
    y_low, y_high = min(y for _, y in points), max(y for _, y in points)
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    plot_w, plot_h = _WIDTH - 2 * _MARGIN, _HEIGHT - 2 * _MARGIN

    def xy(x: float, y: float) -> str:
        return f"{_MARGIN + plot_w * x / x_max:.1f},{_MARGIN + plot_h * (1 - (y - y_low) / (y_high - y_low)):.1f}"

    bottom, right = _HEIGHT - _MARGIN, _WIDTH - _MARGIN
    parts = [
        f'<text x="{_WIDTH / 2}" y="24" text-anchor="middle">{escape(title)}</text>',
        f'<line x1="{_MARGIN}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{_MARGIN}" y1="{_MARGIN}" x2="{_MARGIN}" y2="{bottom}" stroke="black"/>',
        f'<text x="{_WIDTH / 2}" y="{_HEIGHT - 12}" text-anchor="middle">epochs (0..{x_max})</text>',
        f'<text x="14" y="{_HEIGHT / 2}" transform="rotate(-90 14 {_HEIGHT / 2})" '
        f'text-anchor="middle">{escape(metric)}</text>',
        f'<text x="{_MARGIN - 4}" y="{_MARGIN + 4}" text-anchor="end" font-size="10">{y_high:.4g}</text>',
        f'<text x="{_MARGIN - 4}" y="{bottom}" text-anchor="end" font-size="10">{y_low:.4g}</text>',
    ]
    drawn = sorted((key, curve) for key, curve in curves.items() if curve)
    for index, (key, curve) in enumerate(drawn):
        colour = _COLOURS[index % len(_COLOURS)]
        coords = " ".join(xy(x, y) for x, y in sorted(curve))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
            f"<title>{escape(key)}</title></polyline>"
        )
        parts += [
            f'<circle cx="{xy(x, y).split(",")[0]}" cy="{xy(x, y).split(",")[1]}" r="3" fill="{colour}"/>'
            for x, y in curve
        ]
    return _svg(parts)


def _svg(parts: Sequence[str]) -> str:
    body = "\n  ".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'font-family="sans-serif" font-size="12">\n  {body}\n</svg>\n'
    )
