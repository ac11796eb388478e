"""Prescriptions and lab results.

Revision ID: 0002
Revises: 0001
Create Date: 2024-03-04 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "prescriptions",
        # BigInteger + primary key + autoincrement renders as BIGSERIAL: a sequence owned by
        # the column, the pre-identity way most older apps still have.
        sa.Column("prescription_id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column(
            "appointment_id",
            sa.BigInteger,
            sa.ForeignKey("appointments.appointment_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("drug_code", sa.Text, nullable=False),
        sa.Column("dose", sa.Numeric(10, 3), nullable=False),
        sa.Column("refills", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("details", postgresql.JSONB),
        sa.Column("prescribed_on", sa.Date, nullable=False),
        sa.CheckConstraint("refills >= 0", name="ck_prescriptions_refills_nonnegative"),
    )
    op.create_index("ix_prescriptions_appointment_id", "prescriptions", ["appointment_id"])

    op.create_table(
        "lab_results",
        sa.Column(
            "patient_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("patients.patient_id"),
            nullable=False,
        ),
        sa.Column("test_code", sa.Text, nullable=False),
        sa.Column("collected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value", sa.Numeric),
        sa.Column("unit", sa.Text),
        sa.Column("flags", postgresql.ARRAY(sa.Text)),
        sa.Column("raw", postgresql.BYTEA),
        sa.Column("reference_range", postgresql.NUMRANGE),
        sa.PrimaryKeyConstraint("patient_id", "test_code", "collected_at"),
    )
    op.create_index("ix_lab_results_test_code", "lab_results", ["test_code"])


def downgrade() -> None:
    op.drop_table("lab_results")
    op.drop_table("prescriptions")
