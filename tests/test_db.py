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
            gone = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            deadline = time.monotonic() + 10
            while admin.execute(gone, {"pid": first}).scalar_one():  # its notice was sent
                assert time.monotonic() < deadline, "the backend did not end"
                time.sleep(0.01)
        with autocommit(engine) as conn:  # no error: the ended connection is replaced
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert pid != first
        with autocommit(engine) as conn:  # and the pool goes on with the new session
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == pid
    finally:
        engine.dispose()
