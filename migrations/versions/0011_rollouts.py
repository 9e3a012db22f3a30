"""rollouts, rollout_databases; jobs.rollout_id, waiting_for, waiting_since: fleet rollouts

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-11
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("bundle_pk", sa.Integer, sa.ForeignKey("bundles.pk"), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("selector", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("waves", sa.Integer, nullable=False),
        sa.Column("halted", sa.JSON, nullable=True),
        sa.Column("accepted", sa.JSON, nullable=False),
        sa.Column("resume_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requested_by", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_rollouts_project_id_id", "rollouts", ["project_id", "id"])
    op.create_table(
        "rollout_databases",
        sa.Column("rollout_id", sa.Integer, sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column("database_id", sa.Integer, sa.ForeignKey("databases.id"), primary_key=True),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("server", sa.String(300), nullable=False),
        sa.Column("job_id", sa.Integer, nullable=True),
        sa.Column("skipped", sa.String(20), nullable=True),
    )
    op.add_column(
        "jobs",
        sa.Column(
            "rollout_id",
            sa.Integer,
            sa.ForeignKey("rollouts.id", name=op.f("fk_jobs_rollout_id_rollouts")),
            nullable=True,
        ),
        inline_references=sqlite,
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("waiting_for", sa.String(20), nullable=True))
        batch.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("waiting_since")
        batch.drop_column("waiting_for")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("jobs") as batch:
            batch.drop_column("rollout_id")
    else:
        op.drop_constraint(op.f("fk_jobs_rollout_id_rollouts"), "jobs", type_="foreignkey")
        op.drop_column("jobs", "rollout_id")
    op.drop_table("rollout_databases")
    op.drop_index("ix_rollouts_project_id_id", "rollouts")
    op.drop_table("rollouts")
