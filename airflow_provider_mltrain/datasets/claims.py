"""Claim a dataset partition exactly once: a marker object created only if it does not exist yet.

The claim is what makes :class:`~airflow_provider_mltrain.triggers.dataset_event.DatasetEventTrigger` fire
once per partition although a trigger keeps no state across triggerer restarts and two triggerers may watch
the same data. The claim lives next to the partition's data, as ``<partition>/_MLTRAIN_CLAIMED.<consumer>``,
and is created atomically:

* S3: ``PutObject`` with ``If-None-Match: *`` (S3 conditional writes). Of concurrent writers exactly one gets
  200; the others get ``412 PreconditionFailed`` (or ``409 ConditionalRequestConflict`` while the winner's
  upload is in flight).
* Local files: ``open(O_CREAT | O_EXCL)``, atomic on local file systems and on NFSv3+.

The claim is written *before* the trigger yields its event: a partition is claimed at most once, so a crash
in the moment between the claim and the event's persistence loses that event rather than running the
training twice (delete the claim object to fire again).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

from airflow_provider_mltrain.datasets.listing import DatasetError, TransientDatasetError

#: Claim objects are named ``<partition>/_MLTRAIN_CLAIMED.<consumer>``; they never count as data.
CLAIM_PREFIX = "_MLTRAIN_CLAIMED."
#: A consumer name becomes part of an object key: keep it to characters every store accepts unescaped.
CONSUMER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_claim_key(key: str) -> bool:
    """Whether ``key`` (an S3 key or a local path) is a claim object."""
    return key.rsplit("/", 1)[-1].startswith(CLAIM_PREFIX)


def validate_consumer(consumer: Any) -> None:
    """Raise ValueError unless ``consumer`` can name a claim object."""
    if not isinstance(consumer, str) or not CONSUMER_PATTERN.fullmatch(consumer):
        raise ValueError(
            f"consumer={consumer!r} is invalid: expected 1-100 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the claim object, e.g. the AssetWatcher's name)."
        )


def claim_key(partition_root: str, consumer: str) -> str:
    """The claim's key (S3) or path (local) for the partition whose directory is ``partition_root``."""
    return (
        (partition_root if partition_root.endswith("/") else partition_root + "/") + CLAIM_PREFIX + consumer
    )


async def claim_s3(client: Any, bucket: str, key: str, body: dict[str, Any]) -> bool:
    """Create ``s3://bucket/key`` unless it exists; True if this call created it.

    :raises DatasetError: the store refused the write (no ``s3:PutObject`` permission, missing bucket).
    :raises TransientDatasetError: 5xx, throttling, connection problems: try again at the next poll.
    """
    from botocore.exceptions import ClientError

    try:
        await client.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(body, sort_keys=True).encode(),
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "PreconditionFailed" or status == 412:
            return False  # another triggerer (or an earlier run of this one) holds the claim
        if code == "ConditionalRequestConflict" or status == 409:
            return False  # a concurrent conditional write is in flight; its writer wins
        if status >= 500 or status == 429 or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            raise TransientDatasetError(f"S3 {code or status} writing claim s3://{bucket}/{key}: {e}") from e
        raise DatasetError(
            f"S3 refused to write the claim s3://{bucket}/{key} ({code or status}): the watcher needs "
            f"s3:PutObject on the partitions' prefix. {e}"
        ) from e
    except (OSError, asyncio.TimeoutError) as e:
        raise TransientDatasetError(f"{type(e).__name__} writing claim s3://{bucket}/{key}: {e}") from e
    return True


def claim_local_blocking(path: str, body: dict[str, Any]) -> bool:
    """Create ``path`` unless it exists (``O_EXCL``); True if this call created it. Blocking."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except FileNotFoundError:
        return False  # the partition directory was removed meanwhile: nothing to claim
    except PermissionError as e:
        raise DatasetError(f"cannot write the claim {path}: {e}") from e
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, sort_keys=True)
    return True


async def claim_local(path: str, body: dict[str, Any]) -> bool:
    """:func:`claim_local_blocking` off the event loop."""
    return await asyncio.to_thread(claim_local_blocking, path, body)
