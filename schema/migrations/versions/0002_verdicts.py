"""Verdicts on measurements, service status per run, blocking events.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("measurements", sa.Column("accessible", sa.Boolean))
    op.add_column("measurements", sa.Column("blocking", sa.String(16)))
    op.add_column("measurements", sa.Column("verdict", JSONType))
    op.create_table(
        "run_services",
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id"), primary_key=True),
        sa.Column("service", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("blocking", JSONType, nullable=False),
        sa.Column("blocked_targets", JSONType, nullable=False),
        sa.Column("explanation", sa.Text, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("probe_id", sa.String(36), nullable=False),
        sa.Column("asn", sa.Integer, nullable=False),
        sa.Column("cc", sa.String(2), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("blocking", JSONType, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("runs", JSONType, nullable=False),
        sa.Index("ix_events_open", "probe_id", "service", "ended_at"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("run_services")
    with op.batch_alter_table("measurements") as batch:
        batch.drop_column("verdict")
        batch.drop_column("blocking")
        batch.drop_column("accessible")
