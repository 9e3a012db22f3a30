"""bundles.python_path: the bundle's folders put on the runner's import path

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bundles") as batch:
        # A list of bundle-relative folders; NULL for bundles uploaded without one.
        batch.add_column(sa.Column("python_path", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bundles") as batch:
        batch.drop_column("python_path")
