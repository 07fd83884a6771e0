"""Labeling jobs and verdicts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Hand-checked. `verdicts` is both the result table and the work queue of a job; its unique key
(job, trajectory, step) is what makes a verdict impossible to duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _when(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(column: str, table: str, owner: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{table}.id"], name=op.f(f"fk_{owner}_{column}_{table}"), ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("critic_model", sa.String(length=200), nullable=False),
        sa.Column("votes", sa.Integer(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("labels", _json(), nullable=False),
        sa.Column("prompt_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("use_cache", sa.Boolean(), nullable=False),
        sa.Column("selection", _json(), nullable=False),
        sa.Column("total_trajectories", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _when("created_at", nullable=False),
        _when("started_at"),
        _when("finished_at"),
        _when("updated_at", nullable=False),
        _fk("project_id", "projects", "jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_project_id_created_at"), "jobs", ["project_id", "created_at"])
    op.create_table(
        "verdicts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("trajectory_id", sa.Uuid(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cache_key", sa.String(length=64), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("vote_labels", _json(), nullable=True),
        sa.Column("critic_model", sa.String(length=200), nullable=False),
        sa.Column("prompt_hash", sa.String(length=64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cached_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claim_token", sa.String(length=36), nullable=True),
        _when("claimed_at"),
        _when("enqueued_at"),
        _when("finished_at"),
        _fk("job_id", "jobs", "verdicts"),
        _fk("project_id", "projects", "verdicts"),
        _fk("trajectory_id", "trajectories", "verdicts"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint(
            "job_id",
            "trajectory_id",
            "step_index",
            name=op.f("uq_verdicts_job_id_trajectory_id_step_index"),
        ),
    )
    op.create_index(op.f("ix_verdicts_job_id_status"), "verdicts", ["job_id", "status"])
    op.create_index(
        op.f("ix_verdicts_project_id_cache_key"), "verdicts", ["project_id", "cache_key"]
    )
    op.create_index(op.f("ix_verdicts_status_claimed_at"), "verdicts", ["status", "claimed_at"])
    op.create_index(
        op.f("ix_verdicts_trajectory_id_step_index"), "verdicts", ["trajectory_id", "step_index"]
    )


def downgrade() -> None:
    for index in (
        "ix_verdicts_trajectory_id_step_index",
        "ix_verdicts_status_claimed_at",
        "ix_verdicts_project_id_cache_key",
        "ix_verdicts_job_id_status",
    ):
        op.drop_index(op.f(index), table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_index(op.f("ix_jobs_project_id_created_at"), table_name="jobs")
    op.drop_table("jobs")
