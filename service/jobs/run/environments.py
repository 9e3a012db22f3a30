"""Per-project Python environments: one virtual environment per requirement set, per machine.

A project that declares requirements (settings.requirements, else the
bundle's requirements.txt; docs/environments.md) runs its revisions in a
virtual environment built from them: `<data>/envs/<key>`, keyed by the
normalized requirement set and the Python version. It is built once per worker
machine, by the first job that needs it (its pool process, before it claims
the job; others wait on the same file lock), with pip from the configured
package index or wheel folder, and kept for every later job.

The runner runs the environment's interpreter with the environment's packages
first on its path and the worker's own after them: what the project pins wins
(SQLAlchemy, Alembic, its extensions), what it does not name is the worker's
(the database drivers, Retort's runner code). A build that fails fails the
job with `environment_failed` and pip's own last lines. At most
`env_cache_max` environments are kept; the least recently used one that no
runner holds is removed first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from service.config import Config
from service.projects.requirements import RequirementError, canonical_name, normalized

READY = "retort-env.json"
# The oldest Alembic the runner is tested with (docs/environments.md).
MIN_ALEMBIC = "alembic>=1.12"
PIP_TAIL_LINES = 25


class EnvironmentFailed(Exception):
    """The environment could not be built; the message ends with pip's own words."""


@dataclass(frozen=True)
class EnvSpec:
    """A requirement set to run a project's revisions with."""

    key: str
    requirements: tuple[str, ...]
    source: str  # "settings" | "requirements.txt"


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def spec_for(settings: dict, bundle_requirements: str | None) -> EnvSpec | None:
    """The project's requirement set: its settings' lines, else the bundle's file; None if none."""
    lines = list(settings.get("requirements") or [])
    source = "settings"
    if not lines and bundle_requirements:
        lines, source = bundle_requirements.splitlines(), "requirements.txt"
    try:
        reqs = normalized(lines)
        names = {canonical_name(r) for r in reqs}
    except RequirementError as exc:  # checked at upload; a bundle of an older Retort
        raise EnvironmentFailed(f"{source}: {exc}") from None
    if not reqs:
        return None
    if "sqlalchemy" in names and "alembic" not in names:
        # An Alembic that goes with the SQLAlchemy the project chose (the
        # worker's own may not: Alembic 1.14 and later need SQLAlchemy 2).
        reqs = sorted([*reqs, MIN_ALEMBIC])
    digest = hashlib.sha256("\n".join([python_tag(), *reqs]).encode()).hexdigest()[:16]
    return EnvSpec(key=digest, requirements=tuple(reqs), source=source)


class Environments:
    """The environments of this machine (one object per worker process)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.data_dir / "envs"
        self._held: dict[str, int] = {}  # key -> fd of a shared lock while runners use it

    def path(self, key: str) -> Path:
        return self.root / key

    def ready(self, spec: EnvSpec) -> dict | None:
        try:
            return json.loads((self.path(spec.key) / READY).read_text())
        except (OSError, ValueError):
            return None

    def ensure(self, spec: EnvSpec, on_build=None) -> Path:
        """The environment's interpreter, built first if this machine has none yet.

        `on_build(state, detail)` is told "building" before a build starts here
        (or while another process of this machine builds it) and "built" after.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        deadline = time.monotonic() + self.config.env_build_timeout_s
        told = False
        built = False
        while self.ready(spec) is None:
            # The builder holds the lock exclusively; once the environment is
            # ready its users hold it shared, so a waiter looks for `ready`
            # between tries instead of waiting for a lock it may never get.
            fd = os.open(self.root / f"{spec.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if on_build and not told:
                    on_build("building", {"requirements": list(spec.requirements)})
                    told = True
                if time.monotonic() > deadline:
                    raise EnvironmentFailed(
                        "another process of this machine kept building the environment for "
                        f"more than {self.config.env_build_timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
                continue
            try:
                if self.ready(spec) is None:
                    if on_build and not told:
                        on_build("building", {"requirements": list(spec.requirements)})
                        told = True
                    took = self._build(spec)
                    built = True
                    if on_build:
                        on_build("built", {"seconds": round(took, 1)})
            finally:
                os.close(fd)
        if built:
            self._evict(keep=spec.key)
        self._hold(spec.key)
        os.utime(self.path(spec.key) / READY)  # its last use, for eviction
        return self.path(spec.key) / "bin" / "python"

    # ------------------------------------------------------------- building
    def _pip_options(self) -> list[str]:
        c = self.config
        # Wheels only: building a source distribution runs its setup code here,
        # in the worker's process and with its authority, outside the sandbox.
        # A wheel's install copies files; its code runs only in the runner.
        options = [
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--only-binary",
            ":all:",
        ]
        if c.env_index_url:
            options += ["--index-url", c.env_index_url]
        if c.env_extra_index_url:
            options += ["--extra-index-url", c.env_extra_index_url]
        if c.env_trusted_host:
            options += ["--trusted-host", c.env_trusted_host]
        if c.env_find_links:
            options += ["--find-links", c.env_find_links]
        if c.env_no_index:
            options += ["--no-index"]
        return options

    def _build(self, spec: EnvSpec) -> float:
        started = time.monotonic()
        final = self.path(spec.key)
        work = self.root / f"{spec.key}.building-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a build that died half way
        log_path = self.root / f"{spec.key}.log"
        requirements = self.root / f"{spec.key}.txt"
        requirements.write_text("\n".join(spec.requirements) + "\n")
        deadline = started + self.config.env_build_timeout_s
        steps = [
            [sys.executable, "-m", "venv", "--without-pip", str(work)],
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(work / "bin" / "python"),
                "install",
                *self._pip_options(),
                "-r",
                str(requirements),
            ],
        ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PIP_CACHE_DIR": str(self.root / "pip-cache"),
        }
        with open(log_path, "w") as log:
            for argv in steps:
                left = deadline - time.monotonic()
                try:
                    done = subprocess.run(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        timeout=max(left, 1),
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    shutil.rmtree(work, ignore_errors=True)
                    raise EnvironmentFailed(
                        f"building the environment took longer than "
                        f"{self.config.env_build_timeout_s:.0f} s (RETORT_ENV_BUILD_TIMEOUT_S)"
                    ) from None
                if done.returncode:
                    log.flush()
                    shutil.rmtree(work, ignore_errors=True)
                    raise EnvironmentFailed(_pip_says(log_path))
        meta = {
            "key": spec.key,
            "requirements": list(spec.requirements),
            "python": python_tag(),
            "built_at": time.time(),
            "seconds": round(time.monotonic() - started, 1),
        }
        (work / READY).write_text(json.dumps(meta))
        os.replace(work, final)
        return time.monotonic() - started

    # -------------------------------------------------------------- locking
    def _hold(self, key: str) -> None:
        """A shared lock for as long as this process may run runners in it."""
        if key in self._held:
            return
        fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[key] = fd

    def release_all(self) -> None:
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    def _evict(self, keep: str) -> None:
        """Remove the least recently used environments past env_cache_max (none in use)."""
        envs = []
        for path in self.root.iterdir():
            marker = path / READY
            if path.is_dir() and marker.exists():
                envs.append((marker.stat().st_mtime, path.name))
        envs.sort()
        excess = len(envs) - max(self.config.env_cache_max, 1)
        for _, key in envs:
            if excess <= 0:
                break
            if key == keep or key in self._held:
                continue
            fd = os.open(self.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a runner somewhere on this machine uses it
            try:
                shutil.rmtree(self.path(key), ignore_errors=True)
                excess -= 1
            finally:
                os.close(fd)


def _pip_says(log_path: Path) -> str:
    """pip's last lines: what a user needs to fix the requirement."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    tail = [line for line in lines if line.strip()][-PIP_TAIL_LINES:]
    return "pip could not install the requirements:\n" + "\n".join(tail)
