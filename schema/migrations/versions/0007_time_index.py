"""An index on (start_time, measurement_uid): the order in which the collector's query
API pages (keyset) and the exporter reads, with or without a service filter.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_measurements_time_uid", "measurements", ["start_time", "measurement_uid"])


def downgrade() -> None:
    op.drop_index("ix_measurements_time_uid", table_name="measurements")
