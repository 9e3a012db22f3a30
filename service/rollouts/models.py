from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow
from service.rollouts.states import RolloutState


class Rollout(Base):
    """One change for many databases of a project: a canary, then waves."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_project_id_id", "project_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    bundle_pk: Mapped[int] = mapped_column(ForeignKey("bundles.pk"))
    action: Mapped[str] = mapped_column(String(20))
    target: Mapped[str] = mapped_column(String(200))
    # The request as given: selector, canary, waves, limits, thresholds.
    selector: Mapped[dict] = mapped_column(default=dict)
    options: Mapped[dict] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(24), default=RolloutState.RUNNING)
    wave: Mapped[int] = mapped_column(Integer, default=0)  # the wave being run
    waves: Mapped[int] = mapped_column(Integer, default=1)  # how many there are
    # Why it halted: {"reason", "message", "wave"}; None while it is not halted.
    halted: Mapped[dict | None] = mapped_column(default=None)
    # Failed jobs a `resume` went on past: they no longer count toward a halt.
    accepted: Mapped[list] = mapped_column(default=list)
    # The next wave starts no earlier than this (pause_between_waves_s).
    resume_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    requested_by: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class RolloutDatabase(Base):
    """One database of a rollout: its wave, its server, and its job once it has one."""

    __tablename__ = "rollout_databases"

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)  # the order within the rollout
    # host:port of the target (a SQLite file is its own server), for max_parallel_per_server.
    server: Mapped[str] = mapped_column(String(300))
    # The database's newest job in this rollout (a retried one has a newer job).
    job_id: Mapped[int | None] = mapped_column(default=None)
    # Why it never got a job: "aborted" (the rollout was), "removed" (the database was).
    skipped: Mapped[str | None] = mapped_column(String(20), default=None)
    # Retort's state says the database is at the target already (its newest job
    # ended there): "candidate", then "checking" while a worker reads its heads
    # (service.rollouts.settle); back to None once read, settled or not.
    settle: Mapped[str | None] = mapped_column(String(10), default=None)
    settle_started_at: Mapped[dt.datetime | None] = mapped_column(
        DateTime(timezone=True), default=None
    )
