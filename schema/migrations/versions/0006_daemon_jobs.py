"""The daemon's schedule: APScheduler 3's job store table, one row per suite.

Columns as APScheduler's ``SQLAlchemyJobStore`` defines them (it would create the
table itself; creating it here keeps the migrations and ``schema.tables`` whole).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "daemon_jobs",
        sa.Column("id", sa.Unicode(191), primary_key=True),
        sa.Column("next_run_time", sa.Float(25)),
        sa.Column("job_state", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_daemon_jobs_next_run_time", "daemon_jobs", ["next_run_time"])


def downgrade() -> None:
    op.drop_index("ix_daemon_jobs_next_run_time", table_name="daemon_jobs")
    op.drop_table("daemon_jobs")
