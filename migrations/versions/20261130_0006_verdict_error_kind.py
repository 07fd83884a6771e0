"""Verdicts store the kind of their error.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Hand-checked. A failed verdict records why the critic call failed (`app.status.ErrorKind`),
which /metrics counts by, instead of matching the error text. Failed rows written before
this are classified here from their text, with the patterns /metrics matched until now (a
copy: migrations do not follow the code), so their counts do not move; text no pattern
matches stays NULL, which /metrics counts as `other`, as before. The downgrade drops the
column; the text it was read from is still there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# How app.critic.client and app.critic.judge worded a failed step's error, as (kind, SQL LIKE
# patterns); the first kind that matches wins.
ERROR_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rate_limited", ("429 %",)),
    ("server_error", ("5__ from critic%", "the critic's answer is not JSON%")),
    ("timeout", ("the critic did not answer in time%",)),
    ("connection", ("cannot reach the critic%",)),
    ("rejected", ("4__ from critic%",)),
    ("unparseable", ("unparseable answer%",)),
    ("missing", ("the critic gave no verdict%",)),
)


def upgrade() -> None:
    op.add_column("verdicts", sa.Column("error_kind", sa.String(length=32), nullable=True))
    verdicts = sa.table(
        "verdicts",
        sa.column("status", sa.String()),
        sa.column("error", sa.Text()),
        sa.column("error_kind", sa.String()),
    )
    kind = sa.case(
        *[
            (verdicts.c.error.like(pattern), sa.literal(name))
            for name, patterns in ERROR_PATTERNS
            for pattern in patterns
        ],
        else_=sa.null(),
    )
    op.execute(
        verdicts.update()
        .where(verdicts.c.status == "failed", verdicts.c.error.is_not(None))
        .values(error_kind=kind)
    )


def downgrade() -> None:
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_column("error_kind")
