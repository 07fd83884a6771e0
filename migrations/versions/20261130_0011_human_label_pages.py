"""Human labels are paged by id within a project.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

Hand-checked. A gold-set export (`GET /v1/human-labels/export`) reads a project's human labels
by keyset in id order; `(project_id, id)` serves it whatever share of the table the project
has. The downgrade drops the index.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_human_labels_project_id_id", "human_labels", ["project_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_human_labels_project_id_id", table_name="human_labels")
