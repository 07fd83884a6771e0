"""Human labels.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

Hand-checked. One human label per step (unique trajectory + step), apart from verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "human_labels",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("trajectory_id", sa.Uuid(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("author", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"],
            name=op.f("fk_human_labels_project_id_projects"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trajectory_id"], ["trajectories.id"],
            name=op.f("fk_human_labels_trajectory_id_trajectories"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_human_labels")),
        sa.UniqueConstraint(
            "trajectory_id", "step_index", name=op.f("uq_human_labels_trajectory_id_step_index")
        ),
    )
    op.create_index(
        op.f("ix_human_labels_project_id_updated_at"), "human_labels", ["project_id", "updated_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_human_labels_project_id_updated_at"), table_name="human_labels")
    op.drop_table("human_labels")
