"""When this job's lease was last granted or renewed: the holder's own clock."""

from __future__ import annotations

import time


class LeaseClock:
    """Whether the lease is surely still held, without asking the state database.

    A lease granted or renewed by a statement sent at local time T expires no
    earlier than T + TTL on the state database's clock (its expiry is computed
    there, after T), and nobody else can take it before that. So until
    T + TTL/2 the holder knows it still holds the lease without asking; the
    half TTL covers clock-rate drift and the moment between check and commit.
    A process frozen past that (SIGSTOP, a VM pause) falls back to the lease
    row and is fenced out there.
    """

    def __init__(self) -> None:
        self._sent = float("-inf")

    def renewed(self, sent: float) -> None:
        self._sent = sent

    def forget(self) -> None:
        """From now on every fence check asks the lease row."""
        self._sent = float("-inf")

    def surely_held(self, ttl: float) -> bool:
        return time.monotonic() < self.surely_until(ttl)

    def surely_until(self, ttl: float) -> float:
        """The CLOCK_MONOTONIC time until which the lease is surely held.

        One clock for every process of the machine: the runner may commit a
        step without asking until then (bwrap does not unshare the time
        namespace).
        """
        return self._sent + ttl / 2
