"""What every benchmark of bench/run.py shares: processes, clients, databases, bundles.

Everything started here is owned by a `Resources` object and torn down by it:
processes (each in its own session, killed by process group), throwaway
PostgreSQL databases (prefix `rtbench_`), Redis keys of this run's queue, and
temporary directories.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get(
    "RETORT_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS = os.environ.get("RETORT_BENCH_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = uuid.uuid4().hex[:8]
FINAL = ("succeeded", "failed", "cancelled")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]


class Api:
    """A keep-alive JSON client (one connection, reopened when the server drops it)."""

    def __init__(self, port: int, token: str, timeout: float = 90):
        self.port = port
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        hdrs = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        if content_type:
            hdrs["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # gunicorn closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        if resp.getheader("Connection", "").lower() == "close":
            self.close()
        try:
            parsed = json.loads(payload) if payload else None
        except ValueError:
            parsed = payload.decode("utf-8", "replace")
        return Response(resp.status, parsed, {k: v for k, v in resp.getheaders()})

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, expect=(200, 201, 202), **kw):
        r = self.request(method, path, body, **kw)
        if r.status not in expect:
            raise RuntimeError(f"{method} {path} -> {r.status}: {str(r.body)[:1000]}")
        return r.body

    def wait_job(self, job_id: int, etag: str | None = None, timeout: float = 600) -> dict:
        """Long-poll a job until it ends, as a waiting pipeline would."""
        deadline = time.monotonic() + timeout
        while True:
            hdrs = {"If-None-Match": etag} if etag else {}
            r = self.get(f"/v1/jobs/{job_id}?wait=30", headers=hdrs)
            if r.status != 200:
                raise RuntimeError(f"GET job {job_id} -> {r.status}: {r.body}")
            if r.body["state"] in FINAL:
                return r.body
            etag = r.headers.get("ETag")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} still {r.body['state']} after {timeout}s")


# ---------------------------------------------------------------- bundles


def revision_source(rev: str, down: str | None, upgrade: str, downgrade: str, msg: str) -> str:
    return (
        f'"""{msg}\n\nRevision ID: {rev}\nRevises: {down or ""}\n"""\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f"revision = {rev!r}\ndown_revision = {down!r}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        f"def upgrade():\n    {upgrade}\n\n\n"
        f"def downgrade():\n    {downgrade}\n"
    )


def synthetic_chain(n: int = 30, prefix: str = "f", tables: str = "t") -> dict[str, str]:
    """A linear chain of `n` revisions: create a table, add a column to it, index it; repeat."""
    files = {}
    prev = None
    for i in range(n):
        rev = f"{prefix}{i + 1:04d}"
        k, kind = divmod(i, 3)
        table = f"{tables}{k}"
        if kind == 0:
            up = (
                f"op.create_table({table!r}, sa.Column('id', sa.Integer, primary_key=True), "
                "sa.Column('name', sa.String(100), nullable=False), "
                "sa.Column('created_at', sa.DateTime(timezone=True)))"
            )
            down = f"op.drop_table({table!r})"
            msg = f"create {table}"
        elif kind == 1:
            up = f"op.add_column({table!r}, sa.Column('ref_{k}', sa.Integer, nullable=True))"
            down = f"op.drop_column({table!r}, 'ref_{k}')"
            msg = f"add {table}.ref_{k}"
        else:
            up = f"op.create_index('ix_{table}_ref_{k}', {table!r}, ['ref_{k}'])"
            down = f"op.drop_index('ix_{table}_ref_{k}', table_name={table!r})"
            msg = f"index {table}.ref_{k}"
        files[f"versions/{rev}_{msg.replace(' ', '_').replace('.', '_')}.py"] = revision_source(
            rev, prev, up, down, msg
        )
        prev = rev
    return files


def chain_head(files: dict[str, str]) -> str:
    return sorted(Path(p).name.split("_")[0] for p in files)[-1]


def make_tar(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in sorted(files.items()):
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_files(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


# ---------------------------------------------------------------- resources


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path


@dataclass
class Resources:
    """Everything this run created, undone in reverse by close()."""

    keep: bool = False
    procs: list[Proc] = field(default_factory=list)
    pg_databases: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    stoppers: list[Any] = field(default_factory=list)
    _pg: Any = None
    _counter: Any = field(default_factory=lambda: itertools.count(1))

    # -- directories
    def tmpdir(self, label: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"rtbench-{RUN_ID}-{label}-"))
        self.dirs.append(path)
        return path

    # -- processes
    def spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        cwd: Path = ROOT,
    ) -> Proc:
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                args,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc], timeout: float = 20) -> None:
        """SIGTERM each leader (they stop their own children), then SIGKILL what is left."""
        for p in procs:
            if p.popen.poll() is None:
                p.popen.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            try:  # the group may still hold children the leader left behind
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                self.procs.remove(p)
            except ValueError:
                pass

    # -- PostgreSQL
    @property
    def pg(self):
        if self._pg is None:
            import sqlalchemy as sa

            self._pg = sa.create_engine(
                PG_ADMIN, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
            )
        return self._pg

    def new_pg_database(self, label: str) -> str:
        name = f"rtbench_{RUN_ID}_{label}_{next(self._counter)}"
        with self.pg.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        self.pg_databases.append(name)
        return self.pg.url.set(database=name).render_as_string(hide_password=False)

    def drop_pg_databases(self) -> None:
        for name in reversed(self.pg_databases):
            try:
                with self.pg.connect() as c:
                    c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001
                log(f"could not drop database {name}: {exc}")
        self.pg_databases.clear()

    # -- Redis
    def new_queue(self) -> str:
        queue = f"retort-bench-{RUN_ID}-{next(self._counter)}"
        self.queues.append(queue)
        return queue

    def drop_queues(self) -> None:
        if not self.queues:
            return
        import redis

        try:
            with redis.Redis.from_url(REDIS) as r:
                for queue in self.queues:
                    keys = list(r.scan_iter(match=f"*{queue}*", count=1000))
                    if keys:
                        r.delete(*keys)
        except Exception as exc:  # noqa: BLE001
            log(f"could not delete this run's Redis keys: {exc}")
        self.queues.clear()

    def close(self) -> None:
        for t in self.stoppers:
            t.join()
        self.stop(list(self.procs))
        self.drop_pg_databases()
        self.drop_queues()
        if self._pg is not None:
            self._pg.dispose()
        if not self.keep:
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- Retort clusters


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
    env["PYTHONUNBUFFERED"] = "1"
    # The benchmarks' SQLite targets live in temporary folders (res.tmpdir).
    env["RETORT_SQLITE_ROOTS"] = tempfile.gettempdir()
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


@dataclass
class Cluster:
    """A running Retort and how to reach it."""

    res: Resources
    port: int
    token: str
    env: dict[str, str]
    data_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    state_url: str | None = None

    def api(self) -> Api:
        return Api(self.port, self.token)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for p in self.procs.values():
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited early; see {p.log_path}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/readyz")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                last = resp.status
                if resp.status == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"Retort not ready after {timeout}s ({last}); logs in {self.data_dir}")

    def wait_workers(self, timeout: float = 60) -> None:
        """Wait until every Celery worker logged that it is ready to take messages."""
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            if not p.name.startswith("worker"):
                continue
            while "ready." not in p.log_path.read_text(errors="replace"):
                if p.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{p.name} never became ready; see {p.log_path}")
                time.sleep(0.1)

    def stop(self, background: bool = False) -> None:
        """Stop every process of this cluster; `background`: without waiting for it."""
        procs = list(self.procs.values())
        self.procs.clear()
        if background:
            import threading

            t = threading.Thread(target=self.res.stop, args=(procs,), daemon=True)
            self.res.stoppers.append(t)
            t.start()
        else:
            self.res.stop(procs)

    def state_engine(self):
        import sqlalchemy as sa

        return sa.create_engine(self.state_url, poolclass=sa.pool.NullPool)


def start_production(
    res: Resources,
    label: str,
    *,
    workers: int = 2,
    beat: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Cluster:
    """The production layout: PostgreSQL state, Redis broker, `retort api` (gunicorn),
    `workers` x `retort worker --concurrency 1`, `retort beat` -- as tests/conftest.py starts it."""
    from cryptography.fernet import Fernet

    data_dir = res.tmpdir(label)
    state = res.new_pg_database(f"{label}_state")
    port = free_port()
    env = clean_env()
    env.update(
        {
            "RETORT_DATABASE_URL": state,
            "RETORT_BROKER_URL": REDIS,
            "RETORT_QUEUE": res.new_queue(),
            "RETORT_DATA_DIR": str(data_dir),
            "RETORT_ADMIN_TOKEN": f"rtbench-admin-{RUN_ID}",
            "RETORT_SECRET_KEY": Fernet.generate_key().decode(),
            "RETORT_PORT": str(port),
            **(extra_env or {}),
        }
    )
    out = subprocess.run(
        cli("db", "upgrade"), env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    if out.returncode:
        raise RuntimeError(f"retort db upgrade failed:\n{out.stdout}\n{out.stderr}")
    cluster = Cluster(res, port, env["RETORT_ADMIN_TOKEN"], env, data_dir, state_url=state)
    cluster.procs["api"] = res.spawn("api", cli("api", "--port", str(port)), env, data_dir)
    for i in range(1, workers + 1):
        name = f"w{i}"
        cluster.procs[f"worker-{name}"] = res.spawn(
            f"worker-{name}",
            cli("worker", "--concurrency", "1", "--name", f"{name}-{RUN_ID}"),
            env,
            data_dir,
        )
    if beat:
        cluster.procs["beat"] = res.spawn("beat", cli("beat"), env, data_dir)
    cluster.wait_ready()
    cluster.wait_workers()
    return cluster


def start_embedded(res: Resources, label: str) -> Cluster:
    """The embedded default exactly as the README says: `retort serve --port P --data-dir D`."""
    data_dir = res.tmpdir(label)
    port = free_port()
    env = clean_env()
    proc = res.spawn(
        "serve", cli("serve", "--port", str(port), "--data-dir", str(data_dir)), env, data_dir
    )
    cluster = Cluster(res, port, "", env, data_dir, procs={"serve": proc})
    cluster.state_url = f"sqlite:///{data_dir / 'retort.db'}"
    cluster.wait_ready()
    cluster.token = (data_dir / "admin-token").read_text().strip()
    return cluster


def setup_project(api: Api, name: str, files: dict[str, str]) -> dict:
    api.ok("POST", "/v1/projects", {"name": name, "settings": {}})
    return api.ok(
        "POST",
        f"/v1/projects/{name}/bundles",
        raw=make_tar(files),
        content_type="application/gzip",
    )


def register(api: Api, project: str, name: str, url: str) -> None:
    api.ok("POST", "/v1/databases", {"name": name, "project": project, "url": url})


# ---------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def cpu_times(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process (not of its exited children), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two cpu_times() (processes born meanwhile count whole)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for kid in children(pid):
        out += process_tree(kid)
    return out


def pg_backends(state_url: str) -> list[int]:
    """The PostgreSQL backend pids connected to this state database."""
    import sqlalchemy as sa

    db = sa.engine.make_url(state_url).database
    engine = sa.create_engine(state_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as c:
            return [
                r[0]
                for r in c.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :d "
                        "AND pid <> pg_backend_pid()"
                    ),
                    {"d": db},
                )
            ]
    finally:
        engine.dispose()
