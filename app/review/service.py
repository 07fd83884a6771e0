"""Human labels: set, remove, read. Labels must belong to the project's label sets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.critic.labels import DEFAULT_LABELS
from app.errors import NotFound, SrftError
from app.models import HumanLabel, Job, Trajectory, utcnow


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
