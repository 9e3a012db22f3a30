"""The runner's entry point, started by the worker as `python -I -B -c <boot> ROOT --limits ...`.

A fresh interpreter started by exec (never a fork of the worker), inside the
sandbox the worker chose. It holds no secret but the target URL of the job it
is running, no connection to Retort's state database, and imports nothing of
Retort's state side: Alembic, SQLAlchemy, the target helpers, this package's
pure modules. It runs one job at a time, for one project only, for as long as
the worker keeps it warm.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys


def _limit(kind: int, value: int) -> None:
    if value > 0:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass  # above the hard limit already in force: that one holds


def set_limits(args: argparse.Namespace) -> None:
    """Lower this process's limits before any tenant code runs (soft = hard: no raising)."""
    mb = 1024 * 1024
    _limit(resource.RLIMIT_AS, args.memory_mb * mb)
    _limit(resource.RLIMIT_CPU, args.cpu_s)
    _limit(resource.RLIMIT_FSIZE, args.file_mb * mb)
    _limit(resource.RLIMIT_NPROC, args.nproc)
    _limit(resource.RLIMIT_CORE, 0)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this runner if the worker process that started it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retort-runner")
    parser.add_argument("--sandbox", default="process")
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--cpu-s", type=int, default=0)
    parser.add_argument("--file-mb", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=0)
    parser.add_argument("--profile", default="")
    args = parser.parse_args(argv)
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
        try:
            return _serve(args)
        finally:
            profile.disable()
            profile.dump_stats(args.profile)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    # The protocol gets private descriptors; what revisions print goes to stderr.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when a runner stops
    _die_with_parent()
    set_limits(args)

    import gc

    import alembic
    import sqlalchemy

    from service.jobs.run.migrate import Runner
    from service.jobs.run.protocol import Channel, ChannelClosed

    _load_dialects()
    # What every job shares (SQLAlchemy, Alembic, the dialects) out of the cycle
    # collector's way, as the worker's pool process does (worker/tasks.py).
    gc.collect()
    gc.freeze()

    chan = Channel(rfd, wfd)
    runner = Runner(chan)
    chan.send(
        {
            "type": "ready",
            "sandbox": args.sandbox,
            "python": sys.version.split()[0],
            "sqlalchemy": sqlalchemy.__version__,
            "alembic": alembic.__version__,
            "psycopg": _psycopg_impl(),
        }
    )
    try:
        while True:
            message = chan.recv()
            if message.get("type") in ("exit", "profile_now"):
                return 0
            if message.get("type") == "job":
                runner.run_job(message["job"])
                chan.send({"type": "idle", "rss_kb": _rss_kb()})
    except ChannelClosed:
        # The worker let this runner go, or stopped its job and closed the pipe
        # while it was reporting: nothing is left to tell, no traceback to print.
        return 0


def _psycopg_impl() -> str | None:
    """Which libpq binding psycopg loaded here ("binary", "c" or the slow "python")."""
    try:
        import psycopg

        return f"{psycopg.__version__} {psycopg.pq.__impl__}"
    except Exception:  # noqa: BLE001 - not installed, or libpq missing in the sandbox
        return None


def _load_dialects() -> None:
    for name in (
        "sqlite3",
        "sqlalchemy.dialects.sqlite",
        "sqlalchemy.dialects.postgresql",
        "sqlalchemy.dialects.mysql",
        "psycopg",
        "pymysql",
        "alembic.ddl",
        "alembic.operations.toimpl",
        "alembic.runtime.environment",
        "alembic.script",
        # What loading a bundle's scripts pulls in (Mako, and Pygments through
        # Mako's exceptions): about 0.2 s that the first job would pay.
        "mako.template",
        "mako.exceptions",
    ):
        try:
            __import__(name)
        except ImportError:  # an optional driver: its jobs fail and say so
            pass


def _rss_kb() -> int:
    """What this runner holds now (a job that left memory behind retires its runner)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
