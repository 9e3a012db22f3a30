from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, DateTime, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base


class AuditEvent(Base):
    """An append-only, hash-chained record; `hash` covers the event and `prev_hash`."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_database_seq", "database", "seq"),
        Index("ix_audit_events_project_seq", "project", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(60))
    project: Mapped[str | None] = mapped_column(String(100), default=None)
    database: Mapped[str | None] = mapped_column(String(100), default=None)
    job_id: Mapped[int | None] = mapped_column(default=None)
    fencing_token: Mapped[int | None] = mapped_column(BigInteger, default=None)
    data: Mapped[dict] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # "<key id>:<HMAC-SHA256(audit key, hash)>": only a holder of the key can
    # extend the chain. NULL before the chain's first `audit.rekeyed` event.
    mac: Mapped[str | None] = mapped_column(String(80), default=None)


class AuditHead(Base):
    """The single row every appender locks first, so the chain has one order."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    # The key the chain is extended with now; another key first appends `audit.rekeyed`.
    key_id: Mapped[str | None] = mapped_column(String(16), default=None)


class AuditCheckpoint(Base):
    """The chain's head at a moment, signed with Retort's Ed25519 key (the sweeper).

    Copies go outside the database too (a file, the log, the chain itself), so
    a truncated tail shows against the last checkpoint.
    """

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)
    hash: Mapped[str] = mapped_column(String(64))
    ts: Mapped[str] = mapped_column(String(40))
    public_key_id: Mapped[str] = mapped_column(String(16))
    signature: Mapped[str] = mapped_column(String(128))
