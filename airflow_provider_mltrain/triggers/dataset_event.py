"""DatasetEventTrigger: start a DAG when a dataset partition is complete (Airflow 3 event-driven scheduling).

Used in an ``AssetWatcher``, it runs on the triggerer for as long as the DAG is deployed and fires one event
per newly complete partition of ``s3://bucket/prefix/{partition}/...`` or ``/data/prefix/{partition}/...``.
"Complete" is what it is for :class:`~airflow_provider_mltrain.sensors.dataset.DatasetSensor`
(:mod:`airflow_provider_mltrain.datasets.completeness`), plus ``settle_seconds``.

Once per partition: before it fires, the trigger creates the claim object
``<partition>/_MLTRAIN_CLAIMED.<consumer>`` with a create-only write (S3 ``If-None-Match: *``, local
``O_EXCL``; see :mod:`airflow_provider_mltrain.datasets.claims`). A partition whose listing shows the claim is
skipped, so a restarted triggerer fires nothing again, and of two triggerers that see a partition complete at
the same instant only the one whose write succeeds fires.

Listing is shared: on Airflow 3.3+ the watchers of one prefix, connection and interval form one shared
stream (``shared_stream_key``), one poll loop whose listings every watcher filters; on every version the
listings of one triggerer go through the listing coordinator
(:mod:`airflow_provider_mltrain.datasets.listing_coordinator`), which answers the prefixes of one bucket
with one ``ListObjectsV2``. On Airflow 3.2 (no shared streams) each watcher runs :meth:`run`, which is the
same poll and filter in one coroutine.

The classpath ``airflow_provider_mltrain.triggers.dataset_event.DatasetEventTrigger`` is stored with every
asset watcher: it must not move.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Hashable
from contextlib import AsyncExitStack
from datetime import datetime, timezone
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from airflow_provider_mltrain.datasets.claims import (
    claim_key,
    claim_local,
    claim_s3,
    is_claim_key,
    validate_consumer,
)
from airflow_provider_mltrain.datasets.completeness import (
    Criteria,
    apply_criteria,
    parse_modified_after,
    validate_completeness_thresholds,
    validate_settle_seconds,
)
from airflow_provider_mltrain.datasets.listing import DatasetError, ObjectInfo, TransientDatasetError
from airflow_provider_mltrain.datasets.listing_coordinator import coordinator
from airflow_provider_mltrain.datasets.partitions import fingerprint, parse_partitioned_uri
from airflow_provider_mltrain.datasets.s3_client_pool import shared_s3_client
from airflow_provider_mltrain.triggers.dataset import _until_next_tick

#: Whether this Airflow runs event triggers through shared streams (3.3+); on 3.2 every watcher polls in
#: its own run(), still coalesced by the listing coordinator.
SHARED_STREAMS = hasattr(BaseEventTrigger, "open_shared_stream")
#: The shortest poll interval: each poll is one LIST request (billed) per shared prefix.
MIN_POKE_INTERVAL_SECONDS = 1.0


class DatasetEventTrigger(BaseEventTrigger):
    """Fires once for every partition of ``uri`` that becomes complete; never twice for one partition.

    Event payload: ``partition``, ``uri`` (the partition's dataset URI, what a DatasetSensor would wait
    for), ``location`` (the partition's directory), ``fingerprint`` (the success marker's ``etag:<ETag>@<LastModified>`` on S3
    or ``mtime:...`` locally; without a marker a digest of the objects), ``success_marker``,
    ``total_objects``, ``total_bytes``, ``claim`` (the claim object's URI), ``consumer``. Airflow stores it
    in the asset event's extra under ``payload``.

    :param uri: the partitioned dataset, e.g. ``s3://ml-datasets/digits/{partition}/*.parquet`` or
        ``/data/digits/{partition}/``: ``{partition}`` is one path segment, the rest as for DatasetSensor
    :param consumer: names the claim object (``_MLTRAIN_CLAIMED.<consumer>``): watchers with the same
        consumer share each partition once between them, different consumers each get it once. Usually the
        AssetWatcher's name.
    :param aws_conn_id: Amazon connection for ``s3://`` (its extra's ``endpoint_url`` is honoured); it needs
        ``s3:ListBucket`` and ``s3:PutObject`` (the claim) on the prefix
    :param region_name: overrides the connection's region
    :param min_objects: a partition needs at least this many matching objects
    :param min_total_bytes: ... adding up to at least this many bytes
    :param success_marker: a file in the partition directory that must exist, e.g. ``_SUCCESS``
    :param settle_seconds: the newest object (and marker) must be at least this old, so a writer still
        uploading is not caught half way (measured against the store's LastModified)
    :param modified_after: ISO 8601; older objects do not count, e.g. the day the watcher was deployed, so
        that partitions already there are not all trained on at once
    :param poke_interval: seconds between listings (at least 1)
    """

    def __init__(
        self,
        uri: str,
        consumer: str,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        min_objects: int = 1,
        min_total_bytes: int = 0,
        success_marker: str | None = None,
        settle_seconds: float = 0.0,
        modified_after: str | None = None,
        poke_interval: float = 60.0,
    ) -> None:
        super().__init__()
        self.uri = uri
        self.consumer = consumer
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self.min_objects = min_objects
        self.min_total_bytes = min_total_bytes
        self.success_marker = success_marker
        self.settle_seconds = settle_seconds
        self.modified_after = modified_after
        self.poke_interval = poke_interval
        self.dataset = parse_partitioned_uri(uri)
        validate_consumer(consumer)
        validate_completeness_thresholds(min_objects, min_total_bytes, success_marker)
        validate_settle_seconds(settle_seconds)
        if (
            isinstance(poke_interval, bool)
            or not isinstance(poke_interval, (int, float))
            or poke_interval < MIN_POKE_INTERVAL_SECONDS
        ):
            raise ValueError(
                f"poke_interval={poke_interval!r} is invalid: expected at least "
                f"{MIN_POKE_INTERVAL_SECONDS:g} second(s) between listings."
            )
        self.criteria = Criteria(
            min_objects, min_total_bytes, success_marker, parse_modified_after(modified_after), settle_seconds
        )
        # Partitions this instance claimed or saw claimed: no second write for them while it runs.
        self._settled: set[str] = set()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "uri": self.uri,
                "consumer": self.consumer,
                "aws_conn_id": self.aws_conn_id,
                "region_name": self.region_name,
                "min_objects": self.min_objects,
                "min_total_bytes": self.min_total_bytes,
                "success_marker": self.success_marker,
                "settle_seconds": self.settle_seconds,
                "modified_after": self.modified_after,
                "poke_interval": self.poke_interval,
            },
        )

    # -- the shared stream (Airflow 3.3+; on 3.2 run() composes the same two halves) ----------------

    def shared_stream_key(self) -> Hashable | None:
        """Watchers of one prefix, connection and interval share one poll loop (Airflow 3.3+)."""
        return (
            "mltrain-dataset-partitions",
            self.dataset.scheme,
            self.dataset.bucket,
            self.dataset.prefix,
            self.aws_conn_id,
            self.region_name,
            float(self.poke_interval),
        )

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """Yield one ``(listed_at, objects or None)`` per poll, forever; ``None`` when the listing failed.

        Uses only the fields of :meth:`shared_stream_key`. Failures are logged and polled again: a watcher
        has no task to fail, and a bucket may well appear later.
        """
        trigger = cls(**kwargs)
        async for listing in trigger._listings():
            yield listing

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """Turn each listing into an event for every partition this consumer may now claim."""
        async with AsyncExitStack() as stack:
            client = None
            if self.dataset.scheme == "s3":
                client = await stack.enter_async_context(shared_s3_client(self.aws_conn_id, self.region_name))
            async for listed_at, objects in shared_stream:
                if objects is None:
                    continue
                # Each event leaves right after its claim, so a cancellation (triggerer shutdown) between
                # two partitions' claims cannot strand a claimed partition without its event.
                async for payload in self._claim_newly_complete(client, objects, listed_at):
                    yield TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Airflow 3.2, or a caller outside the triggerer: poll and filter in one coroutine."""
        async for event in self.filter_shared_stream(self._listings()):
            yield event

    # -- polling --------------------------------------------------------------------------------------

    async def _listings(self) -> AsyncIterator[tuple[datetime, list[ObjectInfo] | None]]:
        async with AsyncExitStack() as stack:
            if self.dataset.scheme == "s3":
                client = await stack.enter_async_context(shared_s3_client(self.aws_conn_id, self.region_name))

                def lister() -> Any:
                    return coordinator().list_s3(client, self.dataset.bucket, self.dataset.prefix)
            else:
                root = self.dataset.listing_root()

                def lister() -> Any:
                    return coordinator().list_local(root)

            failures = 0
            while True:
                listed_at = datetime.now(timezone.utc)
                try:
                    objects: list[ObjectInfo] | None = await lister()
                    failures = 0
                except (DatasetError, TransientDatasetError) as e:
                    objects = None
                    failures += 1
                    # Every poll fails alike during an outage: say so on the first and then every 10th.
                    if failures == 1 or failures % 10 == 0:
                        self.log.error("Listing %s failed (%d in a row): %s", self.uri, failures, e)
                yield listed_at, objects
                await asyncio.sleep(_until_next_tick(float(self.poke_interval)))

    # -- filtering ------------------------------------------------------------------------------------

    async def _claim_newly_complete(
        self, client: Any, objects: list[ObjectInfo], listed_at: datetime
    ) -> AsyncIterator[dict[str, Any]]:
        for partition, found in sorted(self.dataset.group(objects).items()):
            if partition in self._settled:
                continue
            location = self.dataset.partition_location(partition)
            claim = claim_key(location.root, self.consumer)
            if any(o.key == claim for o in found):
                self._settled.add(partition)
                continue
            summary = apply_criteria(
                location, [o for o in found if not is_claim_key(o.key)], self.criteria, listed_at
            )
            if not summary["complete"]:
                continue
            marker_key = location.marker_base + self.success_marker if self.success_marker else None
            marker = next((o for o in found if o.key == marker_key), None)
            payload = {
                "partition": partition,
                "uri": self.dataset.partition_uri(partition),
                "location": location.object_uri(location.root),
                "fingerprint": fingerprint(summary["objects"], marker),
                "success_marker": summary["success_marker"],
                "total_objects": summary["total_objects"],
                "total_bytes": summary["total_bytes"],
                "claim": location.object_uri(claim),
                "consumer": self.consumer,
            }
            claimed = await self._claim(client, claim, payload)
            if claimed is None:
                continue  # the write failed: the next poll tries again
            self._settled.add(partition)
            if claimed:
                self.log.info("Partition %s complete and claimed: %s", partition, payload["fingerprint"])
                yield payload
            else:
                self.log.info("Partition %s complete but already claimed by another watcher", partition)

    async def _claim(self, client: Any, key: str, payload: dict[str, Any]) -> bool | None:
        """True: this call created the claim; False: someone else holds it; None: the write failed."""
        body = {
            **payload,
            "claimed_at": datetime.now(timezone.utc).isoformat(),
            "claimed_by": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "trigger_id": self.trigger_id,
                "triggerer_job_id": getattr(self, "triggerer_job_id", None),
            },
        }
        try:
            if self.dataset.scheme == "s3":
                return await claim_s3(client, self.dataset.bucket, key, body)
            return await claim_local(key, body)
        except (DatasetError, TransientDatasetError) as e:
            self.log.error("Could not write the claim %s (%s); trying again at the next poll", key, e)
            return None
