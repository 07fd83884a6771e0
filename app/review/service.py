"""Human labels: set, remove, read. Labels must belong to the project's label sets.

Also the one loader of what a policy reads of each step (`step_labels`): exports build from
it and the review pages preview with it, so a preview is the export by construction; the
queries behind the review pages (a job's trajectories, a trajectory's step cards) and the
critic evaluation (label pairs, disagreements).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.orm import Session, load_only

from app.auth.service import Caller
from app.critic.labels import DEFAULT_LABELS
from app.errors import NotFoundError, SrftError
from app.models import HumanLabel, Job, Trajectory, Verdict, utcnow
from app.models import JobTrajectory as JobTrajectoryRow
from app.pagination import decode_cursor, encode_cursor
from app.recipe.masking import StepLabel, critic_label, resolve_labels
from app.status import VERDICT_FINISHED, LabelSource, TrainingOutcome, VerdictStatus
from app.trajectories.formats.base import text_of


class UnknownLabelError(SrftError):
    status_code = 422
    code = "unknown_label"


def known_labels(session: Session, project_id: uuid.UUID) -> list[str]:
    """The default labels, then any other label a job of the project uses."""
    names = list(DEFAULT_LABELS.names)
    for labels in session.scalars(select(Job.labels).where(Job.project_id == project_id)):
        names += [name for name, _ in labels if name not in names]
    return names


def _step(
    session: Session, project_id: uuid.UUID, trajectory_id: uuid.UUID, step_index: int
) -> Trajectory:
    trajectory = session.get(Trajectory, trajectory_id)
    if trajectory is None or trajectory.project_id != project_id:
        raise NotFoundError(f"trajectory {trajectory_id} not found", location="path.trajectory_id")
    if not 0 <= step_index < trajectory.num_steps:
        raise NotFoundError(
            f"trajectory {trajectory_id} has steps 0-{trajectory.num_steps - 1}, not {step_index}",
            location="path.step_index",
        )
    return trajectory


def set_label(
    session: Session,
    caller: Caller,
    trajectory_id: uuid.UUID,
    step_index: int,
    label: str,
    note: str | None,
) -> HumanLabel:
    """Set the caller's label (and note) on a step, replacing any earlier human label."""
    project_id, author = caller.project_id, caller.name
    _step(session, project_id, trajectory_id, step_index)
    allowed = known_labels(session, project_id)
    if label not in allowed:
        raise UnknownLabelError(
            f"{label!r} is not a label of this project (labels: {', '.join(allowed)})",
            location="body.label",
        )
    found = session.scalar(
        select(HumanLabel).where(
            HumanLabel.trajectory_id == trajectory_id, HumanLabel.step_index == step_index
        )
    )
    if found is None:
        found = HumanLabel(
            project_id=project_id,
            trajectory_id=trajectory_id,
            step_index=step_index,
            label=label,
            note=note,
            author=author,
        )
        session.add(found)
    else:
        found.label, found.note, found.author, found.updated_at = label, note, author, utcnow()
    session.flush()
    return found


def remove_label(
    session: Session, project_id: uuid.UUID, trajectory_id: uuid.UUID, step_index: int
) -> bool:
    _step(session, project_id, trajectory_id, step_index)
    result = session.execute(
        delete(HumanLabel).where(
            HumanLabel.trajectory_id == trajectory_id, HumanLabel.step_index == step_index
        )
    )
    return bool(getattr(result, "rowcount", 0))


def labels_of(
    session: Session, trajectory_ids: Sequence[uuid.UUID]
) -> dict[tuple[uuid.UUID, int], HumanLabel]:
    """Human labels of these trajectories, by (trajectory, step)."""
    if not trajectory_ids:
        return {}
    rows = session.scalars(
        select(HumanLabel).where(HumanLabel.trajectory_id.in_(list(trajectory_ids)))
    )
    return {(h.trajectory_id, h.step_index): h for h in rows}


def step_labels(
    session: Session, num_steps: Mapping[uuid.UUID, int], job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[StepLabel, ...]]:
    """Per trajectory (id -> its number of steps), what the policy reads of each step under the
    verdicts of `job_ids` in that order and the reviewers' labels (`resolve_labels`)."""
    ids = list(num_steps)
    if not ids:
        return {}
    rank = {job_id: n for n, job_id in enumerate(job_ids)}
    critic: dict[uuid.UUID, list[dict[int, StepLabel]]] = {i: [{} for _ in rank] for i in ids}
    verdicts = session.execute(
        select(
            Verdict.job_id,
            Verdict.trajectory_id,
            Verdict.step_index,
            Verdict.label,
            Verdict.vote_labels,
        ).where(
            Verdict.trajectory_id.in_(ids),
            Verdict.job_id.in_(list(rank)),
            Verdict.status == VerdictStatus.DONE,
        )
    )
    for verdict in verdicts:
        # A finished verdict without a label says nothing; an earlier job's label stands.
        if verdict.label is not None:
            by_step = critic[verdict.trajectory_id][rank[verdict.job_id]]
            by_step[verdict.step_index] = critic_label(verdict.label, verdict.vote_labels)
    human: dict[uuid.UUID, dict[int, str]] = {i: {} for i in ids}
    for reviewed in session.execute(
        select(HumanLabel.trajectory_id, HumanLabel.step_index, HumanLabel.label).where(
            HumanLabel.trajectory_id.in_(ids)
        )
    ):
        human[reviewed.trajectory_id][reviewed.step_index] = reviewed.label
    return {i: resolve_labels(num_steps[i], human[i], critic[i]) for i in ids}


def labeling_jobs(session: Session, trajectory_id: uuid.UUID) -> list[uuid.UUID]:
    """The jobs with a finished verdict on the trajectory, oldest first: the job list whose
    export a page previews when no job is chosen (a later job overrides an earlier)."""
    query = (
        select(Job.id)
        .join(Verdict, Verdict.job_id == Job.id)
        .where(Verdict.trajectory_id == trajectory_id, Verdict.status == VerdictStatus.DONE)
        .group_by(Job.id, Job.created_at)
        .order_by(Job.created_at, Job.id)
    )
    return list(session.scalars(query))


# ---------------------------------------------------------------------- review pages


@dataclass(frozen=True)
class JobTrajectory:
    """A trajectory as a job's page lists it: what it is and its steps' progress."""

    trajectory: Trajectory
    progress: JobTrajectoryRow


def job_trajectories(
    session: Session, job_id: uuid.UUID, *, limit: int, cursor: str | None
) -> tuple[list[JobTrajectory], str | None]:
    """A page of the trajectories a job labels, by id (after the cursor's), and the next
    page's cursor: read from the job's progress rows, never from its verdicts."""
    query = (
        select(JobTrajectoryRow, Trajectory)
        .join(Trajectory, Trajectory.id == JobTrajectoryRow.trajectory_id)
        .options(
            load_only(Trajectory.id, Trajectory.task_id, Trajectory.resolved, Trajectory.num_steps)
        )
        .where(JobTrajectoryRow.job_id == job_id)
    )
    if cursor is not None:
        (after,) = decode_cursor(cursor, uuid.UUID)
        query = query.where(JobTrajectoryRow.trajectory_id > after)
    rows = session.execute(query.order_by(JobTrajectoryRow.trajectory_id).limit(limit + 1)).all()
    items = [JobTrajectory(trajectory, progress) for progress, trajectory in rows[:limit]]
    next_cursor = encode_cursor(items[-1].trajectory.id) if len(rows) > limit else None
    return items, next_cursor


@dataclass
class StepCard:
    """One step as the trajectory page shows it: its text, its verdicts and its human label."""

    index: int
    thought: str
    action: str | None
    tool_names: list[str]
    observations: list[tuple[str, str]]  # (role, text)
    verdict: Verdict | None = None
    other_verdicts: list[Verdict] = field(default_factory=list)
    human: HumanLabel | None = None
    # What the previewed export decides (`apply_decision`).
    label: str | None = None
    source: LabelSource = LabelSource.NONE
    outcome: TrainingOutcome = TrainingOutcome.TRAINED
    weight: float = 1.0

    @property
    def low_agreement(self) -> bool:
        agreement = self.verdict.agreement if self.verdict is not None else None
        return agreement is not None and agreement < 1

    @property
    def votes(self) -> tuple[str, ...]:
        votes = tuple(self.verdict.vote_labels or ()) if self.verdict is not None else ()
        return votes if len(votes) > 1 else ()


def verdicts_by_step(session: Session, trajectory_id: uuid.UUID) -> dict[int, list[Verdict]]:
    """Finished verdicts of a trajectory, by step, oldest job first."""
    found: dict[int, list[Verdict]] = defaultdict(list)
    query = (
        select(Verdict)
        .where(Verdict.trajectory_id == trajectory_id, Verdict.status.in_(VERDICT_FINISHED))
        .order_by(Verdict.id)
    )
    for verdict in session.scalars(query):
        found[verdict.step_index].append(verdict)
    return found


def _chosen_verdict(verdicts: list[Verdict], job_id: uuid.UUID | None) -> Verdict | None:
    """The verdict of the chosen job if it has a finished one, else the latest done one."""
    if job_id is not None:
        for verdict in verdicts:
            if verdict.job_id == job_id:
                return verdict
    done = [v for v in verdicts if v.status == VerdictStatus.DONE]
    return done[-1] if done else None


def step_cards(
    session: Session, trajectory: Trajectory, job_id: uuid.UUID | None
) -> list[StepCard]:
    """Every step of the trajectory with the chosen job's verdict (`_chosen_verdict`), the
    other finished verdicts and the human label."""
    verdicts = verdicts_by_step(session, trajectory.id)
    humans = labels_of(session, [trajectory.id])
    messages = trajectory.messages
    cards: list[StepCard] = []
    for step in trajectory.steps:
        card = StepCard(
            index=step.index,
            thought=text_of(messages[step.message_index].get("content")) or "",
            action=step.action,
            tool_names=list(step.tool_names),
            observations=[
                (str(messages[i].get("role")), text_of(messages[i].get("content")) or "")
                for i in step.observation_indices
            ],
        )
        found = verdicts.get(step.index, [])
        card.verdict = _chosen_verdict(found, job_id)
        card.other_verdicts = [v for v in found if v is not card.verdict]
        card.human = humans.get((trajectory.id, step.index))
        cards.append(card)
    return cards


# ---------------------------------------------------------------------- critic evaluation


def _same_step(job: Job) -> ColumnElement[bool]:
    return and_(
        HumanLabel.trajectory_id == Verdict.trajectory_id,
        HumanLabel.step_index == Verdict.step_index,
        HumanLabel.project_id == job.project_id,
    )


def _done(job: Job) -> ColumnElement[bool]:
    return and_(
        Verdict.job_id == job.id, Verdict.status == VerdictStatus.DONE, Verdict.label.is_not(None)
    )


def pair_counts(session: Session, job: Job) -> dict[tuple[str, str], int]:
    """(critic label, human label) -> steps, over the job's done verdicts a human labelled."""
    query = (
        select(Verdict.label, HumanLabel.label, func.count())
        .join(HumanLabel, _same_step(job))
        .where(_done(job))
        .group_by(Verdict.label, HumanLabel.label)
    )
    return {
        (str(critic), str(human)): int(count) for critic, human, count in session.execute(query)
    }


def disagreements(
    session: Session, job: Job, *, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """The steps where the job's critic and a human disagree, by (trajectory, step), a page."""
    query = (
        select(Verdict, HumanLabel)
        .join(HumanLabel, _same_step(job))
        .where(_done(job), Verdict.label != HumanLabel.label)
    )
    if cursor is not None:
        after_trajectory, after_step = decode_cursor(cursor, uuid.UUID, int)
        query = query.where(
            or_(
                Verdict.trajectory_id > after_trajectory,
                and_(Verdict.trajectory_id == after_trajectory, Verdict.step_index > after_step),
            )
        )
    rows = session.execute(
        query.order_by(Verdict.trajectory_id, Verdict.step_index).limit(limit + 1)
    ).all()
    items = [
        {
            "trajectory_id": verdict.trajectory_id,
            "step_index": verdict.step_index,
            "critic_label": verdict.label,
            "human_label": human.label,
            "critic_reason": verdict.reason,
            "human_note": human.note,
            "author": human.author,
        }
        for verdict, human in rows[:limit]
    ]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        next_cursor = encode_cursor(last.trajectory_id, last.step_index)
    return items, next_cursor
