"""The worker's side of a SQLite target: its file lock, and the files the sandbox binds.

SQLite has no session lock: the worker flocks a file in Retort's own data
directory (never beside the user's database) for as long as the job runs. The
lock dies with the worker process, like a session lock with its session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

from service.jobs.run.failure import JobFailure


def sqlite_path(database: str) -> str:
    return os.path.realpath(database)


class SqliteLock:
    """An exclusive flock on `<data_dir>/locks/<sha256 of the database's real path>.lock`."""

    def __init__(self, data_dir: Path, database: str) -> None:
        real = sqlite_path(database)
        folder = data_dir / "locks"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = hashlib.sha256(real.encode()).hexdigest()[:32] + ".lock"
        self.fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)

    def try_take(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def take(self, timeout_s: float) -> int:
        """Wait for the lock; return how long it took (ms)."""
        started, delay = time.monotonic(), 0.02
        while not self.try_take():
            if time.monotonic() - started > timeout_s:
                raise JobFailure(
                    "lock_timeout",
                    "another job holds the migration lock on this SQLite database "
                    f"(waited {timeout_s:.0f} s)",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        return int((time.monotonic() - started) * 1000)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def prepare_for_sandbox(database: str) -> None:
    """Make the files a sandboxed runner binds: the database, its journal (and WAL files).

    A runner sees only these files of the folder, so it cannot create them
    itself: an empty database file is a valid empty SQLite database, and an
    empty journal is no hot journal. In WAL mode the -wal and -shm files too.
    """
    real = sqlite_path(database)
    names = [real, real + "-journal"]
    if is_wal(real):
        names += [real + "-wal", real + "-shm"]
    for name in names:
        _make_like(name, real)


def _make_like(name: str, database: str) -> None:
    """Create `name` if missing, owned and moded like the database (as SQLite makes its
    journal), so the application can still open it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        st = os.stat(database)
        os.fchmod(fd, st.st_mode & 0o666)
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass
    finally:
        os.close(fd)


# SQLite's unix locking protocol (os_unix.c): a writer takes a write lock on the
# PENDING byte before it commits; a reader takes a read lock on it for a moment
# while it gets its shared lock. A read lock held there lets readers in and keeps
# every commit out, without SQLite (and its journal recovery) running here.
PENDING_BYTE = 0x40000000


def is_wal(database: str) -> bool:
    """Whether the file says it is in WAL mode (its header's file format byte is 2)."""
    try:
        with open(sqlite_path(database), "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18] == 2


class CommitHold:
    """Keep other programs from committing to a SQLite target while its runner opens it.

    Held (by the worker) from the check that the runner's bound journal is the
    file at its path until the runner holds its own lock for the job: no commit
    can delete the journal in between (see RunnerProcess.binds_current). The
    worker never opens a tenant's database with SQLite itself: a journal the
    project's code wrote could make SQLite delete files here (a super-journal
    name). While it is held, nothing else in this process may open and close
    the database file (closing any descriptor drops the process's locks).
    Rollback-journal mode only: WAL databases have no PENDING byte protocol.
    """

    def __init__(self, database: str, timeout_s: float) -> None:
        self.fd = os.open(sqlite_path(database), os.O_RDONLY)
        deadline = time.monotonic() + timeout_s
        delay = 0.005
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, PENDING_BYTE)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.release()
                    raise JobFailure(
                        "lock_timeout",
                        f"another program kept committing to the SQLite database for "
                        f"{timeout_s:.0f} s",
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
