"""Operator extra links into the MLflow UI.

The operator stores the finished URL in XCom while it runs (it has the connection then); the link only
reads it back, so rendering a task page never opens an MLflow connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


class _XComUrlLink(BaseOperatorLink):
    """A link whose URL the operator pushed to XCom under :attr:`key`."""

    name: ClassVar[str]
    key: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        if ti_key.map_index is None or ti_key.map_index < 0:
            # Airflow resolves every extra link when a task ends, also when it failed before pushing the
            # URL; a single-value read of a missing XCom logs "XCom not found" at ERROR level, while the
            # list read answers "none" quietly. An unmapped task has one value under the key.
            values = XCom.get_all(
                key=self.key, dag_id=ti_key.dag_id, task_id=ti_key.task_id, run_id=ti_key.run_id
            )
            url = values[0] if values else None
        else:
            # A mapped task's list mixes all map indexes; operators push "" when they start (see
            # persist), so the value exists by the time the task can fail.
            url = XCom.get_value(key=self.key, ti_key=ti_key)
        return url if isinstance(url, str) else ""

    @classmethod
    def persist(cls, context: Any, url: str) -> None:
        """Store the link's URL for this task instance.

        Operators call it with ``""`` as their first step and with the URL once they know it. An empty URL
        (a connection without a UI, e.g. a local store) is stored too: Airflow resolves every extra link
        when the task ends, and reading a missing XCom is logged as an error there.

        :param context: the task's context.
        :param url: the full URL, or ``""``.
        """
        context["ti"].xcom_push(key=cls.key, value=url or "")


class MLflowRunLink(_XComUrlLink):
    """The "MLflow run" link: the training run behind a task (GPUTrainingPodOperator)."""

    name = "MLflow run"
    key = "mlflow_run_url"


class MLflowModelVersionLink(_XComUrlLink):
    """The "MLflow model version" link: the version a task registered or found (MLflowRegisterOperator)."""

    name = "MLflow model version"
    key = "mlflow_model_version_url"
