"""Jobs keep their critic options; verdicts keep reasoning tokens, fingerprint and delivery.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

Hand-checked. Columns are added with plain `ALTER TABLE ... ADD COLUMN` (never a batch copy
of `jobs`, which on SQLite would cascade away its verdicts).
- `jobs.critic_options`: the critic options without a column of their own (delivery,
  endpoint options, prompt, examples), `{}` for jobs written before this.
- `verdicts.reasoning_tokens` (0 before this), `verdicts.system_fingerprint` and
  `verdicts.delivery` (NULL before this: unknown).
The downgrade drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("critic_options", JSON, nullable=False, server_default="{}")
    )
    op.add_column(
        "verdicts",
        sa.Column("reasoning_tokens", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column(
        "verdicts", sa.Column("system_fingerprint", sa.String(length=128), nullable=True)
    )
    op.add_column("verdicts", sa.Column("delivery", sa.String(length=8), nullable=True))


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN (SQLite 3.35+), not a batch copy, for the reason above.
    for name in ("delivery", "system_fingerprint", "reasoning_tokens"):
        op.execute(f"ALTER TABLE verdicts DROP COLUMN {name}")
    op.execute("ALTER TABLE jobs DROP COLUMN critic_options")
