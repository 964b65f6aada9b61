"""DatasetTrigger: wait, on the triggerer, until a dataset on S3 or local disk is complete.

What "complete" means is :mod:`airflow_provider_mltrain.datasets.completeness`. The event carries exactly
what matched, so downstream tasks and lineage know what was trained on.

The loop never blocks: S3 goes through one shared aiobotocore client per connection (see
:mod:`airflow_provider_mltrain.datasets.s3_client_pool`), local listings run in ``asyncio.to_thread``.
The triggers of one triggerer poll on a shared clock and list through one coordinator per event loop
(:mod:`airflow_provider_mltrain.datasets.listing_coordinator`), which answers many datasets under a
common prefix with one listing.

The classpath ``airflow_provider_mltrain.triggers.dataset.DatasetTrigger`` is stored with every deferred
task: it must not move.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_mltrain.datasets.completeness import (
    Criteria,
    apply_criteria,
    parse_modified_after,
    validate_completeness_thresholds,
)
from airflow_provider_mltrain.datasets.listing import DatasetError, TransientDatasetError
from airflow_provider_mltrain.datasets.listing_coordinator import coordinator
from airflow_provider_mltrain.datasets.location import listing_prefix, parse_dataset_uri
from airflow_provider_mltrain.datasets.s3_client_pool import shared_s3_client


def _until_next_tick(poke_interval: float) -> float:
    """Seconds until the next multiple of ``poke_interval`` on the wall clock.

    Triggers with the same interval then poll at the same instants, whenever each started, so the
    listing coordinator can answer a whole cycle with few requests. A trigger still polls at least
    once per interval.
    """
    if poke_interval <= 0:
        return 0.0
    return poke_interval - (time.time() % poke_interval)


class DatasetTrigger(BaseTrigger):
    """Fires once the dataset at ``uri`` is complete, the deadline passes, or an error is permanent.

    Event payloads (``status``): ``success`` with ``objects`` (uri, size, modified, etag),
    ``total_objects``, ``total_bytes``, ``success_marker``; ``timeout`` with what was missing;
    ``error`` with ``message`` and ``cause``.

    :param uri: rendered dataset URI (``s3://bucket/prefix/*.parquet``, ``file:///data/x/``)
    :param aws_conn_id: Amazon connection for ``s3://`` (its extra's ``endpoint_url`` is honoured)
    :param region_name: overrides the connection's region
    :param min_objects: at least this many matching objects
    :param min_total_bytes: their sizes add up to at least this
    :param success_marker: a file in the dataset directory that must exist (e.g. ``_SUCCESS``)
    :param modified_after: ISO 8601; objects modified earlier do not count
    :param poke_interval: seconds between listings
    :param deadline: ISO 8601 instant after which a ``timeout`` event fires. Absolute, so a restarted
        triggerer keeps the original deadline instead of starting the wait over.
    :param max_retries: consecutive transient failures (5xx, throttling, resets) survived before an
        ``error`` event
    :param retry_backoff: first retry delay in seconds; doubles per retry, capped at ``poke_interval``
    """

    def __init__(
        self,
        uri: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        min_objects: int = 1,
        min_total_bytes: int = 0,
        success_marker: str | None = None,
        modified_after: str | None = None,
        poke_interval: float = 60.0,
        deadline: str | None = None,
        max_retries: int = 5,
        retry_backoff: float = 1.0,
    ) -> None:
        super().__init__()
        self.uri = uri
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.min_objects = min_objects
        self.min_total_bytes = min_total_bytes
        self.success_marker = success_marker
        self.modified_after = modified_after
        self.poke_interval = float(poke_interval)
        self.deadline = deadline
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        # Validate here too: a trigger can be built by hand, and the triggerer should fail fast.
        self.location = parse_dataset_uri(uri)
        validate_completeness_thresholds(min_objects, min_total_bytes, success_marker)
        self.criteria = Criteria(
            min_objects, min_total_bytes, success_marker, parse_modified_after(modified_after)
        )
        self._deadline = parse_modified_after(deadline, param="deadline")

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "uri": self.uri,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
                "min_objects": self.min_objects,
                "min_total_bytes": self.min_total_bytes,
                "success_marker": self.success_marker,
                "modified_after": self.modified_after,
                "poke_interval": self.poke_interval,
                "deadline": self.deadline,
                "max_retries": self.max_retries,
                "retry_backoff": self.retry_backoff,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            if self.location.scheme == "s3":
                # One client per trigger run (shared with the other triggers of this connection),
                # never one per poll.
                async with shared_s3_client(self.aws_conn_id, self.region_name) as client:
                    prefix = listing_prefix(self.location)
                    event = await self._wait(
                        lambda: coordinator().list_s3(client, self.location.bucket, prefix)
                    )
            else:
                event = await self._wait(lambda: coordinator().list_local(self.location))
        except Exception as e:
            event = self._error(f"{type(e).__name__}: {e}", e)
        yield TriggerEvent(event)

    async def _wait(self, lister) -> dict[str, Any]:
        failures = 0
        summary: dict[str, Any] | None = None
        while True:
            try:
                objects = await lister()
                summary = apply_criteria(self.location, objects, self.criteria)
                failures = 0
            except DatasetError as e:
                return self._error(str(e), e)
            except TransientDatasetError as e:
                failures += 1
                if failures > self.max_retries:
                    return self._error(f"gave up after {failures} consecutive transient failures: {e}", e)
                delay = min(self.retry_backoff * 2 ** (failures - 1), max(self.poke_interval, 1.0))
                # Jitter keeps a thousand triggers hit by the same outage from retrying in lockstep.
                delay *= random.uniform(0.8, 1.2)
                self.log.warning(
                    "Transient error listing %s (%s); retry %d in %.1fs", self.uri, e, failures, delay
                )
                await asyncio.sleep(self._until_deadline(delay))
                if self._expired():
                    return self._timeout(summary)
                continue
            if summary["complete"]:
                summary.pop("complete")
                summary.pop("missing")
                return {"status": "success", "uri": self.uri, **summary}
            if self._expired():
                return self._timeout(summary)
            self.log.debug("Dataset %s not complete: %s", self.uri, ", ".join(summary["missing"]))
            await asyncio.sleep(self._until_deadline(_until_next_tick(self.poke_interval)))

    def _until_deadline(self, delay: float) -> float:
        if self._deadline is None:
            return delay
        return max(0.0, min(delay, (self._deadline - datetime.now(timezone.utc)).total_seconds()))

    def _expired(self) -> bool:
        return self._deadline is not None and datetime.now(timezone.utc) >= self._deadline

    def _timeout(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        missing = ", ".join(summary["missing"]) if summary else "no successful listing"
        return {
            "status": "timeout",
            "uri": self.uri,
            "message": f"Dataset {self.uri} not complete by {self.deadline}: {missing}.",
            "found_objects": summary["total_objects"] if summary else 0,
            "found_bytes": summary["total_bytes"] if summary else 0,
        }

    def _error(self, message: str, cause: BaseException) -> dict[str, Any]:
        root = cause.__cause__ or cause
        return {
            "status": "error",
            "uri": self.uri,
            "message": f"Waiting for {self.uri} failed: {message}",
            "cause": f"{type(root).__name__}: {root}",
        }
