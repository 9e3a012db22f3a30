"""projects.latest_bundle_pk, bundles.pushed_at, databases.removed_at: registrations that change

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("bundles") as batch:
        # When the bundle was last pushed or promoted: the order of the bundle list.
        batch.add_column(sa.Column("pushed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE bundles SET pushed_at = created_at")
    # The bundle a job without `bundle` runs. SQLite cannot add a foreign key to
    # an existing table but inline (and rebuilding `projects`, which other
    # tables refer to, fails once rows exist while foreign keys are enforced).
    op.add_column(
        "projects",
        sa.Column(
            "latest_bundle_pk",
            sa.Integer,
            sa.ForeignKey("bundles.pk", name=op.f("fk_projects_latest_bundle_pk_bundles")),
            nullable=True,
        ),
        inline_references=sqlite,
    )
    # Latest was the newest upload until now.
    op.execute(
        "UPDATE projects SET latest_bundle_pk = "
        "(SELECT max(bundles.pk) FROM bundles WHERE bundles.project_id = projects.id)"
    )
    with op.batch_alter_table("databases") as batch:
        # A removed registration: its row stays for its jobs, renamed `name~id`.
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("databases") as batch:
        batch.drop_column("removed_at")
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("projects") as batch:
            batch.drop_column("latest_bundle_pk")
    else:
        op.drop_constraint(
            op.f("fk_projects_latest_bundle_pk_bundles"), "projects", type_="foreignkey"
        )
        op.drop_column("projects", "latest_bundle_pk")
    with op.batch_alter_table("bundles") as batch:
        batch.drop_column("pushed_at")
