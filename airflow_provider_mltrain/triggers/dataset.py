"""DatasetTrigger: wait, on the triggerer, until a dataset on S3 or local disk is complete.

"Complete" means: at least ``min_objects`` objects match the URI's glob, together at least
``min_total_bytes`` bytes, the ``success_marker`` (if any) exists, and only objects modified at or after
``modified_after`` count. The event carries exactly what matched, so downstream tasks and lineage know
what was trained on.

The loop never blocks: S3 goes through one shared aiobotocore client per connection (see
:mod:`airflow_provider_mltrain.triggers.s3_client_pool`), local listings run in ``asyncio.to_thread``.
The triggers of one triggerer poll on a shared clock and list through one coordinator per event loop
(:mod:`airflow_provider_mltrain.triggers.listing_coordinator`), which answers many datasets under a
common prefix with one listing.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_mltrain.triggers.listing_coordinator import coordinator

SUPPORTED_SCHEMES = ("s3", "file")
_GLOB_CHARS = re.compile(r"[*?\[]")
# S3 error codes that mean "try again later" rather than "this will never work".
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)


#: Keys per ListObjectsV2 page (S3's maximum is 1,000); see list_s3_prefix.
LIST_PAGE_SIZE = 250


class DatasetError(Exception):
    """A permanent problem (missing bucket, missing credentials, ...): waiting longer will not help."""


class ListingDeniedError(DatasetError):
    """S3 answered AccessDenied for one prefix: a policy may still allow listing a narrower one."""


class TransientDatasetError(Exception):
    """A problem worth retrying (5xx, throttling, connection reset)."""


@dataclass(frozen=True)
class DatasetLocation:
    """A parsed dataset URI.

    :param scheme: ``s3`` or ``file``
    :param bucket: the S3 bucket; empty for local files
    :param pattern: the key (S3) or absolute path (local) glob
    :param root: the fixed directory part before the first glob character; listings start here and
        the success marker lives here
    """

    scheme: str
    bucket: str
    pattern: str
    root: str

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        # Cached per location: re's own cache holds 512 patterns, and a triggerer polls 1,000 datasets.
        return _pattern_regex(self.pattern)

    def object_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}" if self.scheme == "s3" else f"file://{key}"

    @property
    def marker_base(self) -> str:
        return self.root if self.root.endswith("/") else self.root + "/"


def parse_dataset_uri(uri: str, *, param: str = "uri") -> DatasetLocation:
    """Parse ``s3://bucket/key-glob``, ``file:///abs/path-glob`` or ``/abs/path-glob``.

    A URI ending in ``/`` means every object below it; one without glob characters and without a
    trailing ``/`` means that object, or every object below it if it is a directory/prefix.

    :param uri: the rendered URI
    :param param: the parameter name to put in error messages
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{param}={uri!r} is invalid: expected a non-empty s3:// or file:// URI.")
    if uri.startswith("/"):
        uri = "file://" + uri
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(
            f"{param}={uri!r} has unsupported scheme {parts.scheme!r}: supported are "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)} (or an absolute local path). Other "
            "object stores are not supported by DatasetSensor yet."
        )
    if scheme == "s3":
        bucket = parts.netloc
        key = unquote(parts.path.lstrip("/"))
        if not bucket or _GLOB_CHARS.search(bucket):
            raise ValueError(f"{param}={uri!r} is invalid: expected s3://<bucket>/<key or glob>.")
        pattern = key
    else:
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{param}={uri!r} is invalid: a file:// URI needs an absolute path (file:///data/...)."
            )
        pattern = unquote(parts.path)
        if not pattern.startswith("/"):
            raise ValueError(f"{param}={uri!r} is invalid: local paths must be absolute.")
        bucket = ""
    glob_at = _GLOB_CHARS.search(pattern)
    if glob_at:
        root = pattern[: pattern.rfind("/", 0, glob_at.start()) + 1]
    elif pattern.endswith("/") or not pattern:
        root = pattern
    else:
        root = pattern + "/"
    return DatasetLocation(scheme=scheme, bucket=bucket, pattern=pattern, root=root)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex: ``*``/``?`` stay within one path segment, ``**`` crosses segments."""
    if not pattern or pattern.endswith("/"):
        pattern += "**"
    elif not _GLOB_CHARS.search(pattern):
        return re.compile(re.escape(pattern) + r"(?:/.+)?")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:.+/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif c == "*":
            out.append(r"[^/]*")
            i += 1
        elif c == "?":
            out.append(r"[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out))


def parse_modified_after(value: Any, *, param: str = "modified_after") -> datetime | None:
    """Accept None, an aware or naive (taken as UTC) datetime, or an ISO 8601 string."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{param}={value!r} is not a datetime: expected an ISO 8601 string such as "
                "'2024-05-01T00:00:00+00:00' or a template like '{{ data_interval_start }}'."
            ) from None
    else:
        raise ValueError(f"{param}={value!r} must be a datetime, an ISO 8601 string or None.")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def validate_thresholds(min_objects: Any, min_total_bytes: Any, success_marker: Any) -> None:
    """Raise ValueError for thresholds that are wrong or can never mean "wait for something"."""
    for name, value in (("min_objects", min_objects), ("min_total_bytes", min_total_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 0.")
    if success_marker is not None and (
        not isinstance(success_marker, str)
        or not success_marker
        or success_marker.startswith("/")
        or _GLOB_CHARS.search(success_marker)
        # '..' would point outside the dataset (another dataset's marker would complete this one).
        or ".." in success_marker.replace("\\", "/").split("/")
    ):
        raise ValueError(
            f"success_marker={success_marker!r} is invalid: expected a file name relative to the "
            "dataset directory, inside it (no '..'), without glob characters (e.g. '_SUCCESS'), or None."
        )
    if min_objects == 0 and min_total_bytes == 0 and success_marker is None:
        raise ValueError(
            "min_objects=0, min_total_bytes=0 and success_marker=None are inconsistent: the sensor would "
            "succeed on an empty dataset. Require at least one object, some bytes or a success marker."
        )


@dataclass(frozen=True)
class ObjectInfo:
    """One matched object: key (S3) or absolute path (local), size, mtime and ETag if the store has one."""

    key: str
    size: int
    modified: datetime
    etag: str | None = None


def list_local_blocking(location: DatasetLocation) -> list[ObjectInfo]:
    """Every file under ``location.root`` that matches (or is in the marker directory); blocking."""
    regex = location.regex
    found: list[ObjectInfo] = []
    root = location.root.rstrip("/") or "/"
    exact = location.pattern.rstrip("/")
    candidates: list[str] = []
    if not _GLOB_CHARS.search(location.pattern) and os.path.isfile(exact):
        candidates.append(exact)
    for dirpath, _dirs, files in os.walk(root):
        candidates.extend(os.path.join(dirpath, name) for name in files)
    for path in candidates:
        if not regex.fullmatch(path) and not path.startswith(location.marker_base):
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:  # removed between the walk and the stat
            continue
        found.append(ObjectInfo(path, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc)))
    return found


async def list_local(location: DatasetLocation) -> list[ObjectInfo]:
    """Every file under ``location.root`` that matches (or is in the marker directory), off the loop."""
    return await asyncio.to_thread(list_local_blocking, location)


def listing_prefix(location: DatasetLocation) -> str:
    """The S3 prefix to list for ``location``: its fixed part before any glob character."""
    return location.root if _GLOB_CHARS.search(location.pattern) else location.pattern


async def list_s3(client: Any, location: DatasetLocation) -> list[ObjectInfo]:
    """Every object under ``location``'s prefix (one paginated ListObjectsV2), classifying failures."""
    objects, _truncated, _pages = await list_s3_prefix(client, location.bucket, listing_prefix(location))
    return objects


async def list_s3_prefix(
    client: Any, bucket: str, prefix: str, max_pages: int | None = None
) -> tuple[list[ObjectInfo], bool, int]:
    """List ``prefix`` in ``bucket`` in key order; returns ``(objects, truncated, pages fetched)``.

    :param client: an aiobotocore S3 client.
    :param bucket: the bucket.
    :param prefix: the key prefix.
    :param max_pages: stop after this many pages (``truncated`` then says whether keys remain).
    :raises DatasetError: permanent (missing bucket, access denied, no credentials).
    :raises TransientDatasetError: 5xx, throttling, connection problems.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    found: list[ObjectInfo] = []
    pages = 0
    truncated = False
    try:
        paginator = client.get_paginator("list_objects_v2")
        # Small pages: botocore parses each response on the event loop, ~0.15 ms per key, so a
        # 1,000-key page would stall every other trigger for ~150 ms.
        pagination = {"PageSize": LIST_PAGE_SIZE}
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pagination):
            pages += 1
            for row in page.get("Contents", ()):
                etag = row.get("ETag")
                found.append(
                    ObjectInfo(
                        row["Key"], int(row["Size"]), row["LastModified"], etag.strip('"') if etag else None
                    )
                )
            if max_pages is not None and pages >= max_pages and page.get("IsTruncated"):
                truncated = True
                break
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket":
            raise DatasetError(f"S3 bucket {bucket!r} does not exist.") from e
        if code == "AccessDenied":
            raise ListingDeniedError(f"S3 refused to list s3://{bucket}/{prefix} ({code}): {e}") from e
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise DatasetError(f"S3 refused to list s3://{bucket}/{prefix} ({code}): {e}") from e
        if code in _TRANSIENT_S3_CODES or status >= 500 or status == 429:
            raise TransientDatasetError(f"S3 {code or status}: {e}") from e
        raise DatasetError(f"S3 error listing s3://{bucket}/{prefix}: {e}") from e
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise DatasetError(
            f"No usable AWS credentials to list s3://{bucket}/ ({e}); set login/password or "
            "a role in the Airflow connection, or provide credentials in the environment."
        ) from e
    except (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectionError) as e:
        raise TransientDatasetError(f"{type(e).__name__}: {e}") from e
    except (OSError, asyncio.TimeoutError) as e:  # aiohttp's errors are OSError subclasses
        raise TransientDatasetError(f"{type(e).__name__}: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("aiohttp"):
            raise TransientDatasetError(f"{type(e).__name__}: {e}") from e
        raise
    return found, truncated, pages


@dataclass(frozen=True)
class Criteria:
    """What "complete" means for one dataset."""

    min_objects: int = 1
    min_total_bytes: int = 0
    success_marker: str | None = None
    modified_after: datetime | None = None


def evaluate(location: DatasetLocation, objects: list[ObjectInfo], criteria: Criteria) -> dict[str, Any]:
    """Apply the criteria to a listing; returns the summary (``complete`` says whether it is met).

    The marker is not a data object: it is left out of the matches and the totals.
    """
    marker_key = location.marker_base + criteria.success_marker if criteria.success_marker else None
    regex = location.regex
    fresh = [o for o in objects if criteria.modified_after is None or o.modified >= criteria.modified_after]
    marker = next((o for o in fresh if o.key == marker_key), None)
    matched = sorted(
        (o for o in fresh if o.key != marker_key and not o.key.endswith("/") and regex.fullmatch(o.key)),
        key=lambda o: o.key,
    )
    stale = len(objects) - len(fresh)
    total_bytes = sum(o.size for o in matched)
    missing: list[str] = []
    if len(matched) < criteria.min_objects:
        missing.append(f"{len(matched)}/{criteria.min_objects} objects")
    if total_bytes < criteria.min_total_bytes:
        missing.append(f"{total_bytes}/{criteria.min_total_bytes} bytes")
    if marker_key and marker is None:
        missing.append(f"no success marker {criteria.success_marker!r}")
    return {
        "complete": not missing,
        "missing": missing,
        "stale_objects": stale,
        "objects": [
            {
                "uri": location.object_uri(o.key),
                "size": o.size,
                "modified": o.modified.isoformat(),
                "etag": o.etag,
            }
            for o in matched
        ],
        "total_objects": len(matched),
        "total_bytes": total_bytes,
        "success_marker": location.object_uri(marker.key) if marker else None,
    }


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
        validate_thresholds(min_objects, min_total_bytes, success_marker)
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
                from airflow_provider_mltrain.triggers.s3_client_pool import shared_s3_client

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
                summary = evaluate(self.location, objects, self.criteria)
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


async def check_dataset_once(
    uri: str, criteria: Criteria, aws_conn_id: str | None, region_name: str | None = None
) -> dict[str, Any]:
    """One listing + evaluation (the sensor's poke / pre-deferral check). Raises DatasetError and
    TransientDatasetError as :func:`list_s3` does."""
    location = parse_dataset_uri(uri)
    if location.scheme == "s3":
        from airflow_provider_mltrain.triggers.s3_client_pool import shared_s3_client

        async with shared_s3_client(aws_conn_id, region_name) as client:
            objects = await list_s3(client, location)
    else:
        objects = await list_local(location)
    return evaluate(location, objects, criteria)
