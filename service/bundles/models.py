from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class Bundle(Base):
    """An immutable, content-addressed set of revision scripts of one project."""

    __tablename__ = "bundles"
    __table_args__ = (UniqueConstraint("project_id", "digest"),)

    pk: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    versions_path: Mapped[str] = mapped_column(String(500))
    # Bundle-relative folders the runner puts first on sys.path; None or [] for
    # none (the folder holding versions/ then, when the bundle has helper modules).
    python_path: Mapped[list | None] = mapped_column(default=None)
    revisions: Mapped[list] = mapped_column()
    heads: Mapped[list] = mapped_column()
    bases: Mapped[list] = mapped_column()
    file_count: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When it was last pushed (its content uploaded, new or again) or promoted:
    # the order of a project's bundle list. Nullable in the schema only: making
    # it NOT NULL would rebuild the referenced bundles table on SQLite.
    pushed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow)


class BundleFile(Base):
    __tablename__ = "bundle_files"

    bundle_pk: Mapped[int] = mapped_column(ForeignKey("bundles.pk"), primary_key=True)
    path: Mapped[str] = mapped_column(String(500), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes] = mapped_column(LargeBinary)
