"""Initial tables: providers, patients, appointments.

Revision ID: 0001
Revises:
Create Date: 2024-01-15 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SPECIALTY = postgresql.ENUM(
    "family_medicine",
    "internal_medicine",
    "pediatrics",
    "cardiology",
    "dermatology",
    "oncology",
    "psychiatry",
    "radiology",
    name="specialty",
    create_type=False,
)
SEX = postgresql.ENUM("female", "male", "intersex", "unknown", name="sex", create_type=False)
APPOINTMENT_STATUS = postgresql.ENUM(
    "scheduled",
    "checked_in",
    "completed",
    "cancelled",
    "no_show",
    name="appointment_status",
    create_type=False,
)
TIMESTAMPTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    bind = op.get_bind()
    for enum in (SPECIALTY, SEX, APPOINTMENT_STATUS):
        enum.create(bind, checkfirst=True)

    op.create_table(
        "providers",
        sa.Column("provider_id", sa.Integer, sa.Identity(always=True), primary_key=True),
        sa.Column("npi", sa.Text, nullable=False, unique=True),
        sa.Column("full_name", sa.Text, nullable=False),
        sa.Column("specialty", SPECIALTY, nullable=False),
        sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    )

    op.create_table(
        "patients",
        sa.Column(
            "patient_id",
            postgresql.UUID(as_uuid=True),
            primary_key=True,
            server_default=sa.text("gen_random_uuid()"),
        ),
        sa.Column("mrn", sa.Text, nullable=False, unique=True),
        sa.Column("first_name", sa.Text, nullable=False),
        sa.Column("last_name", sa.Text, nullable=False),
        sa.Column("date_of_birth", sa.Date, nullable=False),
        sa.Column("sex", SEX, nullable=False, server_default="unknown"),
        sa.Column("email", sa.Text),
        sa.Column("phone", sa.Text),
        sa.Column("address", postgresql.JSONB),
        sa.Column("allergies", postgresql.ARRAY(sa.Text)),
        sa.Column(
            "full_name",
            sa.Text,
            sa.Computed("first_name || ' ' || last_name", persisted=True),
        ),
        sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TIMESTAMPTZ, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_patients_name", "patients", ["last_name", "first_name"])
    # Case-insensitive unique e-mail without the citext extension (not available everywhere).
    op.create_index("ux_patients_email_lower", "patients", [sa.text("lower(email)")], unique=True)

    op.create_table(
        "appointments",
        sa.Column("appointment_id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "patient_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("patients.patient_id"),
            nullable=False,
        ),
        sa.Column(
            "provider_id",
            sa.Integer,
            sa.ForeignKey("providers.provider_id"),
            nullable=False,
        ),
        sa.Column("scheduled_at", TIMESTAMPTZ, nullable=False),
        sa.Column(
            "duration",
            postgresql.INTERVAL,
            nullable=False,
            server_default=sa.text("'00:30:00'::interval"),
        ),
        sa.Column("status", APPOINTMENT_STATUS, nullable=False, server_default="scheduled"),
    )
    op.create_index("ix_appointments_patient_id", "appointments", ["patient_id"])


def downgrade() -> None:
    op.drop_table("appointments")
    op.drop_table("patients")
    op.drop_table("providers")
    bind = op.get_bind()
    for enum in (APPOINTMENT_STATUS, SEX, SPECIALTY):
        enum.drop(bind, checkfirst=True)
