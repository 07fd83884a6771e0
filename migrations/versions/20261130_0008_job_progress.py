"""Jobs are prepared in batches and keep running totals; trajectory pages have indexes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

Hand-checked.
- `jobs` gains its preparation state (a worker writes a job's verdict rows in batches after
  the request): rows written before this are complete, so they are marked prepared.
- `job_trajectories`: each trajectory of a job with its steps' progress; `job_tallies`: a
  job's running totals (steps and trajectories finished, labels, errors by kind, tokens,
  critic latency). Both are filled here from the verdicts already stored, with the rules the
  code counts by (`app.jobs.workqueue.count_finished`, frozen here: migrations do not follow
  the code), in slot 0.
- Indexes that serve the trajectory list's filters in its order (newest first by id), and
  the job, export and verdict lists in theirs.
The downgrade drops what this adds; the verdicts they were counted from are still there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# app.jobs.tallies.LATENCY_BUCKETS_S when this was written.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

verdicts = sa.table(
    "verdicts",
    sa.column("job_id", sa.Uuid()),
    sa.column("trajectory_id", sa.Uuid()),
    sa.column("status", sa.String()),
    sa.column("cached", sa.Boolean()),
    sa.column("label", sa.String()),
    sa.column("error_kind", sa.String()),
    sa.column("prompt_tokens", sa.Integer()),
    sa.column("completion_tokens", sa.Integer()),
    sa.column("cached_tokens", sa.Integer()),
    sa.column("latency_ms", sa.Float()),
)
progress = sa.table(
    "job_trajectories",
    sa.column("job_id", sa.Uuid()),
    sa.column("trajectory_id", sa.Uuid()),
    sa.column("steps", sa.Integer()),
    sa.column("done", sa.Integer()),
    sa.column("failed", sa.Integer()),
    sa.column("cached", sa.Integer()),
)
tallies = sa.table(
    "job_tallies",
    sa.column("job_id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("slot", sa.Integer()),
    sa.column("value", sa.BigInteger()),
)


def upgrade() -> None:
    # Plain ALTER TABLE, never a batch copy: on SQLite, copying `jobs` would drop the old table,
    # and its verdicts with it (ON DELETE CASCADE). The defaults stay on the columns.
    for name in ("prepared_trajectories", "prepared_steps"):
        op.add_column("jobs", sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("prepare_cursor", sa.Uuid(), nullable=True))
    op.add_column("jobs", sa.Column("prepared_at", sa.DateTime(timezone=True), nullable=True))
    jobs = sa.table(
        "jobs",
        sa.column("total_trajectories", sa.Integer()),
        sa.column("total_steps", sa.Integer()),
        sa.column("prepared_trajectories", sa.Integer()),
        sa.column("prepared_steps", sa.Integer()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("prepared_at", sa.DateTime(timezone=True)),
    )
    op.execute(
        jobs.update().values(
            prepared_trajectories=jobs.c.total_trajectories,
            prepared_steps=jobs.c.total_steps,
            prepared_at=jobs.c.created_at,
        )
    )
    op.create_table(
        "job_trajectories",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("trajectory_id", sa.Uuid(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("cached", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_trajectories_job_id_jobs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["trajectory_id"],
            ["trajectories.id"],
            name="fk_job_trajectories_trajectory_id_trajectories",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "trajectory_id", name="pk_job_trajectories"),
    )
    op.create_index(
        "ix_job_trajectories_trajectory_id", "job_trajectories", ["trajectory_id"], unique=False
    )
    op.create_table(
        "job_tallies",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=96), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_tallies_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", "slot", name="pk_job_tallies"),
    )
    _count_stored_verdicts()

    op.drop_index("ix_trajectories_project_id_task_id", table_name="trajectories")
    for columns in (
        ["project_id", "id"],
        ["project_id", "resolved", "id"],
        ["project_id", "source_format", "id"],
        ["project_id", "task_id", "id"],
    ):
        op.create_index(f"ix_trajectories_{'_'.join(columns)}", "trajectories", columns)
    op.create_index("ix_jobs_project_id_id", "jobs", ["project_id", "id"])
    op.create_index("ix_verdicts_job_id_id", "verdicts", ["job_id", "id"])
    op.create_index("ix_exports_project_id_id", "exports", ["project_id", "id"])


def _count_stored_verdicts() -> None:
    v = verdicts.c
    done = sa.case((v.status == "done", 1), else_=0)
    failed = sa.case((v.status == "failed", 1), else_=0)
    done_cached = sa.case((sa.and_(v.status == "done", v.cached.is_(True)), 1), else_=0)
    op.execute(
        progress.insert().from_select(
            ["job_id", "trajectory_id", "steps", "done", "failed", "cached"],
            sa.select(
                v.job_id,
                v.trajectory_id,
                sa.func.count(),
                sa.func.sum(done),
                sa.func.sum(failed),
                sa.func.sum(done_cached),
            ).group_by(v.job_id, v.trajectory_id),
        )
    )

    def tally(
        name: sa.ColumnElement[str],
        value: sa.ColumnElement[int],
        *where: sa.ColumnElement[bool],
        by: tuple[sa.ColumnElement[str], ...] = (),
    ) -> None:
        query = (
            sa.select(v.job_id, name, sa.literal(0), sa.cast(value, sa.BigInteger))
            .where(*where)
            .group_by(v.job_id, *by)
        )
        op.execute(tallies.insert().from_select(["job_id", "name", "slot", "value"], query))

    def named(text: str) -> sa.ColumnElement[str]:
        return sa.literal(text, sa.String)

    count = sa.func.count()
    timed = (v.status == "done", v.cached.is_(False), v.latency_ms.is_not(None))
    tally(named("steps_done"), count, v.status == "done")
    tally(named("steps_failed"), count, v.status == "failed")
    tally(named("steps_cached"), count, v.status == "done", v.cached.is_(True))
    tally(named("prompt_tokens"), sa.func.sum(v.prompt_tokens))
    tally(named("completion_tokens"), sa.func.sum(v.completion_tokens))
    tally(named("cached_tokens"), sa.func.sum(v.cached_tokens))
    tally(named("label:") + v.label, count, v.status == "done", v.label.is_not(None), by=(v.label,))
    tally(
        named("error:") + sa.func.coalesce(v.error_kind, ""),
        count,
        v.status == "failed",
        by=(v.error_kind,),
    )
    tally(named("latency_count"), count, *timed)
    tally(named("latency_sum_us"), sa.func.sum(sa.func.round(v.latency_ms * 1000)), *timed)
    for bound in LATENCY_BUCKETS_S:
        tally(named(f"latency_le:{bound!r}"), count, *timed, v.latency_ms <= bound * 1000)

    p = progress.c
    ended = p.done + p.failed == p.steps
    for name, where in (
        ("trajectories_done", (ended, p.failed == 0)),
        ("trajectories_failed", (ended, p.failed > 0)),
        ("trajectories_cached", (ended, p.failed == 0, p.cached == p.steps)),
    ):
        query = (
            sa.select(p.job_id, named(name), sa.literal(0), sa.cast(sa.func.count(), sa.BigInteger))
            .where(*where)
            .group_by(p.job_id)
        )
        op.execute(tallies.insert().from_select(["job_id", "name", "slot", "value"], query))
    # Nothing counted is the same as no row: drop zeros (sums over no token, say).
    op.execute(tallies.delete().where(tallies.c.value == 0))


def downgrade() -> None:
    op.drop_index("ix_exports_project_id_id", table_name="exports")
    op.drop_index("ix_verdicts_job_id_id", table_name="verdicts")
    op.drop_index("ix_jobs_project_id_id", table_name="jobs")
    for columns in (
        ["project_id", "task_id", "id"],
        ["project_id", "source_format", "id"],
        ["project_id", "resolved", "id"],
        ["project_id", "id"],
    ):
        op.drop_index(f"ix_trajectories_{'_'.join(columns)}", table_name="trajectories")
    op.create_index("ix_trajectories_project_id_task_id", "trajectories", ["project_id", "task_id"])
    op.drop_table("job_tallies")
    op.drop_index("ix_job_trajectories_trajectory_id", table_name="job_trajectories")
    op.drop_table("job_trajectories")
    # ALTER TABLE DROP COLUMN (SQLite 3.35+), not a batch copy, for the reason above.
    for name in ("prepared_at", "prepare_cursor", "prepared_steps", "prepared_trajectories"):
        op.execute(f"ALTER TABLE jobs DROP COLUMN {name}")
