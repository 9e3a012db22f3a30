"""Hold requests until a job changes, without a query per waiting request.

Deploy pipelines long-poll `GET /v1/jobs/{id}?wait=30` and stream
`/v1/jobs/{id}/events`. Each waiting request registers here; one thread per
API process reads the progress of every watched job in one query each tick
and wakes the requests whose job moved. Fifty waiters cost one small query
every `watch_interval_s`, not fifty.

Workers also publish each job's id when it moves (service.notify): the thread
wakes that job's waiters at once instead of at its next tick, so a finished
job reaches its waiter within milliseconds, and the tick is only the fallback:
every `interval_s` while the channel is down, every `live_interval_s` while
Redis confirms the subscription (then only a publish that failed on the
worker's side waits for it).

A request reads its job and then waits; a job that moves between the read and
the wait must not be missed. While the channel is live, the watcher remembers
which jobs were published since when (a sequence number, `mark()`), so the
wait returns at once for a job published after the request's mark, without a
query. Otherwise (no live channel, or the mark is older than what is
remembered) the thread looks at the job's progress at once.

Waiters are capped per process below the number of server threads, so long
polls can never take every thread: a request over the cap is answered at once
and told when to come back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.jobs.models import Job, JobStep

log = logging.getLogger("retort.api")


class TooManyWaitersError(Exception):
    """Every waiting slot of this API process is taken."""


def progress_key(job_id: int, state: str, steps: int) -> str:
    """Return the ETag of a job's visible progress (see jobs.ops.job_etag)."""
    return f'"{job_id}-{state}-{steps}"'


# Jobs remembered as published since a mark (see JobWatcher.mark); older
# entries are forgotten, and a mark older than them costs one query.
REMEMBERED = 4096


class _Waiter:
    __slots__ = ("job_id", "seen", "woken")

    def __init__(self, job_id: int, seen: str):
        self.job_id = job_id
        self.seen = seen
        self.woken = threading.Event()


class JobWatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        interval_s: float,
        max_waiters: int,
        listen: Callable[..., object] | None = None,
        live_interval_s: float | None = None,
    ):
        """`listen(on_job, on_live)` subscribes to published job ids (see service.notify)."""
        self._listen = listen
        self._sessions = sessions
        self._interval = interval_s
        self._live_interval = interval_s if live_interval_s is None else live_interval_s
        self._slots = threading.BoundedSemaphore(max_waiters)
        self._lock = threading.Lock()
        self._waiters: dict[int, list[_Waiter]] = defaultdict(list)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        # Published ids, counted: the sequence number of each job's last publish,
        # the number at which the channel last became live (None: not live), and
        # the newest number forgotten.
        self._seq = 0
        self._moved: OrderedDict[int, int] = OrderedDict()
        self._live_since: int | None = None
        self._forgotten = 0

    def mark(self) -> int:
        """Call before reading a job that wait() will then watch; pass the result as since."""
        with self._lock:
            self._ensure_thread()
            return self._seq

    def reserve(self) -> None:
        """Take a waiting slot for a long-lived request (an event stream); release() it."""
        if not self._slots.acquire(blocking=False):
            raise TooManyWaitersError

    def release(self) -> None:
        self._slots.release()

    def wait(
        self,
        job_id: int,
        seen: str,
        timeout: float,
        reserved: bool = False,
        since: int | None = None,
    ) -> bool:
        """Block until the job's progress key differs from `seen`; False on timeout.

        `since`: mark() taken before the caller read the job (and `seen` with
        it); True at once if the job was published since. `reserved`: the
        caller already holds a slot (see reserve()).
        """
        if not reserved:
            self.reserve()
        waiter = _Waiter(job_id, seen)
        try:
            with self._lock:
                self._ensure_thread()
                if self._covered(since):
                    if self._moved.get(job_id, -1) > since:
                        return True
                    look_now = False
                else:
                    look_now = True
                self._waiters[job_id].append(waiter)
            if look_now:
                self._wake.set()
            return waiter.woken.wait(timeout)
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(job_id, None)
            if not reserved:
                self._slots.release()

    def _covered(self, since: int | None) -> bool:
        # Every publish after `since` reached this process and is remembered.
        return (
            since is not None
            and self._live_since is not None
            and since >= self._live_since
            and since >= self._forgotten
        )

    def _ensure_thread(self) -> None:
        # gunicorn forks after import: a thread started in the parent does not
        # exist in the worker, so start one per process on first use.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            started_here = self._pid == os.getpid()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="job-watcher", daemon=True)
            self._thread.start()
            if self._listen is not None and not started_here:
                self._live_since = None
                self._listen(self._published, self._live)

    def _live(self, live: bool) -> None:
        with self._lock:
            self._seq += 1
            self._live_since = self._seq if live else None
        self._wake.set()  # look at every watched job: the channel may have missed some

    def _published(self, job_id: int) -> None:
        # A worker published this id after a commit that moved the job: wake its
        # waiters now, without a query; each re-reads the job (and waits on if
        # its ETag did not change after all).
        with self._lock:
            self._seq += 1
            self._moved[job_id] = self._seq
            self._moved.move_to_end(job_id)
            if len(self._moved) > REMEMBERED:
                _, self._forgotten = self._moved.popitem(last=False)
            for waiter in self._waiters.get(job_id, []):
                waiter.woken.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                ids = list(self._waiters)
            if not ids:
                self._wake.wait(5)
                self._wake.clear()
                continue
            try:
                keys = self._progress(ids)
            except Exception:  # noqa: BLE001 - the state DB may blip; waiters time out
                log.exception("job watcher could not read job progress")
                keys = {}
            with self._lock:
                for job_id, key in keys.items():
                    for waiter in self._waiters.get(job_id, []):
                        if key != waiter.seen:
                            waiter.woken.set()
            self._wake.wait(self._interval if self._live_since is None else self._live_interval)
            self._wake.clear()

    def _progress(self, ids: list[int]) -> dict[int, str]:
        steps = (
            select(JobStep.job_id, func.count(JobStep.id).label("n"))
            .where(JobStep.job_id.in_(ids))
            .group_by(JobStep.job_id)
            .subquery()
        )
        with self._sessions() as s:
            rows = s.execute(
                select(Job.id, Job.state, func.coalesce(steps.c.n, 0))
                .outerjoin(steps, steps.c.job_id == Job.id)
                .where(Job.id.in_(ids))
            ).all()
        return {job_id: progress_key(job_id, state, n) for job_id, state, n in rows}
