"""Batch delivery: a job's batches at the provider.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

Hand-checked. `job_batches` holds one row per batch of a batch-delivery job's requests (the
OpenAI Batch API): its round, status, the claim token its steps are claimed under, the
provider's batch and file ids, request counts and timestamps (app/jobs/batches.py). The
downgrade drops the table: steps claimed by a batch still live are then taken over by the
sweeper once their claim is stale, and asked again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "job_batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claim_token", sa.String(length=36), nullable=False),
        sa.Column("remote_id", sa.String(length=128), nullable=True),
        sa.Column("input_file_id", sa.String(length=128), nullable=True),
        sa.Column("output_file_id", sa.String(length=128), nullable=True),
        sa.Column("error_file_id", sa.String(length=128), nullable=True),
        sa.Column("requests_total", sa.Integer(), nullable=False),
        sa.Column("requests_completed", sa.Integer(), nullable=False),
        sa.Column("requests_failed", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("structured", sa.Boolean(), nullable=False, server_default=sa.true()),
        _when("created_at", nullable=False),
        _when("submitted_at"),
        _when("polled_at"),
        _when("collected_at"),
        _when("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_batches_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_batches")),
        sa.UniqueConstraint("claim_token", name=op.f("uq_job_batches_claim_token")),
    )
    op.create_index(
        op.f("ix_job_batches_job_id_created_at"), "job_batches", ["job_id", "created_at"]
    )
    op.create_index(
        op.f("ix_job_batches_collected_at_polled_at"),
        "job_batches",
        ["collected_at", "polled_at"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_job_batches_collected_at_polled_at"), table_name="job_batches")
    op.drop_index(op.f("ix_job_batches_job_id_created_at"), table_name="job_batches")
    op.drop_table("job_batches")
