"""Device vital readings; appointment notes; provider schedule index.

Revision ID: 0003
Revises: 0002
Create Date: 2024-06-20 11:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Raw device telemetry, appended as it arrives: deliberately no primary key, no unique
    # index and no foreign key, as such tables often are in real applications.
    op.create_table(
        "vital_readings",
        sa.Column("patient_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("reading_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("value", postgresql.DOUBLE_PRECISION),
    )

    op.add_column("appointments", sa.Column("notes", sa.Text, nullable=True))
    op.create_index(
        "ix_appointments_provider_scheduled", "appointments", ["provider_id", "scheduled_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_appointments_provider_scheduled", table_name="appointments")
    op.drop_column("appointments", "notes")
    op.drop_table("vital_readings")
