"""Human labels: set, remove, read. Labels must belong to the project's label sets.

Also the one loader of what a policy reads of each step (`step_labels`): exports build from
it and the review pages preview with it, so a preview is the export by construction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.critic.labels import DEFAULT_LABELS
from app.errors import NotFound, SrftError
from app.models import HumanLabel, Job, Trajectory, Verdict, utcnow
from app.recipe.masking import StepLabel, critic_label, resolve_labels


class InvalidLabel(SrftError):
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
        raise NotFound(f"trajectory {trajectory_id} not found", location="path.trajectory_id")
    if not 0 <= step_index < trajectory.num_steps:
        raise NotFound(
            f"trajectory {trajectory_id} has steps 0-{trajectory.num_steps - 1}, not {step_index}",
            location="path.step_index",
        )
    return trajectory


def set_label(
    session: Session,
    project_id: uuid.UUID,
    trajectory_id: uuid.UUID,
    step_index: int,
    *,
    label: str,
    note: str | None,
    author: str,
) -> HumanLabel:
    _step(session, project_id, trajectory_id, step_index)
    allowed = known_labels(session, project_id)
    if label not in allowed:
        raise InvalidLabel(
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
            Verdict.status == "done",
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
        .where(Verdict.trajectory_id == trajectory_id, Verdict.status == "done")
        .group_by(Job.id, Job.created_at)
        .order_by(Job.created_at, Job.id)
    )
    return list(session.scalars(query))
