"""ModelQualityBranchOperator: the quality gate between training and registration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.branch import BaseBranchOperator

from airflow_provider_mltrain.hooks.mlflow import MLflowHook
from airflow_provider_mltrain.operators._mlflow_names import is_template, validate_alias, validate_model_name
from airflow_provider_mltrain.operators._quality_checks import (
    ON_MISSING_METRIC,
    ON_NO_CHAMPION,
    Check,
    evaluate,
    parse_metrics,
    render_table,
    validate_choice,
    validate_higher_is_better,
    validate_min_improvement,
    validate_task_ids,
    validate_thresholds,
)

if TYPE_CHECKING:
    from airflow.sdk import Context


class ModelQualityBranchOperator(BaseBranchOperator):
    """Route to ``pass_task_ids`` when a candidate model meets every gate, else to ``fail_task_ids``.

    Gates are absolute ``thresholds`` and, with ``champion_model``, an improvement over the metrics of the
    run behind the version holding ``champion_alias``. Every decision is explained: a table in the task
    log and the XCom ``quality_report`` (each check, its value, bound or champion value, and verdict).

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
        ``train.output["metrics"]``, a dict, or its JSON / Python-literal string). Exclusive with ``run_id``.
    :param run_id: read the candidate's metrics from this MLflow run instead (templated).
    :param thresholds: absolute gates, ``{"val_accuracy": {"min": 0.9}, "val_loss": {"max": 0.3}}``
        (templated: a bound may be a Jinja string such as ``"{{ params.min_val_accuracy }}"``).
    :param champion_model: registered model whose alias holder is the champion to beat (templated).
    :param champion_alias: the alias naming the champion (templated).
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
        if (metrics is None) == (run_id is None):
            raise ValueError(
                "set exactly one of metrics (the candidate's metrics, e.g. train.output['metrics']) or run_id "
                f"(read them from MLflow); got metrics={metrics!r:.100}, run_id={run_id!r}"
            )
        if metrics is not None and not is_template(metrics):
            parse_metrics(metrics)
        if (
            run_id is not None
            and not is_template(run_id)
            and (not isinstance(run_id, str) or not run_id.strip())
        ):
            raise ValueError(f"run_id must be a non-empty MLflow run id, got {run_id!r}")
        self.metrics = metrics
        self.run_id = run_id
        self.thresholds = validate_thresholds(thresholds, allow_templates=True)
        self.min_improvement = validate_min_improvement(min_improvement, allow_templates=True)
        self.higher_is_better = validate_higher_is_better(higher_is_better)
        if champion_model is not None and not is_template(champion_model):
            validate_model_name(champion_model, "champion_model")
        if not is_template(champion_alias):
            validate_alias(champion_alias, "champion_alias")
        if self.min_improvement and champion_model is None:
            raise ValueError(
                f"min_improvement {self.min_improvement} compares with a champion: set champion_model "
                "(the registered model whose alias holder is the champion)"
            )
        if not self.thresholds and champion_model is None:
            raise ValueError(
                "nothing to check: set thresholds, champion_model (with min_improvement), or both"
            )
        if not isinstance(relative_improvement, bool):
            raise ValueError(f"relative_improvement must be True or False, got {relative_improvement!r}")
        self.champion_model = champion_model
        self.champion_alias = champion_alias
        self.relative_improvement = relative_improvement
        self.on_no_champion = validate_choice("on_no_champion", on_no_champion, ON_NO_CHAMPION)
        self.on_missing_metric = validate_choice("on_missing_metric", on_missing_metric, ON_MISSING_METRIC)
        self.mlflow_conn_id = mlflow_conn_id

    def choose_branch(self, context: Context) -> list[str]:
        """Evaluate the gates, log the table, push ``quality_report`` and return the branch."""
        report = self.evaluate()
        self.log.info(
            "Quality gate %s -> %s\n%s",
            "PASSED" if report["passed"] else "FAILED",
            report["branch"],
            report["table"],
        )
        context["ti"].xcom_push(key="quality_report", value=report)
        return list(report["branch"])

    def evaluate(self) -> dict[str, Any]:
        """Run every check on the (rendered) parameters and build the quality report.

        :return: ``{passed, branch, checks, candidate, champion, table}``; ``checks`` holds one dict per
            check (metric, check, value, threshold, champion_value, required, improvement, verdict, detail).
        """
        needs_mlflow = self.run_id is not None or self.champion_model is not None
        hook = MLflowHook(self.mlflow_conn_id) if needs_mlflow else None
        if hook is not None:
            hook.ping()
        run_id = None
        if hook is not None and self.run_id is not None:
            run_id = str(self.run_id).strip()
            if not run_id:
                raise ValueError(
                    "run_id rendered empty: the candidate's MLflow run id is needed to read its metrics"
                )
            candidate = hook.get_run_metrics(run_id)
        else:
            candidate = parse_metrics(self.metrics)
        champion = None
        if hook is not None and self.champion_model is not None:
            name = validate_model_name(self.champion_model, "champion_model")
            alias = validate_alias(self.champion_alias, "champion_alias")
            champion = hook.get_champion(name, alias)
            if champion is None:
                self.log.info("No version of model %r holds alias %r: there is no champion yet", name, alias)
        checks: list[Check] = evaluate(
            candidate,
            thresholds=validate_thresholds(self.thresholds),
            champion=champion,
            compare_with_champion=self.champion_model is not None,
            min_improvement=validate_min_improvement(self.min_improvement),
            relative_improvement=self.relative_improvement,
            higher_is_better=self.higher_is_better,
            on_no_champion=self.on_no_champion,
            on_missing_metric=self.on_missing_metric,
        )
        passed = all(check.passed for check in checks)
        return {
            "passed": passed,
            "branch": self.pass_task_ids if passed else self.fail_task_ids,
            "checks": [check.as_dict() for check in checks],
            "candidate": {"run_id": run_id, "metrics": candidate},
            "champion": champion,
            "table": render_table(checks),
        }
