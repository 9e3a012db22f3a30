"""The messages between the worker and a runner: length-prefixed JSON over two pipes.

Plain data only, no Retort imports: both sides use this module. What a runner
sends is data about its own job, checked by the worker, never authority.

worker -> runner: `job` (the plan), then `go` or `abort` after `locked`,
`ok` or `stop` after each `step`, `exit`.
runner -> worker: `ready`, then per job `event`* (audit events of its own job),
`not_early` | `locked`, `step`* / `resolved`, and `done` | `failed` | `stopped`.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

# A message larger than this is a protocol error (a step's SQL of a big data
# migration is the largest thing a runner sends).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class ChannelClosed(Exception):
    """The other side went away (closed its pipe or died)."""


class ProtocolError(Exception):
    """The other side sent something that is not a message of this protocol."""


class Channel:
    """One side of a runner connection: read from `rfd`, write to `wfd`."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._buf = bytearray()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":"), default=str).encode()
        payload = _HEADER.pack(len(data)) + data
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(self.wfd, view) :]
        except (BrokenPipeError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None when `timeout` seconds pass first (None: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            message = self._parse()
            if message is not None:
                return message
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ready, _, _ = select.select([self.rfd], [], [], left)
                if not ready:
                    return None
            try:
                chunk = os.read(self.rfd, 1 << 16)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from None
            if not chunk:
                raise ChannelClosed("end of stream")
            self._buf += chunk

    def _parse(self) -> dict[str, Any] | None:
        if len(self._buf) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buf)
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {size} bytes (limit {MAX_MESSAGE_BYTES})")
        if len(self._buf) < _HEADER.size + size:
            return None
        data = bytes(self._buf[_HEADER.size : _HEADER.size + size])
        del self._buf[: _HEADER.size + size]
        try:
            message = json.loads(data)
        except ValueError:
            raise ProtocolError("a message that is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ProtocolError("a message without a type")
        return message
