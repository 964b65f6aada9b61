"""Partitioned datasets: ``s3://bucket/digits/{partition}/*.parquet`` names one dataset per partition.

``{partition}`` stands for one path segment (or the end of one: ``dt={partition}``). Substituted, the URI is
exactly what a :class:`~airflow_provider_mltrain.sensors.dataset.DatasetSensor` would be given for that
partition, and the same completeness rules (:mod:`.completeness`) decide whether it is complete. One listing
of the fixed prefix before ``{partition}`` shows every partition at once.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

from airflow_provider_mltrain.datasets.listing import ObjectInfo
from airflow_provider_mltrain.datasets.location import GLOB_CHARS, DatasetLocation, parse_dataset_uri

PLACEHOLDER = "{partition}"


@dataclass(frozen=True)
class PartitionedDataset:
    """A parsed partition template.

    :param template: the URI with ``{partition}``
    :param scheme: ``s3`` or ``file``
    :param bucket: the S3 bucket; empty for local files
    :param prefix: the key (S3) or path (local) before ``{partition}``: what one listing covers
    """

    template: str
    scheme: str
    bucket: str
    prefix: str

    def partition_uri(self, partition: str) -> str:
        """The dataset URI of one partition (what a DatasetSensor would be given)."""
        return self.template.replace(PLACEHOLDER, partition)

    def partition_location(self, partition: str) -> DatasetLocation:
        return parse_dataset_uri(self.partition_uri(partition))

    def listing_root(self) -> DatasetLocation:
        """A location whose listing holds every partition (for local directories: the prefix's directory)."""
        directory = self.prefix[: self.prefix.rfind("/") + 1]
        if self.scheme == "s3":
            return DatasetLocation(scheme="s3", bucket=self.bucket, pattern=self.prefix, root=directory)
        return parse_dataset_uri(f"file://{directory}")

    def group(self, objects: list[ObjectInfo]) -> dict[str, list[ObjectInfo]]:
        """Objects by partition, for the keys below the prefix (others are ignored)."""
        found: dict[str, list[ObjectInfo]] = defaultdict(list)
        for obj in objects:
            if not obj.key.startswith(self.prefix):
                continue
            partition = obj.key[len(self.prefix) :].split("/", 1)[0]
            if partition and not GLOB_CHARS.search(partition) and "{" not in partition:
                found[partition].append(obj)
        return found


def parse_partitioned_uri(uri: str, *, param: str = "uri") -> PartitionedDataset:
    """Parse a partition template; the error names ``param``, the value and what is allowed."""
    if not isinstance(uri, str) or uri.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"{param}={uri!r} is invalid: expected a dataset URI with exactly one {PLACEHOLDER} path segment, "
            f"e.g. 's3://ml-datasets/digits/{PLACEHOLDER}/*.parquet'."
        )
    head, tail = uri.split(PLACEHOLDER)
    if tail and not tail.startswith("/"):
        raise ValueError(
            f"{param}={uri!r} is invalid: {PLACEHOLDER} must end a path segment (followed by '/' or nothing)."
        )
    # A sample substitution validates the scheme, bucket and path as a DatasetSensor URI would be.
    sample = parse_dataset_uri(uri.replace(PLACEHOLDER, "p"), param=param)
    prefix_location = parse_dataset_uri(head + "p", param=param)
    prefix = prefix_location.pattern[:-1]
    if GLOB_CHARS.search(prefix):
        raise ValueError(
            f"{param}={uri!r} is invalid: the part before {PLACEHOLDER} must be fixed (no '*', '?' or '['), "
            "so that one listing of it shows every partition."
        )
    if sample.scheme == "file" and not prefix.startswith("/"):
        raise ValueError(f"{param}={uri!r} is invalid: local paths must be absolute.")
    return PartitionedDataset(template=uri, scheme=sample.scheme, bucket=sample.bucket, prefix=prefix)


def fingerprint(summary_objects: list[dict[str, object]], marker: ObjectInfo | None) -> str:
    """What identifies this landing of a partition: the success marker's ETag and LastModified (S3; an empty
    marker's ETag alone is the same for every landing) or mtime (local), else a digest of the matched
    objects' keys, sizes and ETags/mtimes."""
    if marker is not None:
        modified = marker.modified.isoformat()
        return f"etag:{marker.etag}@{modified}" if marker.etag else f"mtime:{modified}"
    digest = hashlib.sha256()
    for obj in summary_objects:
        digest.update(f"{obj['uri']}\0{obj['size']}\0{obj.get('etag') or obj['modified']}\n".encode())
    return f"sha256:{digest.hexdigest()[:32]}"
