"""The API's state engine: no ping per checkout, yet never a connection the server ended."""

import time

import sqlalchemy as sa


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()


def test_a_connection_the_server_ended_is_replaced_at_checkout(backends):
    from service.db import autocommit, make_engine

    url = backends.new("postgresql")
    engine = make_engine(url, ping_idle_after_s=3600)  # so only the socket check can tell
    try:
        first = _backend_pid(engine)
        assert _backend_pid(engine) == first  # pooled: the same session again
        with backends.pg.connect() as admin:  # what a restart does to every session
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        deadline = time.monotonic() + 10
        while True:  # the termination notice reaches the idle socket
            with autocommit(engine) as conn:
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            if pid != first or time.monotonic() > deadline:
                break
        assert pid != first
        with autocommit(engine) as conn:  # and the pool goes on with the new session
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == pid
    finally:
        engine.dispose()
