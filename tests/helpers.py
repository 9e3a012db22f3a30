"""Small factories and clients the tests share: real processes, real databases."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]

    def __repr__(self) -> str:
        return f"<{self.status} {json.dumps(self.body)[:2000]}>"


class Client:
    """A JSON client over urllib: what a deploy pipeline's curl would do."""

    def __init__(self, base: str, token: str | None):
        self.base = base
        self.token = token

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        content_type: str | None = None,
        token: str | None = "default",
        headers: dict[str, str] | None = None,
    ) -> Response:
        data = raw
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if content_type:
            hdrs["Content-Type"] = content_type
        tok = self.token if token == "default" else token
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return Response(resp.status, _decode(resp.read()), dict(resp.headers))
        except urllib.error.HTTPError as exc:
            return Response(exc.code, _decode(exc.read()), dict(exc.headers))

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Response:
        return self.request("POST", path, body, **kw)

    def wait_job(self, job_id: int, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}").body
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
            time.sleep(0.05)

    def wait_state(self, job_id: int, state: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}").body
            if job["state"] == state:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} never reached {state}: {job}")
            time.sleep(0.05)


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


# ---------------------------------------------------------------- bundles


def revision(
    rev: str,
    down: str | tuple[str, ...] | None,
    upgrade: str = "pass",
    downgrade: str = "pass",
    message: str | None = None,
    head: str = "",
    branch_labels: str | None = None,
) -> str:
    """The source of one Alembic revision script."""
    return (
        f'"""{message or "revision " + rev}\n\nRevision ID: {rev}\n"""\n'
        "from alembic import op\nimport sqlalchemy as sa\n"
        f"{head}\n"
        f"revision = {rev!r}\ndown_revision = {down!r}\n"
        f"branch_labels = {branch_labels!r}\ndepends_on = None\n\n\n"
        f"def upgrade():\n{_body(upgrade)}\n\n\n"
        f"def downgrade():\n{_body(downgrade)}\n"
    )


def _body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code).strip() or "pass", "    ")


def make_tar(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def chain_bundle(n: int = 2, prefix: str = "t", table: str = "items") -> dict[str, str]:
    """A linear chain: create `table`, then add a column per revision."""
    files = {}
    prev = None
    for i in range(1, n + 1):
        rev = f"{prefix}{i:03d}"
        if i == 1:
            up = f"op.create_table({table!r}, sa.Column('id', sa.Integer, primary_key=True))"
            down = f"op.drop_table({table!r})"
        else:
            up = f"op.add_column({table!r}, sa.Column('c{i}', sa.Integer))"
            down = f"op.drop_column({table!r}, 'c{i}')"
        files[f"versions/{rev}.py"] = revision(rev, prev, up, down, message=f"step {i}")
        prev = rev
    return files


# ---------------------------------------------------------------- processes


@dataclass
class Retort:
    """A running Retort: an API and workers in their own processes."""

    env: dict[str, str]
    port: int
    token: str
    log_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def state_url(self) -> str:
        return self.env.get("RETORT_DATABASE_URL") or f"sqlite:///{self.log_dir / 'retort.db'}"

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", self.token)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        proc.name = name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str, concurrency: int = 1) -> subprocess.Popen:
        return self.spawn(
            name,
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--concurrency",
                str(concurrency),
                "--name",
                name,
            ],
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.name} exited early: see {self.log_dir}")
            try:
                last = self.client.get("/readyz", token=None)
                if last.status == 200:
                    return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"Retort not ready after {timeout}s: {last}; logs in {self.log_dir}")

    def logs(self) -> str:
        """What every process wrote: the harness's files (a process's terminal output, so
        `retort serve`'s own lines) and `retort serve`'s children's, in logs/."""
        paths = sorted(self.log_dir.glob("*.log")) + sorted(self.log_dir.glob("logs/*.log"))
        return "\n".join(p.read_text(errors="replace") for p in paths)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()  # the leader stops its own children
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # `retort serve`'s children have process groups of their own; the
                # kernel kills them with serve (PR_SET_PDEATHSIG, service/serve.py).
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


class TcpProxy:
    """Forward a local port to `target_port`; stop() cuts every connection and refuses
    new ones (a restart or an outage, as the client sees it) until start() listens on
    the same port again."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listening: threading.Event | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.listening = threading.Event()
        self.listening.set()
        self.thread = threading.Thread(
            target=self._accept, args=(listener, self.listening), daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.listening:
            self.listening.clear()
            self.thread.join()  # the accept loop closes its listener: connections are refused
            self.listening = None
        with self.lock:
            open_sockets, self.sockets = self.sockets, set()
        for sock in open_sockets:
            _close(sock)

    def _accept(self, listener: socket.socket, listening: threading.Event) -> None:
        with listener:
            while listening.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                client.settimeout(None)
                upstream = socket.create_connection(("127.0.0.1", self.target))
                with self.lock:
                    self.connections += 1
                    self.sockets |= {client, upstream}
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def wait_until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- API shortcuts


def unique(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def setup_project(
    client: Client,
    files: dict[str, str | bytes] | None = None,
    settings: dict | None = None,
    name: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Create a project and upload a bundle; return (name, bundle)."""
    name = name or unique("proj")
    r = client.post("/v1/projects", {"name": name, "settings": settings or {}})
    assert r.status == 201, r
    bundle = None
    if files is not None:
        r = client.post(
            f"/v1/projects/{name}/bundles", raw=make_tar(files), content_type="application/gzip"
        )
        assert r.status == 201, r
        bundle = r.body
    return name, bundle


def register_db(client: Client, project: str, url: str, name: str | None = None, **extra) -> str:
    name = name or unique("db")
    r = client.post("/v1/databases", {"name": name, "project": project, "url": url, **extra})
    assert r.status == 201, r
    return name


def run_job(client: Client, database: str, timeout: float = 60, **body) -> dict[str, Any]:
    r = client.post("/v1/jobs", {"database": database, **body})
    assert r.status == 202, r
    return client.wait_job(r.body["id"], timeout)


def tables(url: str) -> set[str]:
    """The table names of a target database, read with a connection of its own."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
