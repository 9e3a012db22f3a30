"""Finished jobs' documents, kept per API process so that reading one costs no query.

Why a finished job's document can be kept: once a job is final (FINAL_STATES)
nothing writes to its row or its steps again. Every write to `jobs` is
conditional on a non-final state (`WHERE state IN (...)`: the claim, lease
wait, start, finish, cancel, hand-over, unlock, lock timeout), or is fenced
by the lease (steps, `to_heads`, `resolved_target`), and the lease is released
in the transaction that makes a started job final, so a late fenced write is
refused; `dispatched_at` and `claim_expires_at` change after that but are not
in the document. Steps are only inserted by fenced writes. Databases,
projects and bundles are never renamed nor deleted, so the names in the
document stay true. A job that is not final is always read fresh.

The lease is granted in the claim's transaction, whose first write is the
conditional claim (queued, or parked: see jobs.run.admission): the job's row
is locked before the grant writes `fencing_token` and `lock_waited_ms`, so a
cancel or hand-over cannot slip in between; a job whose database is already at
its target is started and finished in one conditional transaction.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple


class CachedJob(NamedTuple):
    project: str  # for the principal check: a scoped token still gets a 404
    body: bytes  # the response body, exactly as first served
    etag: str


class FinishedJobs:
    """A bounded LRU of finished jobs' documents (entries and bytes), safe across threads."""

    def __init__(self, max_entries: int = 2048, max_bytes: int = 32 * 1024 * 1024):
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[int, CachedJob] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: int) -> CachedJob | None:
        with self._lock:
            entry = self._entries.get(job_id)
            if entry is not None:
                self._entries.move_to_end(job_id)
            return entry

    def put(self, job_id: int, entry: CachedJob) -> None:
        """Keep a finished job's document; one larger than 1/16 of the budget is not kept."""
        size = len(entry.body)
        if size > self._max_bytes // 16:
            return
        with self._lock:
            old = self._entries.pop(job_id, None)
            if old is not None:
                self._bytes -= len(old.body)
            self._entries[job_id] = entry
            self._bytes += size
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= len(evicted.body)

    def __len__(self) -> int:
        return len(self._entries)
