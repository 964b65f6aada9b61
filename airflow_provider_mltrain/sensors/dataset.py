"""DatasetSensor: wait for a complete training dataset on S3 or local disk.

Deferrable by default, unlike most Airflow sensors: training data typically lands hours after a DAG
run starts, and a poking sensor would hold a worker slot for all of that time. Deferred, the wait costs
a coroutine on the triggerer (which runs ~1,000 of them per process) and no worker at all. Pass
``deferrable=False`` (with ``mode="reschedule"`` or ``"poke"``) on deployments without a triggerer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from airflow.exceptions import AirflowException
from airflow.sdk.bases.sensor import BaseSensorOperator, PokeReturnValue

from airflow_provider_mltrain._templating import is_jinja_template
from airflow_provider_mltrain.datasets.completeness import (
    Criteria,
    check_dataset_once,
    parse_modified_after,
    validate_completeness_thresholds,
)
from airflow_provider_mltrain.datasets.listing import DatasetError, TransientDatasetError
from airflow_provider_mltrain.datasets.location import SUPPORTED_SCHEMES, parse_dataset_uri
from airflow_provider_mltrain.triggers.dataset import DatasetTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

try:  # Airflow >= 3.1 keeps the sensor exceptions in the task SDK
    from airflow.sdk.exceptions import AirflowSensorTimeout
except ImportError:  # pragma: no cover - Airflow 3.0
    from airflow.exceptions import AirflowSensorTimeout  # type: ignore[no-redef]

#: Seconds the scheduler waits past the trigger's own deadline before timing the deferral out itself;
#: the trigger's timeout event (which says what was missing) normally wins.
DEFERRAL_GRACE_SECONDS = 60
#: The shortest ``poke_interval`` accepted: below it a sensor lists its store in a near-busy loop (one S3
#: LIST request per interval per sensor, each billed, or a spinning worker in poke mode).
MIN_POKE_INTERVAL_SECONDS = 1.0


class DatasetSensor(BaseSensorOperator):
    """Wait until a dataset is complete; return (XCom) exactly which objects it consists of.

    The return value is ``{"uri", "objects": [{"uri", "size", "modified", "etag"}], "total_objects",
    "total_bytes", "success_marker"}``. With ``outlets=[Asset(...)]``, Airflow emits the asset event on
    success; this sensor adds ``uri``, ``total_objects`` and ``total_bytes`` to the event's extra.

    :param uri: the dataset, e.g. ``s3://ml-datasets/daily/{{ ds }}/`` or
        ``file:///data/daily/{{ ds }}/*.parquet``; ``*``/``?``/``[..]`` match within one path segment,
        ``**`` across segments, a trailing ``/`` means everything below (templated)
    :param aws_conn_id: Amazon provider connection for ``s3://`` URIs; an ``endpoint_url`` in its extra
        (MinIO, moto, ...) is honoured
    :param region_name: overrides the connection's region
    :param min_objects: at least this many matching objects (default 1)
    :param min_total_bytes: the matching objects add up to at least this many bytes (default 0)
    :param success_marker: a file in the dataset directory that must exist too, e.g. ``_SUCCESS``;
        it is not counted as data
    :param modified_after: objects last modified before this instant do not count, e.g.
        ``"{{ data_interval_start }}"`` (templated)
    :param deferrable: wait on the triggerer (default True, see the module docstring)
    :param max_retries: consecutive transient S3 failures (5xx, throttling, resets) survived while
        deferred before the task fails
    :param kwargs: :class:`~airflow.sdk.bases.sensor.BaseSensorOperator` arguments (``poke_interval``,
        at least ``MIN_POKE_INTERVAL_SECONDS``; ``timeout``, ``soft_fail``, ``mode`` ...)
    """

    template_fields: Sequence[str] = ("uri", "modified_after")
    ui_color = "#d5f0e3"

    def __init__(
        self,
        *,
        uri: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        min_objects: int = 1,
        min_total_bytes: int = 0,
        success_marker: str | None = None,
        modified_after: str | datetime | None = None,
        deferrable: bool = True,
        max_retries: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # The parent normalised poke_interval (a timedelta or a number) to seconds.
        if self.poke_interval < MIN_POKE_INTERVAL_SECONDS:
            raise ValueError(
                f"poke_interval={kwargs.get('poke_interval', self.poke_interval)!r} is invalid: expected at least "
                f"{MIN_POKE_INTERVAL_SECONDS:g} second(s) between checks (each check lists the dataset)."
            )
        validate_completeness_thresholds(min_objects, min_total_bytes, success_marker)
        if not is_jinja_template(uri):
            parse_dataset_uri(uri)
        elif (
            "://" in uri
            and not is_jinja_template(scheme := uri.split("://", 1)[0])
            and scheme.lower() not in SUPPORTED_SCHEMES
        ):
            # The scheme is known before rendering: reject gs://, hdfs://... at DAG parse time.
            parse_dataset_uri(uri)  # raises the "unsupported scheme" error
        if not is_jinja_template(modified_after):
            parse_modified_after(modified_after)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} is invalid: expected an integer >= 0.")
        if not isinstance(deferrable, bool):
            raise ValueError(f"deferrable={deferrable!r} is invalid: expected True or False.")
        self.uri = uri
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.min_objects = min_objects
        self.min_total_bytes = min_total_bytes
        self.success_marker = success_marker
        self.modified_after = modified_after
        self.deferrable = deferrable
        self.max_retries = max_retries

    def _criteria(self) -> Criteria:
        return Criteria(
            self.min_objects,
            self.min_total_bytes,
            self.success_marker,
            parse_modified_after(self.modified_after),
        )

    def _check(self) -> dict[str, Any]:
        parse_dataset_uri(self.uri)  # the rendered value; raises a clear ValueError
        try:
            return asyncio.run(
                check_dataset_once(self.uri, self._criteria(), self.aws_conn_id, self.region_name)
            )
        except DatasetError as e:
            raise AirflowException(f"{self.task_id}: {e}") from e

    def poke(self, context: Context) -> PokeReturnValue:
        try:
            summary = self._check()
        except TransientDatasetError as e:
            # Between pokes the next poke is the retry; the sensor's timeout bounds it.
            self.log.warning("Transient error checking %s: %s", self.uri, e)
            return PokeReturnValue(is_done=False)
        if not summary["complete"]:
            self.log.info("Dataset %s not complete yet: %s", self.uri, ", ".join(summary["missing"]))
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value=self._finish(context, summary))

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        # One check on the worker first: data that is already there needs no trip to the triggerer.
        poked = self.poke(context)
        if poked.is_done:
            return poked.xcom_value
        deadline = datetime.now(timezone.utc) + timedelta(seconds=self.timeout)
        modified_after = parse_modified_after(self.modified_after)
        self.defer(
            trigger=DatasetTrigger(
                uri=self.uri,
                aws_conn_id=self.aws_conn_id,
                region_name=self.region_name,
                min_objects=self.min_objects,
                min_total_bytes=self.min_total_bytes,
                success_marker=self.success_marker,
                modified_after=modified_after.isoformat() if modified_after else None,
                poke_interval=self.poke_interval,
                deadline=deadline.isoformat(),
                max_retries=self.max_retries,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + DEFERRAL_GRACE_SECONDS),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired; a failure raises (``soft_fail`` turns it into a skip)."""
        if not event:
            raise AirflowException(f"{self.task_id}: the trigger returned no event for {self.uri}.")
        status = event.get("status")
        if status == "timeout":
            raise AirflowSensorTimeout(event.get("message", f"Timed out waiting for {self.uri}."))
        if status != "success":
            raise AirflowException(f"{self.task_id}: {event.get('message')} (cause: {event.get('cause')})")
        summary = {k: v for k, v in event.items() if k != "status"}
        return self._finish(context, summary)

    def _finish(self, context: Context, summary: dict[str, Any]) -> dict[str, Any]:
        result = {
            "uri": self.uri,
            "objects": summary["objects"],
            "total_objects": summary["total_objects"],
            "total_bytes": summary["total_bytes"],
            "success_marker": summary.get("success_marker"),
        }
        self.log.info(
            "Dataset %s complete: %d objects, %d bytes",
            self.uri,
            result["total_objects"],
            result["total_bytes"],
        )
        self._annotate_asset_events(context, result)
        return result

    def _annotate_asset_events(self, context: Context, result: dict[str, Any]) -> None:
        from airflow.sdk import Asset

        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        for outlet in self.outlets or ():
            if isinstance(outlet, Asset):
                # Totals only: the full object list is in XCom; asset extras should stay small.
                outlet_events[outlet].extra.update(
                    {
                        "uri": result["uri"],
                        "total_objects": result["total_objects"],
                        "total_bytes": result["total_bytes"],
                    }
                )
