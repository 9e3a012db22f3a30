from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, DateTime, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class Database(Base):
    """A target database whose schema a project's revisions manage."""

    __tablename__ = "databases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    dialect: Mapped[str] = mapped_column(String(20))
    url_encrypted: Mapped[str] = mapped_column(Text)
    url_masked: Mapped[str] = mapped_column(Text)
    tags: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The newest drift check (a job of kind "drift"): when, and what it found.
    drift_checked_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), default=None
    )
    drifted: Mapped[bool | None] = mapped_column(Boolean, default=None)
    drift_job_id: Mapped[int | None] = mapped_column(default=None)
    # Set by DELETE /v1/databases/{name}: the row stays (its jobs refer to it)
    # under a name of its own (`name~id`), so the name can be registered again.
    removed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class AppliedRevision(Base):
    """The checksum of each revision file applied to a database, for revision_changed."""

    __tablename__ = "applied_revisions"

    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"), primary_key=True)
    revision: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int] = mapped_column()
    applied_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
