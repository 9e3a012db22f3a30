"""The worker's side of a SQLite target: its file lock, and the files the sandbox binds.

SQLite has no session lock: the worker flocks a file in Retort's own data
directory (never beside the user's database) for as long as the job runs. The
lock dies with the worker process, like a session lock with its session.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
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
    for name in (real, real + "-journal"):
        os.close(os.open(name, os.O_RDWR | os.O_CREAT, 0o600))
    try:
        with open(real, "rb") as f:
            header = f.read(20)
    except OSError:
        return
    if len(header) == 20 and header[18] == 2:  # file format 2: WAL
        for name in (real + "-wal", real + "-shm"):
            os.close(os.open(name, os.O_RDWR | os.O_CREAT, 0o600))


class SharedHold:
    """A shared SQLite lock on a target, held by the worker while its sandboxed runner opens it.

    While it is held no other program can commit to the database, so none can
    delete its journal between the worker's check that the runner's bound
    journal is the file at its path and the runner's own lock (it holds one
    for the whole job: locking_mode EXCLUSIVE). Opening it here also lets
    SQLite recover a genuinely hot journal on the host, where it belongs.
    """

    def __init__(self, database: str, timeout_s: float) -> None:
        self.conn: sqlite3.Connection | None = None
        try:
            self.conn = sqlite3.connect(
                sqlite_path(database), timeout=timeout_s, isolation_level=None
            )
            self.conn.execute("BEGIN")
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            self.release()
            raise JobFailure(
                "target_unreachable", f"cannot open the SQLite database to lock it: {exc}"
            ) from None
        prepare_for_sandbox(database)  # a journal another program deleted is made again

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.rollback()
            finally:
                self.conn.close()
                self.conn = None
