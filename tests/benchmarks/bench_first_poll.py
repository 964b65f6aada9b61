"""The event-loop block of a process's first DatasetTrigger poll, with and without the collector pause.

Each sample is a fresh interpreter (botocore caches its models per process, so only the first client of
a process pays for them) that imports what a triggerer has loaded, starts a 5 ms ticker on its event
loop and lets one trigger poll the moto S3 server once; the longest ticker delay is the block.

* ``provider``: the shared client built as ``s3_client_pool`` builds it (worker thread, collector
  paused, survivors moved to the oldest generation).
* ``worker thread only`` (baseline, the previous code): the same build in a worker thread with the
  collector running; the full collection that botocore's allocations set off holds the GIL.

Run: ``.venv/bin/python tests/benchmarks/bench_first_poll.py [samples]``. The triggerer warns at 200 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fixtures.s3 import aws_connection_json, free_port  # noqa: E402
from tests.fixtures.trigger_probes import FIRST_POLL_PROBE  # noqa: E402

BASELINE_PATCH = (
    "import contextlib\n"
    "import airflow.jobs.triggerer_job_runner\n"
    "import airflow_provider_mltrain.datasets.s3_client_pool as s3_client_pool\n"
    "s3_client_pool._collector_paused = contextlib.nullcontext\n"
)


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="day/part-0.parquet", Body=b"0123456789")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AIRFLOW_HOME": tempfile.mkdtemp(prefix="bench-first-poll-"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW_CONN_PROBE_S3": aws_connection_json(endpoint),
    }
    blocks: dict[str, list[float]] = {"provider": [], "baseline": []}
    try:
        for _ in range(samples):
            for name, code in (
                ("provider", FIRST_POLL_PROBE),
                ("baseline", BASELINE_PATCH + FIRST_POLL_PROBE),
            ):
                done = subprocess.run(
                    [sys.executable, "-c", code, f"s3://{bucket}/day/*.parquet"],
                    env=env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    raise SystemExit(f"{name} probe failed:\n{done.stderr[-3000:]}")
                blocks[name].append(json.loads(done.stdout.strip().splitlines()[-1])["longest_block_s"])
    finally:
        server.stop()
    print(f"first DatasetTrigger poll of a fresh process, {samples} samples each (longest loop block):")
    for name, label in (("provider", "provider (collector paused)"), ("baseline", "worker thread only")):
        values = blocks[name]
        print(
            f"  {label:30s} median {statistics.median(values) * 1000:7.1f} ms   "
            f"max {max(values) * 1000:7.1f} ms   ({', '.join(f'{v * 1000:.0f}' for v in values)})"
        )
    ratio = statistics.median(blocks["provider"]) / statistics.median(blocks["baseline"])
    print(f"  ratio provider / worker thread only (median) {ratio:.2f}   (triggerer warns at 200 ms)")


if __name__ == "__main__":
    main()
