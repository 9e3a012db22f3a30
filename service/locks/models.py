from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base


class Lease(Base):
    """The lease on one target database; `token` is the fencing token and only grows."""

    __tablename__ = "leases"

    database_id: Mapped[int] = mapped_column(ForeignKey("databases.id"), primary_key=True)
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    holder_job_id: Mapped[int | None] = mapped_column(default=None)
    holder: Mapped[str | None] = mapped_column(default=None)
    # Epoch seconds on the state database's clock.
    acquired_at: Mapped[float | None] = mapped_column(Float, default=None)
    expires_at: Mapped[float | None] = mapped_column(Float, default=None)
