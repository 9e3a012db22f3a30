"""`retort serve` as a person at a terminal sees it: a few lines of its own, "running"
once the API answers, next steps that work, the children's output in log files, and
a Ctrl-C that stops everything, quickly and without a traceback (issue 21)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import _base_env
from tests.helpers import (
    ROOT,
    Client,
    chain_bundle,
    free_port,
    register_db,
    revision,
    setup_project,
)

CELERY_BANNER = ("-------------- ", "[config]", "[queues]", "[tasks]", ".> transport:", "celery@")
CHILDREN = ("api", "worker", "sweeper", "webhooks", "redis")


class Serve:
    """`python -m service.cli serve` in its own session, as a terminal runs it; each line
    it prints is kept with what GET /readyz answered at the moment it was read."""

    def __init__(self, data_dir: Path, port: int, env: dict[str, str]):
        self.data_dir, self.port = data_dir, port
        self.lines: list[tuple[str, int | None]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
            + ["--data-dir", str(data_dir)],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            status = self.readyz() if line.startswith("Retort is running") else None
            self.lines.append((line, status))

    def readyz(self) -> int:
        try:
            url = f"http://127.0.0.1:{self.port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    @property
    def output(self) -> list[str]:
        return [line for line, _ in self.lines]

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.output):
            assert self.proc.poll() is None or self.reader.is_alive(), self.output
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {self.output}"
            time.sleep(0.1)

    def exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """Whatever happened: nothing of it left (its children die with it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.reader.join(timeout=5)
        self.proc.stdout.close()


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (by parent links, whatever its group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = _base_env(data_dir)
    env.pop("RETORT_ADMIN_TOKEN")  # the embedded default: the token file
    env.update(extra)
    return env


def test_serve_prints_a_few_lines_then_stops_on_ctrl_c(backends, tmp_path):
    data_dir = tmp_path / "data"
    # A running migration gets 2 s after Ctrl-C, then is handed back.
    serve = Serve(data_dir, free_port(), _env(data_dir, RETORT_SHUTDOWN_GRACE_S="2"))
    try:
        serve.wait_for("Press Ctrl-C to stop.")
        out = serve.output
        assert out[0].startswith("Retort is starting"), out
        assert len(out) < 20, out
        assert not [line for line in out if any(b in line for b in CELERY_BANNER)], out
        assert not [line for line in out if "Warning" in line or "WARNING" in line], out
        running = [(line, s) for line, s in serve.lines if line.startswith("Retort is running")]
        assert running == [(f"Retort is running at http://127.0.0.1:{serve.port}", 200)], out
        logs = data_dir / "logs"
        assert any(str(logs) in line for line in out), out

        # The next steps, run as printed (the Alembic directory is the only blank to fill).
        steps = out[out.index(next(x for x in out if x.startswith("Next"))) + 1 : -1]
        assert [s.split()[0:2] for s in steps][1:] == [
            ["retort", "project"],
            ["retort", "database"],
            ["retort", "migrate"],
        ], steps
        scripts = tmp_path / "alembic"
        for name, source in chain_bundle(2).items():
            (scripts / name).parent.mkdir(parents=True, exist_ok=True)
            (scripts / name).write_text(source)
        script = "\n".join(
            [
                "set -e",
                *(s.strip().replace("path/to/alembic", shlex.quote(str(scripts))) for s in steps),
            ]
        )
        # Another shell of the same user: the same PATH, no RETORT_* of the test's.
        shell_env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
        ran = subprocess.run(
            ["bash", "-c", script],
            env=shell_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ran.returncode == 0, (steps, ran.stdout, ran.stderr)
        assert "succeeded" in ran.stdout, ran.stdout

        for name in CHILDREN:
            assert (logs / f"{name}.log").is_file(), name
        worker_log = (logs / "worker.log").read_text(errors="replace")
        assert "[tasks]" in worker_log, worker_log[-2000:]  # Celery's banner: here, not above
        assert re.search(r"Task jobs\.run\[.+\] received", worker_log), worker_log[-2000:]
        assert "Listening at" in (logs / "api.log").read_text()

        # Ctrl-C while a migration runs: it is handed back, everything stops, quickly.
        job = start_slow_job(serve)
        tree = descendants(serve.proc.pid)
        assert len(tree) >= len(CHILDREN), tree
        stopped_at = time.monotonic()
        os.killpg(serve.proc.pid, signal.SIGINT)  # what the terminal's Ctrl-C sends
        assert serve.exit(timeout=30) == 0, serve.output
        took = time.monotonic() - stopped_at
        assert took < 20, (took, serve.output)
        after = serve.output[len(out) :]
        assert [line for line in after if line.startswith("stopping")] == [after[0]], after
        assert after[-1] == "stopped.", after
        assert not [line for line in serve.output if "Traceback" in line], serve.output
        assert not [pid for pid in tree if alive(pid)], [p for p in tree if alive(p)]
        with sqlite3.connect(data_dir / "retort.db") as state:
            (state_of_job,) = state.execute(
                "SELECT state FROM jobs WHERE id = ?", (job,)
            ).fetchone()
        assert state_of_job == "queued", state_of_job  # handed back, not lost
    finally:
        serve.kill()


def start_slow_job(serve: Serve) -> int:
    """A migration that runs for two minutes, once it runs: its job's id."""
    token = (serve.data_dir / "admin-token").read_text().strip()
    c = Client(f"http://127.0.0.1:{serve.port}", token)
    slow = {"versions/s1.py": revision("s1", None, "import time; time.sleep(120)")}
    project, _ = setup_project(c, slow)
    db = register_db(c, project, f"sqlite:///{serve.data_dir / 'targets' / 'slow.db'}")
    job = c.post("/v1/jobs", {"database": db}).body["id"]
    c.wait_state(job, "running", timeout=60)
    return job


def test_a_second_ctrl_c_kills_at_once(backends, tmp_path):
    data_dir = tmp_path / "data"
    serve = Serve(data_dir, free_port(), _env(data_dir))  # a 25 s shutdown grace
    try:
        serve.wait_for("Press Ctrl-C to stop.")
        start_slow_job(serve)
        tree = descendants(serve.proc.pid)
        os.killpg(serve.proc.pid, signal.SIGINT)
        serve.wait_for("stopping", timeout=10)
        stopped_at = time.monotonic()
        os.killpg(serve.proc.pid, signal.SIGINT)
        assert serve.exit(timeout=30) == 0, serve.output
        assert time.monotonic() - stopped_at < 5, serve.output
    finally:
        serve.kill()
    assert any(line.startswith("killed at once: ") for line in serve.output), serve.output
    assert "worker" in next(x for x in serve.output if x.startswith("killed at once")), serve.output
    assert not [line for line in serve.output if "Traceback" in line], serve.output
    assert not [pid for pid in tree if alive(pid)], [p for p in tree if alive(p)]


def test_a_child_that_dies_at_start_is_named_with_its_last_lines(backends, tmp_path):
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        serve = Serve(data_dir, port, _env(data_dir))
        try:
            tree: set[int] = set()
            deadline = time.monotonic() + 120
            while serve.proc.poll() is None:  # the stack's processes, while it has them
                tree |= descendants(serve.proc.pid)
                assert time.monotonic() < deadline, serve.output
                time.sleep(0.2)
            assert serve.exit(timeout=60) == 1, serve.output
        finally:
            serve.kill()
    out = died(serve, "api", "exited (1)", tree)
    assert re.search(r"^  \| .*(Connection in use|Can't connect)", out, re.M), out
    assert "Retort is running" not in out, out


def test_a_child_that_dies_later_stops_the_stack_and_is_named(backends, tmp_path):
    data_dir = tmp_path / "data"
    serve = Serve(data_dir, free_port(), _env(data_dir))
    try:
        serve.wait_for("Press Ctrl-C to stop.")
        tree = descendants(serve.proc.pid)
        (sweeper,) = [p for p in tree if b"worker.sweep" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(sweeper, signal.SIGKILL)
        assert serve.exit(timeout=60) == 1, serve.output
    finally:
        serve.kill()
    died(serve, "sweeper", "was killed by signal 9", tree)


def died(serve: Serve, name: str, how: str, tree: set[int]) -> str:
    """Check serve named the dead child with its log's tail and left nothing running."""
    out = "\n".join(serve.output)
    assert f"error: the {name} process {how}; the last lines of " in out, out
    assert str(serve.data_dir / "logs" / f"{name}.log") in out, out
    assert "Traceback" not in out, out
    assert not [pid for pid in tree if alive(pid)], tree
    return out
