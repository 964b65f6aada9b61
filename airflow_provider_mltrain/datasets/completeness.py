"""When is a dataset complete: the criteria, their validation, and the check the sensor and trigger share.

"Complete" means: at least ``min_objects`` objects match the URI's glob, together at least
``min_total_bytes`` bytes, the ``success_marker`` (if any) exists, and only objects modified at or after
``modified_after`` count; with ``settle_seconds``, the newest of them (and the marker) is at least that old,
so a writer still uploading is not caught half way. Claim objects (:mod:`.claims`) are never data. The
summary carries exactly what matched, so downstream tasks and lineage know what was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from airflow_provider_mltrain.datasets.claims import is_claim_key
from airflow_provider_mltrain.datasets.listing import ObjectInfo, list_local, list_s3
from airflow_provider_mltrain.datasets.location import GLOB_CHARS, DatasetLocation, parse_dataset_uri
from airflow_provider_mltrain.datasets.s3_client_pool import shared_s3_client


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


def validate_completeness_thresholds(min_objects: Any, min_total_bytes: Any, success_marker: Any) -> None:
    """Raise ValueError for thresholds that are wrong or can never mean "wait for something"."""
    for name, value in (("min_objects", min_objects), ("min_total_bytes", min_total_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 0.")
    if success_marker is not None and (
        not isinstance(success_marker, str)
        or not success_marker
        or success_marker.startswith("/")
        or GLOB_CHARS.search(success_marker)
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
class Criteria:
    """What "complete" means for one dataset."""

    min_objects: int = 1
    min_total_bytes: int = 0
    success_marker: str | None = None
    modified_after: datetime | None = None
    settle_seconds: float = 0.0


def validate_settle_seconds(settle_seconds: Any) -> None:
    """Raise ValueError unless ``settle_seconds`` is a number >= 0."""
    if isinstance(settle_seconds, bool) or not isinstance(settle_seconds, (int, float)) or settle_seconds < 0:
        raise ValueError(
            f"settle_seconds={settle_seconds!r} is invalid: expected a number of seconds >= 0 (how long the "
            "newest object must be unchanged before the dataset counts as complete)."
        )


def apply_criteria(
    location: DatasetLocation,
    objects: list[ObjectInfo],
    criteria: Criteria,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Apply the criteria to a listing; returns the summary (``complete`` says whether it is met).

    The marker is not a data object: it is left out of the matches and the totals, and so are claim
    objects.

    :param now: the instant the listing was taken (``settle_seconds`` is measured to it); default: now
    """
    marker_key = location.marker_base + criteria.success_marker if criteria.success_marker else None
    regex = location.regex
    fresh = [o for o in objects if criteria.modified_after is None or o.modified >= criteria.modified_after]
    marker = next((o for o in fresh if o.key == marker_key), None)
    matched = sorted(
        (
            o
            for o in fresh
            if o.key != marker_key
            and not o.key.endswith("/")
            and not is_claim_key(o.key)
            and regex.fullmatch(o.key)
        ),
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
    if criteria.settle_seconds and not missing:
        newest = max((o.modified for o in [*matched, *([marker] if marker else [])]), default=None)
        age = ((now or datetime.now(timezone.utc)) - newest).total_seconds() if newest else 0.0
        if newest and age < criteria.settle_seconds:
            missing.append(f"last change {age:.0f}s ago, settling for {criteria.settle_seconds:g}s")
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


async def check_dataset_once(
    uri: str, criteria: Criteria, aws_conn_id: str | None, region_name: str | None = None
) -> dict[str, Any]:
    """One listing + evaluation (the sensor's poke / pre-deferral check). Raises DatasetError and
    TransientDatasetError as :func:`~airflow_provider_mltrain.datasets.listing.list_s3` does."""
    location = parse_dataset_uri(uri)
    if location.scheme == "s3":
        async with shared_s3_client(aws_conn_id, region_name) as client:
            objects = await list_s3(client, location)
    else:
        objects = await list_local(location)
    return apply_criteria(location, objects, criteria)
