"""A worker process's runner pool: runners started ahead for a rollout's next files."""

from __future__ import annotations

import time

import pytest

from service.config import Config
from service.jobs.run.sandbox import RunnerPool, RunnerSpec, probe
from service.jobs.run.sqlite_binds import cut
from service.jobs.run.target_files import prepare_for_sandbox, sqlite_path


@pytest.fixture
def pool(tmp_path):
    found = probe("bwrap")
    assert found.mode == "bwrap", f"bubblewrap must run here: {found.reason}"
    config = Config("sqlite://", "redis://unused", tmp_path / "data", "x", ("k",))
    pool = RunnerPool(config, found)
    yield pool
    pool.close_all()


def _specs(tmp_path, names: str, size: int) -> list[RunnerSpec]:
    paths = [sqlite_path(str(tmp_path / f"{n}.db")) for n in names]
    for p in paths:
        prepare_for_sandbox(p)
    groups = cut(paths, size)
    return [RunnerSpec(7, sqlite_files=g, bind_group=i) for i, g in enumerate(groups.groups)]


def test_a_runner_started_ahead_is_the_one_the_next_group_takes(pool, tmp_path):
    first, second = _specs(tmp_path, "abcd", 2)
    assert second.sqlite_files == {sqlite_path(str(tmp_path / n)) + ".db" for n in "cd"}
    pool.prepare(second)
    pool.prepare(second)  # asked twice: one runner
    deadline = time.monotonic() + 60
    while not pool.ready(second) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.ready(second) and not pool.ready(first)
    runner = pool.take(second, [sqlite_path(str(tmp_path / "c.db"))])
    assert runner.alive() and runner.spec.sqlite_files == second.sqlite_files
    assert sorted(runner.bound) == sorted(
        f"{p}{suffix}" for p in second.sqlite_files for suffix in ("", "-journal")
    )
    assert not pool.ready(second)  # taken, not copied
    pid = runner.proc.pid
    pool.give_back(runner, 0)
    assert pool.ready(second)
    pool.close_all()
    assert runner.proc.poll() is not None, pid


def test_nothing_is_started_ahead_when_runners_are_not_kept(tmp_path):
    found = probe("bwrap")
    config = Config(
        "sqlite://", "redis://unused", tmp_path / "data", "x", ("k",), runner_max_warm=0
    )
    pool = RunnerPool(config, found)
    (spec,) = _specs(tmp_path, "a", 2)
    pool.prepare(spec)  # returns at once: no runner is started ahead
    assert not pool.ready(spec) and pool._spawner is None
    pool.close_all()
