"""List a dataset's objects on S3 (aiobotocore) or local disk, and classify what goes wrong.

:class:`DatasetError` is permanent (waiting longer will not help), :class:`TransientDatasetError` is
worth retrying; :class:`ListingDeniedError` is a permanent refusal that a narrower prefix may not get.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from airflow_provider_mltrain.datasets.location import GLOB_CHARS, DatasetLocation, listing_prefix

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
    if not GLOB_CHARS.search(location.pattern) and os.path.isfile(exact):
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
