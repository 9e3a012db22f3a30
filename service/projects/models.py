from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class Project(Base):
    """One lineage of revision scripts: one service."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    settings: Mapped[dict] = mapped_column(default=dict)
    # {name: Fernet token}: project secrets for its runner (ProjectCreate.secret_env).
    secret_env: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The bundle a job without `bundle` runs: the one pushed or promoted last
    # (None: no bundle yet). use_alter: bundles refer to projects too, and the
    # cycle must not be part of the table order.
    latest_bundle_pk: Mapped[int | None] = mapped_column(
        ForeignKey("bundles.pk", use_alter=True), default=None
    )
