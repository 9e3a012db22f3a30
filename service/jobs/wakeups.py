"""Wake-ups at a given time, kept in the broker's Redis so that no process's death loses one.

A parked job (jobs.run.admission) is sent again when the job it waits for
ends, by that job's worker. What no ending announces is a time: the holder's
lease expiring (its worker died), a wait reaching its timeout, a rollout's
pause between waves ending. Those are members of one sorted set, scored by
the epoch second they are due; every worker pool process pops the due ones
(atomically: one process takes each) and acts on them. A wake-up lost with a
process that popped it and died is covered by the sweeper's rounds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from service.notify import redis_client
from service.queue import Dispatcher

log = logging.getLogger("retort.worker")

# Members: "job:<id>" (send the job again), "rollout:<id>" (advance the rollout).
_POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""
POLL_S = 0.2


def key(queue: str) -> str:
    return f"retort:{queue}:wakeups"


class Wakeups:
    """Schedule and pop wake-ups (best effort: a failure is logged, the sweeper covers it)."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self._url, self._key = broker_url, key(queue)
        self._client = None
        self._pop = None

    def _redis(self):
        if self._client is None:
            self._client = redis_client(self._url)
            if self._client is not None:
                self._pop = self._client.register_script(_POP_DUE)
        return self._client

    def at(self, member: str, when: float) -> None:
        """Wake `member` at epoch second `when` (an earlier wake-up already set stays)."""
        try:
            client = self._redis()
            if client is not None:
                client.zadd(self._key, {member: when}, lt=True)
        except Exception as exc:  # noqa: BLE001 - the sweeper's rounds cover a lost one
            log.warning("could not schedule wake-up %s: %s", member, exc)

    def due(self, limit: int = 100) -> list[str]:
        client = self._redis()
        if client is None:
            return []
        return [m.decode() for m in self._pop(keys=[self._key], args=[time.time(), limit])]


class Scheduler:
    """A pool process's own thread for what follows a job: the work handed to `submit`
    (waking the jobs it kept waiting, moving its rollout on), and every POLL_S the
    due wake-ups, each handed to `act`.

    Its own Dispatcher: the job's thread sends on the process's.
    """

    def __init__(self, wakeups: Wakeups, act: Callable[[str, Dispatcher], None], config) -> None:
        self._wakeups, self._act = wakeups, act
        self.dispatcher = Dispatcher(config)
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._idle.clear()
        self._inbox.put(work)

    def drain(self, timeout: float) -> bool:
        """Wait until the submitted work is done (a process about to exit); False if not."""
        self._inbox.put(None)
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        failing, polled = False, 0.0
        while True:
            try:
                work = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                work = None
            if work is not None:
                try:
                    work()
                except Exception:  # noqa: BLE001 - one failure never stops the thread
                    log.exception("after a job: %s failed", work)
            if self._inbox.empty():
                self._idle.set()
            if time.monotonic() - polled < POLL_S:
                continue
            polled = time.monotonic()
            try:
                for member in self._wakeups.due():
                    try:
                        self._act(member, self.dispatcher)
                    except Exception:  # noqa: BLE001 - one bad wake-up never stops the rest
                        log.exception("wake-up %s failed", member)
                failing = False
            except Exception as exc:  # noqa: BLE001 - the broker is away: try again
                if not failing:
                    log.warning("wake-ups: cannot reach the broker: %s", exc)
                failing = True
