"""Initial tables: vantage points, runs, measurements, observations.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "vantage_points",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("probe_id", sa.String(36), nullable=False, index=True),
        sa.Column("asn", sa.Integer, nullable=False),
        sa.Column("cc", sa.String(2), nullable=False),
        sa.Column("network_name", sa.Text),
        sa.Column("network_type", sa.String(16)),
        sa.Column("resolver_ip", sa.String(64)),
        sa.Column("resolver_asn", sa.Integer, nullable=False),
        sa.Column("resolver_network_name", sa.Text),
        sa.Column("software_name", sa.String(32), nullable=False),
        sa.Column("software_version", sa.String(32), nullable=False),
        sa.Column("platform", sa.String(64), nullable=False),
        sa.Column("architecture", sa.String(32), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("suite", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column(
            "vantage_point_id", sa.Integer, sa.ForeignKey("vantage_points.id"), nullable=False
        ),
        sa.Column("measurement_count", sa.Integer, nullable=False),
    )
    op.create_table(
        "measurements",
        sa.Column("measurement_uid", sa.String(36), primary_key=True),
        sa.Column(
            "run_id", sa.String(36), sa.ForeignKey("runs.run_id"), nullable=False, index=True
        ),
        sa.Column(
            "vantage_point_id", sa.Integer, sa.ForeignKey("vantage_points.id"), nullable=False
        ),
        sa.Column("data_format_version", sa.String(16), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("target_id", sa.String(128), nullable=False),
        sa.Column("target_kind", sa.String(8), nullable=False),
        sa.Column("input", sa.Text, nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("test_runtime", sa.Float, nullable=False),
        sa.Column("failure", sa.Text),
        sa.Column("observation_count", sa.Integer, nullable=False),
        sa.Column("target", JSONType, nullable=False),
        sa.Column("annotations", JSONType, nullable=False),
        sa.Index("ix_measurements_service_time", "service", "start_time"),
    )
    op.create_table(
        "observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "measurement_uid",
            sa.String(36),
            sa.ForeignKey("measurements.measurement_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hostname", sa.Text),
        sa.Column("address", sa.String(64)),
        sa.Column("port", sa.Integer),
        sa.Column("failure", sa.Text),
        sa.Column("failed_operation", sa.String(16)),
        sa.Column("t0", sa.Float, nullable=False),
        sa.Column("t", sa.Float, nullable=False),
        sa.Column("data", JSONType, nullable=False),
        sa.UniqueConstraint("measurement_uid", "kind", "seq", name="uq_observation_seq"),
    )


def downgrade() -> None:
    op.drop_table("observations")
    op.drop_table("measurements")
    op.drop_table("runs")
    op.drop_table("vantage_points")
