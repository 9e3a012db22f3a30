"""Apply and check Retort's own schema (the `migrations/` directory)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade_schema(database_url: str) -> None:
    """Bring Retort's state database to the newest schema (idempotent)."""
    command.upgrade(alembic_config(database_url), "head")


def check_schema(database_url: str) -> None:
    """Raise if the models differ from what the migrations build (`alembic check`)."""
    command.check(alembic_config(database_url))
