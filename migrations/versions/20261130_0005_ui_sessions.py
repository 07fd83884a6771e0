"""Review UI sessions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

Hand-checked. A sign-in at /ui/login is a row here (the sha256 of the cookie's random token,
never the token), deleted with its API key.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"],
            name=op.f("fk_ui_sessions_api_key_id_api_keys"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ui_sessions")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_ui_sessions_token_hash")),
    )
    op.create_index(op.f("ix_ui_sessions_api_key_id"), "ui_sessions", ["api_key_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_ui_sessions_api_key_id"), table_name="ui_sessions")
    op.drop_table("ui_sessions")
