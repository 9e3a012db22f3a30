"""Long polls are woken by the workers' Redis channel, without a query per wait.

The API's watcher polls its jobs' progress only as a fallback (here every 30 s,
so a test that passes cannot have been saved by it): while the channel is live,
a job that moves between a request's read and its wait still wakes the wait at
once, and a wait costs no query at all.
"""

import threading
import time

import pytest
import sqlalchemy as sa

from tests.helpers import chain_bundle, register_db, run_job, setup_project


@pytest.fixture
def watcher(prod):
    """The watcher of an API of our own on the production state and broker, ticks every 30 s."""
    from service.app import create_app
    from service.config import Config

    app = create_app(
        Config.from_env(env=prod.env, watch_interval_s=30.0, watch_live_interval_s=30.0)
    )
    svc = app.extensions["retort"]
    statements: list[str] = []
    sa.event.listen(svc.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    yield svc, statements
    svc.engine.dispose()


def _until_live(watcher, timeout: float = 10.0) -> None:
    watcher.mark()  # starts the listener
    deadline = time.monotonic() + timeout
    while watcher._live_since is None:
        assert time.monotonic() < deadline, "the Redis channel never confirmed the subscription"
        time.sleep(0.01)


def _publisher(prod):
    from service import notify

    return notify.Publisher(prod.env["RETORT_BROKER_URL"], prod.env["RETORT_QUEUE"])


def test_a_publish_after_the_mark_wakes_the_wait_without_a_query(prod, new_db, watcher):
    svc, statements = watcher
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    job = run_job(c, register_db(c, project, new_db("sqlite")))
    _until_live(svc.watcher)
    statements.clear()

    # Nothing published: the wait times out and never asked the database.
    since = svc.watcher.mark()
    started = time.monotonic()
    assert svc.watcher.wait(job["id"], '"seen"', 0.3, since=since) is False
    assert time.monotonic() - started >= 0.3
    # Published after the mark, before the wait (the job moved after the
    # request's read): the wait returns at once.
    since = svc.watcher.mark()
    _publisher(prod).publish(job["id"])
    deadline = time.monotonic() + 5
    while svc.watcher._moved.get(job["id"], -1) <= since:
        assert time.monotonic() < deadline, "the publish never reached the watcher"
        time.sleep(0.005)
    started = time.monotonic()
    assert svc.watcher.wait(job["id"], '"seen"', 5, since=since) is True
    assert time.monotonic() - started < 0.1
    # Published while the wait is held: woken as it arrives.
    since = svc.watcher.mark()
    publisher = _publisher(prod)
    threading.Timer(0.2, publisher.publish, [job["id"]]).start()
    started = time.monotonic()
    assert svc.watcher.wait(job["id"], '"seen"', 10, since=since) is True
    assert 0.15 < time.monotonic() - started < 5
    assert [s for s in statements if "FROM jobs" in s] == []


def test_a_mark_from_before_the_channel_was_live_looks_at_the_job_at_once(prod, new_db, watcher):
    from service.jobs.watch import JobWatcher

    svc, statements = watcher
    c = prod.client
    project, _ = setup_project(c, chain_bundle(1))
    job = run_job(c, register_db(c, project, new_db("sqlite")))
    # No channel at all (a broker that is not Redis): a wait cannot trust that
    # nothing moved since the read, so it reads the job's progress at once.
    blind = JobWatcher(svc.sessions, 30.0, 8, listen=None)
    since = blind.mark()
    started = time.monotonic()
    assert blind.wait(job["id"], '"an older etag"', 10, since=since) is True
    assert time.monotonic() - started < 5
    assert any("FROM jobs" in s for s in statements)
    # Its progress key is what the job shows: a wait on it holds.
    from service.jobs.ops import job_etag, read_job

    with svc.engine.connect() as conn:
        etag = job_etag(read_job(conn, job["id"]))
    assert blind.wait(job["id"], etag, 0.3, since=blind.mark()) is False
