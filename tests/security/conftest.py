"""A Retort in the embedded default layout (`retort serve`: SQLite state, Redis on a
unix socket in the data directory), once per sandbox mode, for attacks by revisions."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import _base_env
from tests.helpers import Retort, free_port

MODES = ["bwrap", "process"]


def start_serve(tmp_path_factory, sandbox: str, ready: bool = True, **overrides) -> Retort:
    """`retort serve` with RETORT_SANDBOX=sandbox; `ready`: wait for /readyz to say 200."""
    data_dir = tmp_path_factory.mktemp(f"sec-{sandbox}")
    port = free_port()
    env = _base_env(data_dir)
    env.pop("RETORT_ADMIN_TOKEN")
    env.update(
        {
            "RETORT_SANDBOX": sandbox,
            "RETORT_RUNNER_MEMORY_MB": "1024",
            "RETORT_RUNNER_MAX_RSS_MB": "300",
        }
    )
    env.update({f"RETORT_{k.upper()}": str(v) for k, v in overrides.items()})
    server = Retort(env, port, "", data_dir)
    server.spawn(
        "serve",
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir",
         str(data_dir)],
    )  # fmt: skip
    if ready:
        try:
            server.wait_ready()
        except Exception:
            server.stop()
            raise
        server.token = (data_dir / "admin-token").read_text().strip()
    return server


@pytest.fixture(scope="module", params=MODES)
def sandboxed(request, backends, tmp_path_factory):
    """`retort serve` with RETORT_SANDBOX set to each mode in turn (bwrap is required)."""
    server = start_serve(tmp_path_factory, request.param)
    server.mode = request.param  # type: ignore[attr-defined]
    yield server
    server.stop()


def secrets_of(server: Retort) -> list[str]:
    """What no runner may ever learn: the secret key, the admin token, the state URL."""
    data = server.log_dir
    out = [
        (data / "secret-key").read_text().strip(),
        (data / "admin-token").read_text().strip(),
    ]
    return [s for s in out if s]


def pids_with(text: bytes) -> list[int]:
    """The processes of this machine whose command line holds `text`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def pids_of_runners() -> list[int]:
    return pids_with(b"service.jobs.run.runner_main")
