"""ListingCoordinator's algorithm against an in-memory bucket that pages like ListObjectsV2."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from airflow_provider_mltrain.datasets.listing import (
    DatasetError,
    ListingDeniedError,
    ObjectInfo,
    TransientDatasetError,
)
from airflow_provider_mltrain.datasets.listing_coordinator import REQUESTS_PER_PAGE, ListingCoordinator

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 24, tzinfo=timezone.utc)


class FakeBucket:
    """Keys in S3 order, pages of ``page_size``; records every call as (prefix, max_pages)."""

    def __init__(self, keys: list[str], page_size: int = 1000, refuse_below: int | None = None) -> None:
        self.keys = sorted(keys)
        self.page_size = page_size
        self.calls: list[tuple[str, int | None]] = []
        # Emulates a prefix-scoped IAM policy: prefixes shorter than this are AccessDenied.
        self.refuse_below = refuse_below
        self.error: Exception | None = None

    async def list_prefix(self, client, bucket, prefix, max_pages=None):
        self.calls.append((prefix, max_pages))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        if self.refuse_below is not None and len(prefix) < self.refuse_below:
            raise ListingDeniedError(f"S3 refused to list s3://{bucket}/{prefix} (AccessDenied)")
        matching = [k for k in self.keys if k.startswith(prefix)]
        pages = max(1, -(-len(matching) // self.page_size))
        truncated = False
        if max_pages is not None and pages > max_pages:
            matching, pages, truncated = matching[: max_pages * self.page_size], max_pages, True
        return [ObjectInfo(k, 1, T0) for k in matching], truncated, pages


async def _ask(coordinator: ListingCoordinator, prefixes: list[str]) -> list[list[str]]:
    results = await asyncio.gather(
        *(coordinator.list_s3("client", "bkt", p) for p in prefixes), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else [o.key for o in r] for r in results]


async def test_sibling_prefixes_are_answered_by_one_listing():
    bucket = FakeBucket([f"daily/ds-{i:03d}/data.bin" for i in range(0, 40, 2)] + ["other/x"])
    coordinator = ListingCoordinator(bucket.list_prefix)
    prefixes = [f"daily/ds-{i:03d}/" for i in range(40)]

    results = await _ask(coordinator, prefixes)

    # The common prefix once, with a budget of one page per REQUESTS_PER_PAGE requests.
    assert bucket.calls == [("daily/ds-0", max(1, 40 // REQUESTS_PER_PAGE))]
    assert results == [[f"daily/ds-{i:03d}/data.bin"] if i % 2 == 0 else [] for i in range(40)]
    assert (coordinator.s3_requests, coordinator.s3_calls) == (40, 1)


async def test_over_budget_prefix_answers_what_it_covered_and_splits_the_rest():
    # 25 keys under "a/" (3 pages of 10 with a 1-page budget), one dataset under "b/".
    keys = [f"a/{i:02d}" for i in range(25)] + ["b/1", "b/2"]
    bucket = FakeBucket(keys, page_size=10)
    coordinator = ListingCoordinator(bucket.list_prefix)

    results = await _ask(coordinator, ["a/00", "a/2", "b/"])

    assert results == [["a/00"], [f"a/2{i}" for i in range(5)], ["b/1", "b/2"]]
    # The LCP "" was over budget. Its first page (up to "a/09") covers all of "a/00", not "a/2" or
    # "b/", which were listed on their own.
    assert bucket.calls[0] == ("", 1)
    assert sorted(bucket.calls[1:]) == [("a/2", None), ("b/", None)]

    bucket.calls.clear()
    assert await _ask(coordinator, ["a/00", "a/2", "b/"]) == results
    assert ("", 1) not in bucket.calls  # remembered as too large: split at once


async def test_a_request_for_the_common_prefix_itself_is_never_truncated():
    bucket = FakeBucket([f"d/{i:02d}" for i in range(30)], page_size=10)
    coordinator = ListingCoordinator(bucket.list_prefix)

    results = await _ask(coordinator, ["d/", "d/0", "d/2"])

    assert results[0] == [f"d/{i:02d}" for i in range(30)]
    assert results[1] == [f"d/0{i}" for i in range(10)] and results[2] == [f"d/2{i}" for i in range(10)]


async def test_prefix_scoped_access_denied_falls_back_to_individual_listings():
    bucket = FakeBucket(["team-a/x", "team-b/y"], refuse_below=len("team-a/"))
    coordinator = ListingCoordinator(bucket.list_prefix)

    results = await _ask(coordinator, ["team-a/", "team-b/"])

    assert results == [["team-a/x"], ["team-b/y"]]
    assert bucket.calls[0] == ("team-", 1)


@pytest.mark.parametrize(
    "error", [TransientDatasetError("S3 SlowDown"), DatasetError("S3 bucket 'bkt' does not exist.")]
)
async def test_errors_reach_every_request_of_the_group_with_one_call(error):
    bucket = FakeBucket(["d/1"])
    bucket.error = error
    coordinator = ListingCoordinator(bucket.list_prefix)

    results = await _ask(coordinator, ["d/1", "d/2", "d/3"])

    assert all(r is error for r in results)
    assert len(bucket.calls) == 1


async def test_a_cancelled_request_does_not_break_the_others():
    bucket = FakeBucket(["d/1", "d/2"])
    coordinator = ListingCoordinator(bucket.list_prefix)
    doomed = asyncio.ensure_future(coordinator.list_s3("client", "bkt", "d/1"))
    survivor = asyncio.ensure_future(coordinator.list_s3("client", "bkt", "d/2"))
    await asyncio.sleep(0)
    doomed.cancel()

    assert [o.key for o in await survivor] == ["d/2"]
    assert doomed.cancelled()


async def test_local_requests_of_one_window_share_one_thread_hop(tmp_path, mocker):
    from airflow_provider_mltrain.datasets.location import parse_dataset_uri

    for i in range(5):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "part-0").write_bytes(b"x" * i)
    coordinator = ListingCoordinator(FakeBucket([]).list_prefix)
    to_thread = mocker.spy(asyncio, "to_thread")

    found = await asyncio.gather(
        *(coordinator.list_local(parse_dataset_uri(f"{tmp_path}/d{i}/")) for i in range(5))
    )

    assert [[o.size for o in objects] for objects in found] == [[0], [1], [2], [3], [4]]
    assert to_thread.call_count == 1
    assert (coordinator.local_requests, coordinator.local_batches) == (5, 1)
