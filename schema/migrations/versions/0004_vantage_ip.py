"""The probe's public IP on its vantage point, kept only when the volunteer opts in
(``privacy.store_ip = true``); NULL otherwise, and never part of the wire format.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vantage_points") as batch:
        batch.add_column(sa.Column("public_ip", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vantage_points") as batch:
        batch.drop_column("public_ip")
