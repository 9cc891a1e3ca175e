"""Length-prefixed pickle frames: how the training process and its embedded host talk.

Both ends are apmon's own processes (the host is started by the training job with pipes it
created), so pickle carries no foreign input here.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

HEADER = struct.Struct("<I")


def encode(message: Any) -> bytes:
    """One frame: a 4-byte little-endian length, then the pickled message."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def write_frame(fd: int, message: Any) -> None:
    """Write one frame to a blocking file descriptor, all of it."""
    view = memoryview(encode(message))
    while view:
        view = view[os.write(fd, view) :]


class FrameReader:
    """Reassembles frames from the chunks a pipe delivers."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes read from the pipe; the messages they complete, in order."""
        self._buffer += data
        messages = []
        start = 0
        while len(self._buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer, start)
            end = start + HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[start + HEADER.size : end]))
            start = end
        del self._buffer[:start]
        return messages
