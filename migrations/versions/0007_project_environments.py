"""projects.secret_env, jobs.runtime: project secrets for runners, what ran a job

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("secret_env", sa.JSON, nullable=False, server_default="{}"))
    with op.batch_alter_table("jobs") as batch:
        # {environment, python, sqlalchemy, alembic}: what the runner ran with.
        batch.add_column(sa.Column("runtime", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("runtime")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("secret_env")
