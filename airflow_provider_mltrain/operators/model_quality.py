"""ModelQualityBranchOperator: the quality gate between training and registration."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.exceptions import AirflowException
from airflow.providers.standard.operators.branch import BaseBranchOperator

from airflow_provider_mltrain._templating import renders_later
from airflow_provider_mltrain.hooks.mlflow import MLflowHook
from airflow_provider_mltrain.operators._mlflow_names import validate_alias, validate_model_name
from airflow_provider_mltrain.operators._quality_checks import (
    ON_MISSING_METRIC,
    ON_NO_CHAMPION,
    Check,
    Rescore,
    parse_metrics,
    parse_rescore,
    render_table,
    run_gate_checks,
    validate_choice,
    validate_higher_is_better,
    validate_metric_thresholds,
    validate_min_improvement,
    validate_task_ids,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class ModelQualityBranchOperator(BaseBranchOperator):
    """Route to ``pass_task_ids`` when a candidate model meets every gate, else to ``fail_task_ids``.

    Gates are absolute ``thresholds`` and, with ``champion_model``, an improvement over the champion, the
    version holding ``champion_alias``. By default the champion's numbers are those its own run recorded,
    on the data of its day. With ``champion_metrics`` the comparison is like for like: the champion scored
    on the candidate's own holdout (e.g. by ``python -m gpu_trainer.evaluate`` in a
    ``GPUTrainingPodOperator``), and the report shows both numbers. Every decision is explained: a table
    in the task log and the XCom ``quality_report`` (each check, its value, bound or champion value, and
    verdict).

    .. code-block:: python

        gate = ModelQualityBranchOperator(
            task_id="quality_gate",
            metrics=train.output["metrics"],
            thresholds={"val_accuracy": {"min": 0.90}, "val_loss": {"max": 0.3}},
            champion_model="digits-classifier",
            min_improvement={"val_accuracy": 0.005},
            pass_task_ids="register",
            fail_task_ids="notify_rejected",
        )

    :param pass_task_ids: task id(s) to follow when every check passes.
    :param fail_task_ids: task id(s) to follow otherwise.
    :param metrics: the candidate's metrics, a dict of name -> number (templated; an XComArg such as
        ``train.output["metrics"]``, a dict, or its JSON / Python-literal string).
    :param run_id: the candidate's MLflow run (templated): shown in the report; without ``metrics`` its
        metrics are read from MLflow. Set ``metrics``, ``run_id`` or both.
    :param thresholds: absolute gates, ``{"val_accuracy": {"min": 0.9}, "val_loss": {"max": 0.3}}``
        (templated: a bound may be a Jinja string such as ``"{{ params.min_val_accuracy }}"``).
    :param champion_model: registered model whose alias holder is the champion to beat (templated).
    :param champion_alias: the alias naming the champion (templated).
    :param champion_metrics: like-for-like mode: the champion's metrics on the candidate's holdout
        (templated): the result ``gpu_trainer.evaluate`` wrote (``score_champion.output``; its ``run_id`` must
        be the alias holder's) or a dict of metric -> number. Empty metrics (the scorer found no model)
        or ``None`` while no version holds the alias mean there is no champion yet (``on_no_champion``
        decides); empty while a version holds it fails the task, since the gate would otherwise compare
        with numbers from other data. Needs ``champion_model``.
    :param min_improvement: metric -> how much better than the champion the candidate must be (absolute,
        or a fraction of the champion's value with ``relative_improvement``; negative tolerates a
        regression). When empty with ``champion_model`` set, the ``thresholds`` metrics must not be worse
        (templated, like ``thresholds``).
    :param relative_improvement: read ``min_improvement`` as fractions of the champion's value.
    :param higher_is_better: metric -> direction; by default a name containing ``loss`` or ``error`` is
        lower-is-better and any other higher-is-better.
    :param on_no_champion: ``"pass"`` (the first model may ship) or ``"fail"`` when no version holds the
        alias (or the registered model does not exist yet).
    :param on_missing_metric: ``"raise"`` (fail the task naming the metric and those that exist) or
        ``"fail_branch"`` (a failed check, routed to ``fail_task_ids``).
    :param mlflow_conn_id: the MLflow connection (used for ``run_id`` and ``champion_model``).
    """

    template_fields: Sequence[str] = (
        "metrics",
        "run_id",
        "thresholds",
        "champion_model",
        "champion_alias",
        "champion_metrics",
        "min_improvement",
    )
    ui_color = "#fdf1d6"

    def __init__(
        self,
        *,
        pass_task_ids: str | Sequence[str],
        fail_task_ids: str | Sequence[str],
        metrics: Any = None,
        run_id: Any = None,
        thresholds: dict[str, dict[str, float]] | None = None,
        champion_model: str | None = None,
        champion_alias: str = "champion",
        champion_metrics: Any = None,
        min_improvement: dict[str, float] | None = None,
        relative_improvement: bool = False,
        higher_is_better: dict[str, bool] | None = None,
        on_no_champion: str = "pass",
        on_missing_metric: str = "raise",
        mlflow_conn_id: str = MLflowHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.pass_task_ids = validate_task_ids(pass_task_ids, "pass_task_ids")
        self.fail_task_ids = validate_task_ids(fail_task_ids, "fail_task_ids")
        both = sorted(set(self.pass_task_ids) & set(self.fail_task_ids))
        if both:
            raise ValueError(
                f"task ids {both} are in both pass_task_ids and fail_task_ids; a branch is one or the other"
            )
        if metrics is None and run_id is None:
            raise ValueError(
                "set metrics (the candidate's metrics, e.g. train.output['metrics']), run_id (read them from "
                "MLflow), or both (the run id then only identifies the candidate in the report)"
            )
        if metrics is not None and not renders_later(metrics):
            parse_metrics(metrics)
        if (
            run_id is not None
            and not renders_later(run_id)
            and (not isinstance(run_id, str) or not run_id.strip())
        ):
            raise ValueError(f"run_id must be a non-empty MLflow run id, got {run_id!r}")
        self.metrics = metrics
        self.run_id = run_id
        self.thresholds = validate_metric_thresholds(thresholds, allow_templates=True)
        self.min_improvement = validate_min_improvement(min_improvement, allow_templates=True)
        self.higher_is_better = validate_higher_is_better(higher_is_better)
        if champion_model is not None and not renders_later(champion_model):
            validate_model_name(champion_model, "champion_model")
        if not renders_later(champion_alias):
            validate_alias(champion_alias, "champion_alias")
        if self.min_improvement and champion_model is None:
            raise ValueError(
                f"min_improvement {self.min_improvement} compares with a champion: set champion_model "
                "(the registered model whose alias holder is the champion)"
            )
        if champion_metrics is not None and champion_model is None:
            raise ValueError(
                "champion_metrics (the champion re-scored on the candidate's holdout) needs champion_model: "
                "the registered model whose alias holder was scored"
            )
        if champion_metrics is not None and not renders_later(champion_metrics):
            parse_rescore(champion_metrics)
        if not self.thresholds and champion_model is None:
            raise ValueError(
                "nothing to check: set thresholds, champion_model (with min_improvement), or both"
            )
        if not isinstance(relative_improvement, bool):
            raise ValueError(f"relative_improvement must be True or False, got {relative_improvement!r}")
        self.champion_model = champion_model
        self.champion_alias = champion_alias
        self.champion_metrics = champion_metrics
        # Decided here, before rendering: a template that renders to None (a skipped scoring task) must
        # not fall back silently to comparing with numbers from other data.
        self.like_for_like = champion_metrics is not None
        self.relative_improvement = relative_improvement
        self.on_no_champion = validate_choice("on_no_champion", on_no_champion, ON_NO_CHAMPION)
        self.on_missing_metric = validate_choice("on_missing_metric", on_missing_metric, ON_MISSING_METRIC)
        self.mlflow_conn_id = mlflow_conn_id

    @functools.cached_property
    def hook(self) -> MLflowHook:
        """The task's one MLflow hook: one connection look-up and one client per execution."""
        return MLflowHook(self.mlflow_conn_id)

    def choose_branch(self, context: Context) -> list[str]:
        """Evaluate the gates, log the table, push ``quality_report`` and return the branch."""
        report = self.quality_report()
        self.log.info(
            "Quality gate %s -> %s\n%s",
            "PASSED" if report["passed"] else "FAILED",
            report["branch"],
            report["table"],
        )
        context["ti"].xcom_push(key="quality_report", value=report)
        return list(report["branch"])

    def quality_report(self) -> dict[str, Any]:
        """Run every check on the (rendered) parameters and build the quality report.

        :return: ``{passed, branch, checks, candidate, champion, like_for_like, table}``; ``checks`` holds
            one dict per check (metric, check, value, threshold, champion_value, champion_recorded_value,
            required, improvement, verdict, detail); in like-for-like mode ``champion`` has ``metrics`` (as
            its run recorded them) and ``rescored`` (its metrics on the candidate's holdout, what it was
            scored on and the model URI).
        """
        needs_mlflow = self.metrics is None or self.champion_model is not None
        hook = self.hook if needs_mlflow else None
        if hook is not None:
            hook.ping()
        run_id = None if self.run_id is None else str(self.run_id).strip() or None
        if self.metrics is None:
            if hook is None or run_id is None:
                raise ValueError(
                    "run_id rendered empty: the candidate's MLflow run id is needed to read its metrics"
                )
            candidate = hook.registry.get_run_metrics(run_id)
        else:
            candidate = parse_metrics(self.metrics)
        rescore = None if self.champion_metrics is None else parse_rescore(self.champion_metrics)
        champion = None
        if hook is not None and self.champion_model is not None:
            name = validate_model_name(self.champion_model, "champion_model")
            alias = validate_alias(self.champion_alias, "champion_alias")
            champion = hook.registry.get_champion(name, alias)
            if champion is None:
                self.log.info("No version of model %r holds alias %r: there is no champion yet", name, alias)
        like_for_like = self.like_for_like
        if champion is not None and like_for_like:
            rescore = _matching_rescore(rescore, champion)
            champion = {**champion, "rescored": rescore.as_dict()}
        checks: list[Check] = run_gate_checks(
            candidate,
            thresholds=validate_metric_thresholds(self.thresholds),
            champion=champion,
            compare_with_champion=self.champion_model is not None,
            min_improvement=validate_min_improvement(self.min_improvement),
            relative_improvement=self.relative_improvement,
            higher_is_better=self.higher_is_better,
            on_no_champion=self.on_no_champion,
            on_missing_metric=self.on_missing_metric,
            rescored=rescore.metrics if champion is not None and rescore is not None else None,
        )
        passed = all(check.passed for check in checks)
        return {
            "passed": passed,
            "branch": self.pass_task_ids if passed else self.fail_task_ids,
            "checks": [check.as_dict() for check in checks],
            "candidate": {"run_id": run_id, "metrics": candidate},
            "champion": champion,
            "like_for_like": like_for_like,
            "table": render_table(checks),
        }


def _matching_rescore(rescore: Rescore | None, champion: dict[str, Any]) -> Rescore:
    """The re-score of the alias holder; refuses one that is missing or belongs to another version.

    :param rescore: the parsed ``champion_metrics`` (None or empty when nothing was scored).
    :param champion: the alias holder, from the registry.
    :raises AirflowException: naming both sides.
    """
    holder = f"version {champion['version']} of {champion['name']!r} (run {champion['run_id']})"
    if rescore is None or not rescore.metrics:
        raise AirflowException(
            f"champion_metrics is empty but {holder} holds alias {champion['alias']!r}: the champion was not "
            "scored on the candidate's holdout (was it registered after the scoring task ran, or did the "
            "scorer not find it?); comparing with its recorded metrics would compare numbers from other data"
        )
    if rescore.run_id and champion.get("run_id") and rescore.run_id != champion["run_id"]:
        raise AirflowException(
            f"champion_metrics were scored on the model of run {rescore.run_id} ({rescore.model_uri}), but "
            f"{holder} holds alias {champion['alias']!r} now: the alias moved between scoring and gating"
        )
    return rescore
