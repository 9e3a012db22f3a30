"""A target is never Retort itself or the host, and no target can hang Retort.

Registrations of Retort's own state database, of its data directory and of
host paths outside the SQLite roots are refused with a 422 that tells nothing
about the host's files; a target that accepts connections and never answers
costs a bounded wait to the one request that asked, while others are served.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from service import targets
from service.config import Config
from service.errors import InvalidError
from tests.helpers import chain_bundle, register_db, setup_project, unique

# A silent target may cost a request this long (the tests' connect timeout is 2 s);
# other requests meanwhile answer within PROMPT_S, well below that 2 s wait.
BOUND_S = 15
PROMPT_S = 1.0


class SilentServer:
    """A TCP port that accepts connections and never sends a byte: a hung server."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def refused(r, code: str) -> dict:
    assert r.status == 422, r
    assert r.body["error"]["code"] == code, r
    assert r.body["error"]["details"]["field"] == "url", r
    return r.body


def post_db(c, project: str, url: str):
    return c.post("/v1/databases", {"name": unique("t"), "project": project, "url": url})


# ---------------------------------------------------------------- registration, end to end


def test_the_state_database_is_refused_under_any_name_of_its_host(prod):
    c = prod.client
    project, _ = setup_project(c)
    state = make_url(prod.env["RETORT_DATABASE_URL"])
    same = [
        state.render_as_string(hide_password=False),
        f"postgresql://{state.username}@localhost/{state.database}",  # default port
        f"postgres://someone:pw@[::1]:5432/{state.database}",
        f"postgresql://x@{socket.gethostname()}:5432/{state.database}",
        f"postgresql://x@0.0.0.0/{state.database}",
    ]
    for url in same:
        body = refused(post_db(c, project, url), "target_is_retort")
        assert "state database" in body["error"]["message"]
    # The driver would let the query string name another host, port or database.
    for url in (
        f"postgresql://x@elsewhere/other?dbname={state.database}",
        f"postgresql://x@elsewhere/{state.database}?host=127.0.0.1",
        "mysql://root@elsewhere/x?local_infile=1",
    ):
        refused(post_db(c, project, url), "url_option_not_allowed")
    # Another database on the same server, or the same name on another port, is a target.
    register_db(c, project, f"postgresql://x@127.0.0.1:5432/{state.database}_other")
    register_db(c, project, f"postgresql://x@127.0.0.1:5433/{state.database}")


def test_the_embedded_state_file_and_data_directory_are_refused(embedded, tmp_path):
    c = embedded.client
    project, _ = setup_project(c)
    state_file = embedded.log_dir / "retort.db"
    assert state_file.exists()
    link = tmp_path / "innocent.db"
    link.symlink_to(state_file)
    hard = tmp_path / "hard.db"
    os.link(state_file, hard)
    for path in (state_file, link, hard, f"{state_file}-wal"):
        body = refused(post_db(c, project, f"sqlite:///{path}"), "target_is_retort")
        assert "state database" in body["error"]["message"]
    # Anything else in the data directory, whether it exists or not.
    for name in ("secret-key", "admin-token", "bundle-cache/x.db", "nothing-here.db"):
        refused(post_db(c, project, f"sqlite:///{embedded.log_dir / name}"), "target_is_retort")


def test_sqlite_paths_outside_the_roots_are_refused_alike(retort, tmp_path):
    c = retort.client
    project, _ = setup_project(c)
    missing = f"/nonexistent-{unique('x')}/x.db"
    answers = [
        refused(post_db(c, project, f"sqlite:///{path}"), "sqlite_path_not_allowed")
        for path in ("/etc/shadow", missing, "/etc", "/")
    ]
    assert all(a == answers[0] for a in answers), answers  # no file-existence oracle
    message = answers[0]["error"]["message"]
    assert "RETORT_SQLITE_ROOTS" in message and retort.env["RETORT_SQLITE_ROOTS"] in message
    assert answers[0]["error"]["details"]["sqlite_roots"] == [retort.env["RETORT_SQLITE_ROOTS"]]

    (tmp_path / "escape").symlink_to("/etc")
    escapes = [
        f"{tmp_path}/{'../' * 12}etc/shadow",
        f"{tmp_path}/{'../' * 12}tmp/x.db",
        f"{tmp_path}/escape/shadow",
        f"{tmp_path}/escape/new.db",
    ]
    for path in escapes:
        body = refused(post_db(c, project, f"sqlite:///{path}"), "sqlite_path_not_allowed")
        assert body == answers[0], path
    refused(post_db(c, project, "sqlite:///relative.db"), "sqlite_path_not_allowed")
    refused(post_db(c, project, f"sqlite:///{tmp_path}/x.db?uri=true"), "url_option_not_allowed")


def test_a_sqlite_path_under_the_roots_is_a_target(retort, tmp_path):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(1))
    fresh = register_db(c, project, f"sqlite:///{tmp_path / 'sub' / '..' / 'new.db'}")
    shown = c.get(f"/v1/databases/{fresh}").body
    assert shown["current"] == [] and shown["pending"] == ["t001"]
    assert not (tmp_path / "new.db").exists()  # a look does not create it
    (tmp_path / "inside").symlink_to(tmp_path / "real")
    register_db(c, project, f"sqlite:///{tmp_path / 'inside' / 'x.db'}")  # a link within a root


# ---------------------------------------------------------------- a target that never answers


@pytest.mark.parametrize("dialect", ["mysql", "postgresql"])
def test_a_silent_target_costs_one_bounded_request_and_holds_up_nobody(
    retort, silent, dialect, new_db
):
    c = retort.client
    project, _ = setup_project(c, chain_bundle(1))
    scheme = "mysql" if dialect == "mysql" else "postgresql"
    hung = register_db(c, project, f"{scheme}://root:pw@127.0.0.1:{silent.port}/app")
    healthy = register_db(c, project, new_db("sqlite"))
    answer: dict = {}

    def show() -> None:
        started = time.monotonic()
        answer["r"] = c.get(f"/v1/databases/{hung}")
        answer["s"] = time.monotonic() - started

    getter = threading.Thread(target=show)
    getter.start()
    assert silent.accepted.wait(BOUND_S), "the API never connected to the target"
    # While that request waits on the target, a write and another live read are served.
    started = time.monotonic()
    assert c.post("/v1/projects", {"name": unique("p"), "settings": {}}).status == 201
    assert c.get(f"/v1/databases/{healthy}").body["current"] == []
    prompt = time.monotonic() - started
    still_waiting = getter.is_alive()
    getter.join(BOUND_S + 5)
    assert not getter.is_alive(), f"GET /v1/databases/{hung} did not answer in {BOUND_S + 5} s"
    assert prompt < PROMPT_S, f"other requests took {prompt:.1f} s while a target was silent"
    assert still_waiting, "the silent target was not being waited on during the other requests"
    r = answer["r"]
    assert r.status == 200 and answer["s"] < BOUND_S, (answer["s"], r)
    assert r.body["current"] is None and r.body["current_error"], r
    assert r.body["pending"] is None and "pw" not in str(r.body)


# ---------------------------------------------------------------- engines: every wait bounded


def test_a_mysql_migration_engine_connects_to_a_silent_port_within_connect_timeout(silent):
    engine = targets.make_target_engine(make_url(f"mysql+pymysql://u@127.0.0.1:{silent.port}/x"), 1)
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert time.monotonic() - started < 5
    engine.dispose()


def test_mysql_reads_and_writes_are_bounded(new_db):
    """Also the contract with PyMySQL's private attributes the engine relies on."""
    url = make_url(new_db("mysql"))
    short = targets.make_target_engine(url, 2, read_timeout_s=1)
    with short.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert (raw._read_timeout, raw._write_timeout) == (1, 12)
        sock = raw._sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12000
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT SLEEP(5)")
        assert time.monotonic() - started < 3
    short.dispose()
    migration = targets.make_target_engine(url, 2, pooled=True)
    with migration.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw._read_timeout == targets.MIGRATION_READ_TIMEOUT_S
        assert conn.exec_driver_sql("SELECT SLEEP(1.5)").scalar() == 0  # past connect_timeout
    migration.dispose()


def test_postgresql_connections_have_keepalives_and_short_reads_a_statement_timeout(new_db):
    url = make_url(new_db("postgresql"))
    short = targets.make_target_engine(url, 2, read_timeout_s=1)
    with short.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()
        assert params["keepalives"] == "1" and params["keepalives_idle"] == "4"
        assert params["tcp_user_timeout"] == "12000"
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1s"
        with pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT pg_sleep(5)")
    short.dispose()
    migration = targets.make_target_engine(url, 2, job_id=7)
    with migration.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"  # the project's
    migration.dispose()


def test_migration_read_timeout_follows_the_statement_timeout():
    assert targets.migration_read_timeout_s({}, 5) == targets.MIGRATION_READ_TIMEOUT_S
    assert targets.migration_read_timeout_s({"statement_timeout_ms": 600000}, 5) == 660.0


# ---------------------------------------------------------------- the rules, without servers


def make_config(tmp_path: Path, **fields) -> Config:
    base = {
        "database_url": "postgresql+psycopg://retort:pw@state-db.internal/retort",
        "broker_url": "redis://x",
        "data_dir": tmp_path / "data",
        "admin_token": "x",
        "secret_keys": (),
        "sqlite_roots": (str(tmp_path / "roots"),),
    }
    return Config(**{**base, **fields})


def check(url: str, config: Config) -> str | None:
    """The code of the refusal, or None if the target is allowed."""
    try:
        targets.check_target(targets.normalize_url(url), config)
    except InvalidError as exc:
        return exc.code
    return None


def test_server_identity_rules(tmp_path):
    config = make_config(tmp_path)
    assert check("postgresql://other@STATE-DB.internal.:5432/retort", config) == "target_is_retort"
    assert check("postgresql://retort@state-db.internal", config) == "target_is_retort"  # db=user
    assert check("postgresql://x@state-db.internal/Retort", config) is None  # names are exact
    assert check("postgresql://x@state-db.internal:6432/retort", config) is None
    assert check("mysql://x@state-db.internal/retort", config) is None  # another family
    local = make_config(tmp_path, database_url="mysql+pymysql://root@localhost/Retort")
    assert check("mariadb://x@127.0.0.2:3306/retort", local) == "target_is_retort"
    assert check("mysql://x@127.0.0.1/other", local) is None
    assert check("mysql://x@127.0.0.1/retort?unix_socket=/run/mysqld.sock", local) == (
        "url_option_not_allowed"
    )
    sqlite_state = make_config(tmp_path, database_url=f"sqlite:///{tmp_path}/data/retort.db")
    assert check("postgresql://x@localhost/retort", sqlite_state) is None


def test_sqlite_path_rules(tmp_path):
    roots = tmp_path / "roots"
    (roots / "tenant").mkdir(parents=True)
    (tmp_path / "data" / "targets").mkdir(parents=True)
    state = tmp_path / "data" / "retort.db"
    state.write_bytes(b"")
    config = make_config(
        tmp_path,
        database_url=f"sqlite:///{state}",
        sqlite_roots=(str(roots), str(tmp_path / "data")),
    )
    assert check(f"sqlite:///{roots}/tenant/a.db", config) is None
    assert check(f"sqlite:///{roots}/not-yet/made/a.db", config) is None
    assert check(f"sqlite:///{tmp_path}/data/targets/a.db", config) is None
    assert check(f"sqlite:///{state}", config) == "target_is_retort"
    assert check(f"sqlite:///{state}-shm", config) == "target_is_retort"
    # A root that holds the data directory opens only its targets/ folder.
    assert check(f"sqlite:///{tmp_path}/data/other.db", config) == "target_is_retort"
    assert check(f"sqlite:///{tmp_path}/data", config) == "target_is_retort"
    assert check(f"sqlite:///{roots}", config) == "sqlite_path_not_allowed"  # the root itself
    assert check(f"sqlite:///{roots}/../elsewhere.db", config) == "sqlite_path_not_allowed"
    assert check(f"sqlite:///{roots}x/a.db", config) == "sqlite_path_not_allowed"  # a sibling
    none = make_config(tmp_path, sqlite_roots=())
    assert check(f"sqlite:///{roots}/tenant/a.db", none) == "sqlite_path_not_allowed"


def test_sqlite_roots_from_the_environment(tmp_path):
    env = {"RETORT_ADMIN_TOKEN": "x", "RETORT_SECRET_KEY": Fernet.generate_key().decode()}
    default = Config.from_env(env=env, data_dir=str(tmp_path))
    assert default.sqlite_roots == (str(tmp_path / "targets"),)
    with pytest.raises(InvalidError) as refusal:
        targets.check_target(targets.normalize_url(f"sqlite:///{tmp_path}/x.db"), default)
    assert f"under {tmp_path / 'targets'}" in refusal.value.message
    assert "RETORT_SQLITE_ROOTS" in refusal.value.message

    many = Config.from_env(
        env={**env, "RETORT_SQLITE_ROOTS": f"/srv/a{os.pathsep}/srv/b/{os.pathsep}"},
        data_dir=str(tmp_path),
    )
    assert many.sqlite_roots == ("/srv/a", "/srv/b")
    none = Config.from_env(env={**env, "RETORT_SQLITE_ROOTS": ""}, data_dir=str(tmp_path))
    assert none.sqlite_roots == ()
    for config in (default, many, none):
        assert Config.from_env(env=config.as_env()) == config
    with pytest.raises(ValueError, match="absolute"):
        Config.from_env(env={**env, "RETORT_SQLITE_ROOTS": "relative/dir"}, data_dir=str(tmp_path))
