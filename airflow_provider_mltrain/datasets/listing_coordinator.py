"""Coalesce the listings of many DatasetTriggers in one triggerer into few requests.

A triggerer runs up to 1,000 triggers in one event loop. Listed one by one, 1,000 datasets polled every
5 seconds are 200 ListObjectsV2 calls a second, each a millisecond or two of botocore CPU on the loop
(signing, XML parsing), most of them answering "not yet". Datasets that wait together usually live
together (``s3://ml-datasets/daily/<ds>/...`` per model or per day), so one listing of their common
prefix can answer all of them.

How:

* Requests that arrive within a short gather window for the same S3 client and bucket form a group.
  DatasetTriggers wake on a shared clock (see ``DatasetTrigger``), so a poll cycle's requests arrive
  together.
* A group lists the longest common prefix (LCP) of its prefixes once, with a page budget: the pages it
  may fetch grow with the number of requests it answers (:data:`REQUESTS_PER_PAGE`). Each request gets
  the keys under its own prefix (S3 lists in key order, so a bisect finds them).
* Over budget, the keys fetched so far still answer every prefix they fully cover (all keys below the
  last one fetched), and the rest split by the next character after the LCP into subgroups with longer
  prefixes, resolved the same way. The (bucket, LCP) is remembered as too large for a while, so later
  cycles split at once. A listing is never handed out as complete unless it is.
* Errors of a shared listing reach every request of the group, so each trigger keeps its own retries.
  AccessDenied on a coalesced prefix (say an IAM policy that allows listing only below each
  dataset's own prefix) splits the group instead: the individual listings then report their own
  outcome.
* Local listings of one window run in one worker thread (one ``asyncio.to_thread`` instead of one per
  trigger).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from airflow_provider_mltrain.datasets.listing import (
    ListingDeniedError,
    ObjectInfo,
    list_local_blocking,
    list_s3_prefix,
)
from airflow_provider_mltrain.datasets.location import DatasetLocation

#: Seconds a request waits for others to join its group. Triggers on a shared clock arrive within
#: the same few loop iterations; this adds at most this much to detection latency.
GATHER_WINDOW_S = 0.02
#: A coalesced listing may fetch one page (``LIST_PAGE_SIZE`` = 250 keys) per this many requests it
#: answers: parsing a full page costs about as much CPU as 25 listings that find nothing.
REQUESTS_PER_PAGE = 25
#: Results handed out per event-loop iteration: each wakes a trigger that evaluates its objects, and
#: a thousand of them in one iteration would stall the loop.
DELIVERY_CHUNK = 50
#: How long a prefix that proved too large to list whole is split at once instead.
OVERSIZED_TTL_S = 600.0
#: Listing calls in flight at once per loop (a burst of subgroups must not queue hundreds of requests).
MAX_CONCURRENT_LISTINGS = 16
_LAST_CHAR = "\U0010ffff"


class _Request:
    __slots__ = ("future", "prefix")

    def __init__(self, prefix: str, future: asyncio.Future[list[ObjectInfo]]) -> None:
        self.prefix = prefix
        self.future = future


class ListingCoordinator:
    """One per event loop; see the module docstring. Counters are for tests and metrics.

    :param s3_lister: the coroutine function that lists one prefix (injected so the algorithm can be
        tested without S3; the default is :func:`airflow_provider_mltrain.datasets.listing.list_s3_prefix`).
    """

    def __init__(self, s3_lister: Callable[..., Any] | None = None) -> None:
        self._s3_lister = s3_lister if s3_lister is not None else list_s3_prefix
        self._s3_pending: dict[tuple[int, str], tuple[Any, list[_Request]]] = {}
        self._local_pending: list[tuple[DatasetLocation, asyncio.Future[list[ObjectInfo]]]] = []
        self._flush_scheduled = False
        self._oversized: dict[tuple[str, str], float] = {}
        self._limiter = asyncio.Semaphore(MAX_CONCURRENT_LISTINGS)
        self._tasks: set[asyncio.Task[None]] = set()
        #: S3 listing requests received, and S3 listing calls (one per page) made to answer them.
        self.s3_requests = 0
        self.s3_calls = 0
        #: Local listing requests received, and worker-thread hops made to answer them.
        self.local_requests = 0
        self.local_batches = 0

    # -- public -------------------------------------------------------------------------------------

    async def list_s3(self, client: Any, bucket: str, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` in ``bucket``, listed together with concurrent requests.

        :param client: the (shared) aiobotocore S3 client.
        :param bucket: the bucket.
        :param prefix: the key prefix.
        :raises DatasetError: permanent failure for this prefix.
        :raises TransientDatasetError: worth retrying.
        """
        self.s3_requests += 1
        future: asyncio.Future[list[ObjectInfo]] = asyncio.get_running_loop().create_future()
        _client, requests = self._s3_pending.setdefault((id(client), bucket), (client, []))
        requests.append(_Request(prefix, future))
        self._schedule_flush()
        return await future

    async def list_local(self, location: DatasetLocation) -> list[ObjectInfo]:
        """Every file of ``location`` (see ``list_local``), batched with concurrent requests.

        :param location: the parsed local dataset location.
        """
        self.local_requests += 1
        future: asyncio.Future[list[ObjectInfo]] = asyncio.get_running_loop().create_future()
        self._local_pending.append((location, future))
        self._schedule_flush()
        return await future

    # -- batching -----------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(GATHER_WINDOW_S, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        groups, self._s3_pending = self._s3_pending, {}
        local, self._local_pending = self._local_pending, []
        for (_, bucket), (client, requests) in groups.items():
            self._spawn(self._resolve(client, bucket, requests))
        if local:
            self._spawn(self._resolve_local(local))

    def _spawn(self, coro: Any) -> None:
        # Keep a reference: the loop holds tasks weakly. A cancelled trigger cancels only its own
        # future; the shared work goes on for the others.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- S3 -----------------------------------------------------------------------------------------

    async def _resolve(self, client: Any, bucket: str, requests: list[_Request]) -> None:
        try:
            await self._resolve_group(client, bucket, requests)
        except BaseException as err:  # never leave a trigger waiting on a future nobody will set
            _fail(requests, err)
            if not isinstance(err, Exception):
                raise

    async def _resolve_group(self, client: Any, bucket: str, requests: list[_Request]) -> None:
        requests = [r for r in requests if not r.future.done()]  # triggers cancelled meanwhile
        if not requests:
            return
        prefixes = sorted({r.prefix for r in requests})
        lcp = os.path.commonprefix(prefixes)
        if len(prefixes) == 1:
            try:
                objects, _ = await self._list(client, bucket, lcp, None)
            except Exception as err:
                _fail(requests, err)
                return
            await _deliver(requests, objects)
            return
        if self._is_oversized(bucket, lcp):
            await self._split(client, bucket, requests, lcp)
            return
        budget = max(1, len(prefixes) // REQUESTS_PER_PAGE)
        try:
            objects, truncated = await self._list(client, bucket, lcp, budget)
        except ListingDeniedError:
            # Possibly only the shared prefix is refused (prefix-scoped IAM policies): list each part.
            # A missing bucket or bad credentials fail every part alike, so those go to all at once.
            self._oversized[(bucket, lcp)] = time.monotonic() + OVERSIZED_TTL_S
            await self._split(client, bucket, requests, lcp)
            return
        except Exception as err:
            _fail(requests, err)
            return
        if not truncated:
            await _deliver(requests, objects)
            return
        self._oversized[(bucket, lcp)] = time.monotonic() + OVERSIZED_TTL_S
        last_key = objects[-1].key if objects else ""
        covered = [r for r in requests if r.prefix < last_key and not last_key.startswith(r.prefix)]
        await _deliver(covered, objects)
        rest = [r for r in requests if not r.future.done()]
        if rest:
            await self._split(client, bucket, rest, lcp)

    async def _split(self, client: Any, bucket: str, requests: list[_Request], lcp: str) -> None:
        """Subgroups by the character after ``lcp``; a request whose prefix is ``lcp`` itself goes alone."""
        parts: dict[str, list[_Request]] = defaultdict(list)
        for request in requests:
            parts[request.prefix[len(lcp) : len(lcp) + 1]].append(request)
        alone = parts.pop("", [])
        subgroups = list(parts.values())
        # A request for the LCP itself needs the whole LCP listing: it cannot be split further.
        subgroups += [[r] for r in alone]
        await asyncio.gather(*(self._resolve(client, bucket, group) for group in subgroups))

    async def _list(
        self, client: Any, bucket: str, prefix: str, max_pages: int | None
    ) -> tuple[list[ObjectInfo], bool]:
        async with self._limiter:
            objects, truncated, pages = await self._s3_lister(client, bucket, prefix, max_pages)
        self.s3_calls += pages
        return objects, truncated

    def _is_oversized(self, bucket: str, prefix: str) -> bool:
        expiry = self._oversized.get((bucket, prefix))
        if expiry is None:
            return False
        if time.monotonic() >= expiry:
            del self._oversized[(bucket, prefix)]
            return False
        return True

    # -- local --------------------------------------------------------------------------------------

    async def _resolve_local(
        self, pending: list[tuple[DatasetLocation, asyncio.Future[list[ObjectInfo]]]]
    ) -> None:
        locations = list({location: None for location, _ in pending})

        def list_all() -> list[list[ObjectInfo] | BaseException]:
            results: list[list[ObjectInfo] | BaseException] = []
            for location in locations:
                try:
                    results.append(list_local_blocking(location))
                except Exception as err:  # one unreadable directory must not fail the others
                    results.append(err)
            return results

        self.local_batches += 1
        try:
            results = await asyncio.to_thread(list_all)
        except BaseException as err:
            for _, future in pending:
                if not future.done():
                    future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        by_location = dict(zip(locations, results, strict=True))
        for i, (location, future) in enumerate(pending):
            if i and i % DELIVERY_CHUNK == 0:
                await asyncio.sleep(0)
            if future.done():
                continue
            result = by_location[location]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


async def _deliver(requests: Sequence[_Request], objects: list[ObjectInfo]) -> None:
    """Hand each request the objects under its prefix; ``objects`` is in key order."""
    keys = [o.key for o in objects]
    for i, request in enumerate(requests):
        if i and i % DELIVERY_CHUNK == 0:
            await asyncio.sleep(0)  # let the triggers woken so far run before waking more
        if request.future.done():
            continue
        lo = bisect.bisect_left(keys, request.prefix)
        hi = bisect.bisect_left(keys, request.prefix + _LAST_CHAR, lo)
        request.future.set_result(objects[lo:hi])


def _fail(requests: Sequence[_Request], err: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(err)


_COORDINATORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ListingCoordinator] = (
    weakref.WeakKeyDictionary()
)


def coordinator() -> ListingCoordinator:
    """The running event loop's coordinator (created on first use)."""
    loop = asyncio.get_running_loop()
    found = _COORDINATORS.get(loop)
    if found is None:
        found = _COORDINATORS[loop] = ListingCoordinator()
    return found
