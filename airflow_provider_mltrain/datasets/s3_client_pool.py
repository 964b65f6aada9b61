"""One shared aiobotocore S3 client per connection and event loop, reference-counted.

Building an aiobotocore client is slow, synchronous work (botocore loads and parses service models,
resolves endpoints and credentials). A triggerer running 1,000 ``S3KeyTrigger`` s builds 1,000 clients
on its event loop and stalls it for seconds. Here the first trigger that needs a connection builds the
client in a worker thread (``asyncio.to_thread``); every later trigger on the same loop and connection
reuses it; the last one to leave closes it.

The pool is keyed by the running event loop as well as by connection: an aiobotocore client's HTTP
session belongs to the loop that opened it, and ``dag.test()`` runs each trigger under its own
``asyncio.run``.

A worker thread alone does not keep the loop running, though: see :func:`_collector_paused` for the
garbage-collector pause that the first build used to cause anyway.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiobotocore.client import AioBaseClient

#: Connections kept open to one endpoint by one shared client. botocore's default (10) would queue
#: the polls of hundreds of triggers behind each other and delay detection.
DEFAULT_MAX_POOL_CONNECTIONS = 64

PoolKey = tuple[str | None, str | None, "bool | str | None"]


class _Entry:
    """A client being built or open, and how many triggers hold it."""

    def __init__(self, ready: asyncio.Task[Any]) -> None:
        self.ready = ready
        self.refs = 0


_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[PoolKey, _Entry]] = (
    weakref.WeakKeyDictionary()
)


#: One build at a time: each pauses the (process-wide) garbage collector while it runs.
_BUILD_LOCK = threading.Lock()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Run a burst of long-lived allocations without setting off a full garbage collection.

    The first client of a process makes botocore parse S3's service model, endpoint rules and
    ``endpoints.json``: a few hundred thousand objects, kept for the life of the process in botocore's
    loader cache. In a process the size of a triggerer (Airflow and its providers) that burst sets off a
    full (generation 2) collection of the whole heap, which holds the GIL for 0.3-0.6 s, so the
    triggerer's loop stalled on the first poll ("async thread was blocked") although the build runs in a
    worker thread.

    With the collector disabled nothing is collected during the burst. ``gc.freeze()`` then
    ``gc.unfreeze()`` moves the survivors straight into the oldest generation (two list splices) without
    adding them to the count of new long-lived objects that schedules the next full collection. The cost:
    garbage cycles created meanwhile (by any thread) wait for the next full collection instead of a young
    one.
    """
    with _BUILD_LOCK:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.freeze()
            gc.unfreeze()
            if was_enabled:
                gc.enable()


def _build_client_blocking(aws_conn_id: str | None, region_name: str | None, verify: bool | str | None):
    """Build the client in a worker thread, with the collector paused (see :func:`_collector_paused`)."""
    with _collector_paused():
        return _build_client(aws_conn_id, region_name, verify)


def _build_client(aws_conn_id: str | None, region_name: str | None, verify: bool | str | None):
    """Resolve the connection and build the (not yet opened) client."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    hook = S3Hook(aws_conn_id=aws_conn_id, region_name=region_name, verify=verify)
    # The trigger owns retries (bounded, with backoff, reported in its error event), so botocore's own
    # retries are off unless the connection's config_kwargs set them: merge() lets the user's win.
    ours = Config(retries={"total_max_attempts": 1}, max_pool_connections=DEFAULT_MAX_POOL_CONNECTIONS)
    config = ours.merge(hook.config)
    creator = hook.get_client_type(region_name=hook.region_name, config=config, deferrable=True)
    # ``creator`` is aiobotocore's ClientCreatorContext; the coroutine it wraps does the heavy,
    # synchronous model loading, so it runs to completion here, on this thread's own loop. Opening the
    # client's HTTP session (cheap, loop-bound) happens later on the caller's loop.
    coro = getattr(creator, "_coro", None)
    if coro is None:  # an aiobotocore without the private attribute: open it on the caller's loop
        return creator
    client = asyncio.run(coro)
    # The paginator model is another JSON file parsed on first use; the client caches it, so load it
    # here rather than in the first poll on the triggerer's loop.
    client.get_paginator("list_objects_v2")
    return client


async def _open_client(aws_conn_id: str | None, region_name: str | None, verify: bool | str | None):
    # Either an AioBaseClient or a ClientCreatorContext: both return the opened client from __aenter__.
    # asgiref's worker thread rather than asyncio.to_thread: the hook fetches its connection from the
    # triggerer's supervisor with a sync call, which asgiref routes back to this loop. From a plain thread,
    # Airflow 3.2's triggerer answers it on a second event loop, outside the lock of the runner's own
    # messages, and the runner dies with "Response read out of order" (apache-airflow-core 3.2.0
    # airflow/jobs/triggerer_job_runner.py:826-858).
    from asgiref.sync import sync_to_async

    build = sync_to_async(_build_client_blocking, thread_sensitive=False)
    built = await build(aws_conn_id, region_name, verify)
    return await built.__aenter__()


@asynccontextmanager
async def shared_s3_client(
    aws_conn_id: str | None, region_name: str | None = None, verify: bool | str | None = None
) -> AsyncIterator[AioBaseClient]:
    """Borrow the loop's shared S3 client for ``aws_conn_id``; built on first use, closed after last.

    :param aws_conn_id: the Amazon provider connection (its extra's ``endpoint_url`` is honoured)
    :param region_name: overrides the connection's region
    :param verify: TLS verification (bool or CA bundle path); None uses the connection's
    """
    loop = asyncio.get_running_loop()
    entries = _POOLS.setdefault(loop, {})
    key: PoolKey = (aws_conn_id, region_name, verify)
    entry = entries.get(key)
    if entry is None:
        entry = _Entry(loop.create_task(_open_client(aws_conn_id, region_name, verify)))
        entries[key] = entry
    entry.refs += 1
    try:
        try:
            # shield: one trigger being cancelled must not cancel the build others wait for.
            client = await asyncio.shield(entry.ready)
        except Exception:
            # A failed build is not cached: the next trigger (or retry) builds afresh.
            if entries.get(key) is entry:
                del entries[key]
            raise
        yield client
    finally:
        entry.refs -= 1
        if entry.refs == 0:
            if entries.get(key) is entry:
                del entries[key]
            await _close(entry)


async def _close(entry: _Entry) -> None:
    if not entry.ready.done():
        entry.ready.cancel()
        return
    if entry.ready.cancelled() or entry.ready.exception() is not None:
        return
    await entry.ready.result().__aexit__(None, None, None)


def open_client_count() -> int:
    """How many shared clients are open or being built on the running loop (for tests and metrics)."""
    return len(_POOLS.get(asyncio.get_running_loop(), {}))
