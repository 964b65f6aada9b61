"""``runtime.exit_now``: the trainer's exit skips the interpreter's teardown, nothing else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]

PROGRAM = """
import atexit, logging, sys
from gpu_trainer.runtime import exit_now
atexit.register(lambda: print("at-exit handler ran", file=sys.stderr))
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("probe").info("logged line")
sys.stdout.write("buffered, no newline")  # stdout to a pipe is block-buffered: only a flush sends it
exit_now(3)
"""


def test_exit_now_keeps_the_status_output_and_at_exit_handlers():
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )

    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newline"
    assert "logged line" in proc.stderr and "at-exit handler ran" in proc.stderr
