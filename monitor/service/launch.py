"""Starting and stopping ``apmon serve`` as a child process (for tests, benchmarks and scripts)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def serve_command(
    port: int, workers: int, host: str = "127.0.0.1", log_level: str = "warning"
) -> list[str]:
    """The argv that runs ``apmon serve`` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "monitor.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        log_level,
    ]


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a bounded wait.

    The process must have been started with ``start_new_session=True``; stray workers of its
    group are killed too.
    """
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
