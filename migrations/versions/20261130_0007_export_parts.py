"""Exports are built in parts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Hand-checked. An export is split into parts (ranges of its trajectories), each a work item of
its own with a claim token and a heartbeat, like the export row; its files are published by a
final task once every part is done (app/exports/parts.py). Exports queued before this have no
parts and are planned when a worker takes them. The downgrade drops the table: an export
still being built in parts is then left running, and the sweeper builds it again from the start.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "export_parts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("export_id", sa.Uuid(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("start", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_id", sa.Uuid(), nullable=False),
        sa.Column("last_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("done_trajectories", sa.Integer(), nullable=False),
        sa.Column("output", sa.String(length=64), nullable=True),
        sa.Column("claim_token", sa.String(length=36), nullable=True),
        _when("claimed_at"),
        _when("enqueued_at"),
        _when("created_at", nullable=False),
        _when("finished_at"),
        sa.ForeignKeyConstraint(
            ["export_id"],
            ["exports.id"],
            name=op.f("fk_export_parts_export_id_exports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_parts")),
        sa.UniqueConstraint("export_id", "index", name=op.f("uq_export_parts_export_id_index")),
    )
    op.create_index(
        op.f("ix_export_parts_status_claimed_at"), "export_parts", ["status", "claimed_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_export_parts_status_claimed_at"), table_name="export_parts")
    op.drop_table("export_parts")
