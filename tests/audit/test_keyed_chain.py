"""Issue 16, item 1: a chain only Retort's key can extend, checkpoints a truncation cannot pass.

The attacker here can write the state database (they drop the append-only
triggers), recompute SHA-256 and rewrite the head: everything but hold the
audit key or the signing key.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from service.audit.chain import GENESIS, ChainCheck, event_hash, hashed_fields
from service.audit.checkpoints import load_signing_key, make_checkpoint, trusted_public_keys
from service.audit.ops import record_event, verify_chain
from service.db import make_engine, transaction
from service.schema import upgrade_schema
from service.sessions import make_state_sessions

KEY = "the-audit-key-of-this-installation"


@pytest.fixture
def state(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade_schema(url)
    engine = make_engine(url)
    with engine.begin() as conn:  # what an attacker with the database's power does first
        for name in ("audit_events_no_update", "audit_events_no_delete"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
    yield engine, make_state_sessions(engine, (KEY,))
    engine.dispose()


def _record(sessions, n: int) -> None:
    for i in range(n):
        with transaction(sessions) as s:
            record_event(s, "test.event", actor="t", data={"i": i})


def _verify(sessions, **kw) -> dict:
    with transaction(sessions) as s:
        return verify_chain(s, **kw)


def _rows(engine) -> list[dict]:
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT * FROM audit_events ORDER BY seq")).mappings().all()
    out = []
    for r in rows:
        row = dict(r)
        row["data"] = json.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
        ts = row["ts"]
        row["ts"] = dt.datetime.fromisoformat(ts) if isinstance(ts, str) else ts
        out.append(row)
    return out


def _rehash_from(engine, seq: int) -> None:
    """Recompute every hash from `seq` on and point the head at the last: unkeyed, as anyone can."""
    rows = _rows(engine)
    prev = GENESIS if seq == 1 else next(r["hash"] for r in rows if r["seq"] == seq - 1)
    with engine.begin() as c:
        for r in rows:
            if r["seq"] < seq:
                continue
            r["prev_hash"] = prev
            prev = event_hash(hashed_fields(r.get))
            c.execute(
                sa.text("UPDATE audit_events SET prev_hash = :p, hash = :h WHERE seq = :s"),
                {"p": r["prev_hash"], "h": prev, "s": r["seq"]},
            )
        last = max(r["seq"] for r in rows)
        c.execute(sa.text("UPDATE audit_head SET seq = :s, hash = :h"), {"s": last, "h": prev})


def test_a_new_chain_starts_keyed_and_verifies(state):
    engine, sessions = state
    _record(sessions, 4)
    rows = _rows(engine)
    assert rows[0]["action"] == "audit.rekeyed" and rows[0]["data"]["previous_key_id"] is None
    assert all(r["mac"] and r["mac"].split(":")[0] == rows[0]["data"]["key_id"] for r in rows)
    result = _verify(sessions)
    assert result["ok"] is True and result["events"] == 5 and result["first_bad"] is None


def test_an_edited_and_rehashed_event_is_found(state):
    engine, sessions = state
    _record(sessions, 6)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 4"))
    assert _verify(sessions)["first_bad"] == 4  # plain edit: its hash no longer matches
    _rehash_from(engine, 4)  # the whole chain re-hashed after it: every link holds again
    result = _verify(sessions)
    assert result["ok"] is False and result["first_bad"] == 4
    assert "HMAC" in result["reason"]


def test_a_deleted_event_is_found_even_renumbered(state):
    engine, sessions = state
    _record(sessions, 6)
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_events WHERE seq = 3"))
    assert _verify(sessions)["first_bad"] == 3
    # Renumber and re-hash to hide the gap: the HMACs give it away.
    with engine.begin() as c:
        c.execute(sa.text("UPDATE audit_events SET seq = seq - 1 WHERE seq > 3"))
    _rehash_from(engine, 3)
    assert _verify(sessions)["first_bad"] == 3


def test_an_inserted_event_is_found(state):
    engine, sessions = state
    _record(sessions, 3)
    rows = _rows(engine)
    last = rows[-1]
    forged = {**last, "seq": last["seq"] + 1, "actor": "mallory", "prev_hash": last["hash"]}
    forged["hash"] = event_hash(hashed_fields(forged.get))
    forged["data"] = json.dumps(forged["data"])
    with engine.begin() as c:
        c.execute(
            sa.text(
                "INSERT INTO audit_events (seq, ts, actor, action, project, database, job_id,"
                " fencing_token, data, prev_hash, hash, mac) VALUES (:seq, :ts, :actor, :action,"
                " :project, :database, :job_id, :fencing_token, :data, :prev_hash, :hash, :mac)"
            ),
            forged,
        )
        c.execute(
            sa.text("UPDATE audit_head SET seq = :s, hash = :h"),
            {"s": forged["seq"], "h": forged["hash"]},
        )
    result = _verify(sessions)
    assert result["ok"] is False and result["first_bad"] == forged["seq"]


def test_a_chain_from_another_installation_is_refused(state, tmp_path):
    engine, sessions = state
    _record(sessions, 3)
    other = make_state_sessions(engine, ("another-installation's-key",))
    result = _verify(other)
    assert result["ok"] is False and result["first_bad"] == 1


def test_a_rotated_key_carries_the_chain_on(state):
    engine, sessions = state
    _record(sessions, 2)
    rotated = make_state_sessions(engine, ("the-new-key", KEY))
    _record(rotated, 2)
    actions = [r["action"] for r in _rows(engine)]
    assert actions.count("audit.rekeyed") == 2
    assert _verify(rotated)["ok"] is True
    assert _verify(make_state_sessions(engine, ("the-new-key",)))["ok"] is False  # old part


def test_an_unkeyed_chain_carries_on_from_audit_rekeyed(state):
    """A chain written before the key existed: its events have no mac; it goes on keyed."""
    engine, sessions = state
    prev, ts = GENESIS, dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as c:
        for seq in (1, 2, 3):
            row = {
                "seq": seq, "ts": ts, "actor": "old", "action": "job.created", "project": "p",
                "database": "d", "job_id": seq, "fencing_token": None, "data": {"n": seq},
                "prev_hash": prev,
            }  # fmt: skip
            prev = event_hash(hashed_fields(row.get))
            c.execute(
                sa.text(
                    "INSERT INTO audit_events (seq, ts, actor, action, project, database, job_id,"
                    " fencing_token, data, prev_hash, hash) VALUES (:seq, :ts, :actor, :action,"
                    " :project, :database, :job_id, :fencing_token, :data, :prev_hash, :hash)"
                ),
                {**row, "data": json.dumps(row["data"]), "hash": prev},
            )
        c.execute(sa.text("UPDATE audit_head SET seq = 3, hash = :h, key_id = NULL"), {"h": prev})
    _record(sessions, 2)
    rows = _rows(engine)
    assert [r["action"] for r in rows][3] == "audit.rekeyed" and rows[2]["mac"] is None
    assert _verify(sessions)["ok"] is True
    # Strip the keyed part back to "legacy" by re-hashing without macs: refused.
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_events WHERE seq = 4"))
        c.execute(sa.text("UPDATE audit_events SET seq = seq - 1, mac = NULL WHERE seq > 4"))
    _rehash_from(engine, 4)
    assert _verify(sessions)["ok"] is False


def test_a_truncated_tail_is_caught_against_a_signed_checkpoint(state, tmp_path):
    engine, sessions = state
    key = load_signing_key(tmp_path / "keys" / "audit-signing-key")
    public = trusted_public_keys(tmp_path / "keys" / "audit-signing-key")
    _record(sessions, 5)
    with transaction(sessions) as s:
        cp = make_checkpoint(s, key)
    assert cp["seq"] == 6
    assert _verify(sessions, public_keys=public)["checkpoints"] == 1
    # Cut the last three events and move the head back: links and HMACs all hold.
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_events WHERE seq > 4"))
        h = c.execute(sa.text("SELECT hash FROM audit_events WHERE seq = 4")).scalar()
        c.execute(sa.text("UPDATE audit_head SET seq = 4, hash = :h"), {"h": h})
    result = _verify(sessions, public_keys=public)
    assert result["ok"] is False and result["first_bad"] == 5 and "truncated" in result["reason"]
    # Delete the checkpoint rows too: the copy kept outside the database still says so.
    with engine.begin() as c:
        c.execute(sa.text("DELETE FROM audit_checkpoints"))
    assert _verify(sessions, public_keys=public)["ok"] is True  # the database alone is fooled
    result = _verify(sessions, public_keys=public, outside_checkpoints=[cp])
    assert result["ok"] is False and result["first_bad"] == 5
    # A checkpoint signed by some other key is no checkpoint.
    forged = {**cp, "seq": 4, "hash": h}
    assert _verify(sessions, public_keys=public, outside_checkpoints=[forged])["ok"] is False


def test_offline_check_needs_a_signed_checkpoint(state, tmp_path):
    engine, sessions = state
    _record(sessions, 3)
    rows = _rows(engine)
    check = ChainCheck(keyring=None)
    assert all(check.feed(r) for r in rows)
    result = check.result([], [])
    assert result["ok"] is False and "no checkpoint" in result["reason"]
