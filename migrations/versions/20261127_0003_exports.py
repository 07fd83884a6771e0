"""Exports.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

Hand-checked. An export row is its own work item (claim token + heartbeat); its files live
under SRFT_EXPORT_DIR, published only when complete.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "exports",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("policy", sa.String(length=32), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("config", _json(), nullable=False),
        sa.Column("job_ids", _json(), nullable=False),
        sa.Column("total_trajectories", sa.Integer(), nullable=False),
        sa.Column("done_trajectories", sa.Integer(), nullable=False),
        sa.Column("manifest", _json(), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_details", _json(), nullable=True),
        sa.Column("claim_token", sa.String(length=36), nullable=True),
        _when("claimed_at"),
        _when("enqueued_at"),
        _when("created_at", nullable=False),
        _when("started_at"),
        _when("finished_at"),
        _when("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_exports_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
    )
    op.create_index(
        op.f("ix_exports_project_id_created_at"), "exports", ["project_id", "created_at"]
    )
    op.create_index(op.f("ix_exports_status_claimed_at"), "exports", ["status", "claimed_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_exports_status_claimed_at"), table_name="exports")
    op.drop_index(op.f("ix_exports_project_id_created_at"), table_name="exports")
    op.drop_table("exports")
