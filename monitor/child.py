"""Starting one of apmon's own helper processes: ``python -m <module> IN_FD OUT_FD`` on two pipes.

The embedded transport starts the host process this way, and the host its MLflow process. The
child finds this package first on its path, whatever the parent's working folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import monitor


def start_child(module: str, pipe_bytes: int) -> tuple[subprocess.Popen[bytes], int, int]:
    """(process, fd to write to it, fd to read its answers from); raises OSError if it fails.

    The pipe to the child is asked to hold ``pipe_bytes`` (Linux; best effort: a smaller pipe
    only means that more waits on the writer's side).
    """
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    env = dict(os.environ)
    package_root = str(Path(monitor.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(to_r), str(from_w)],
            pass_fds=(to_r, from_w),
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        for fd in (to_w, from_r):
            os.close(fd)
        raise
    finally:
        os.close(to_r)
        os.close(from_w)
    with contextlib.suppress(OSError):
        fcntl.fcntl(to_w, getattr(fcntl, "F_SETPIPE_SZ", 1031), pipe_bytes)
    return process, to_w, from_r


def idle_priority() -> None:
    """Run the calling thread (and the threads it starts) only on CPU nothing else wants.

    Linux's ``SCHED_IDLE``: a process at the lowest nice level still takes a few percent of a
    core from a training job whose threads keep every core busy, and each time it runs, one of
    torch's threads waits and its parallel region with it. Elsewhere the lowest nice level.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(19)
