"""A job's prompt: its own templates checked, its few-shot examples chosen from the project's
human labels when the job is created, and the `PromptTemplates` its critic is asked with.

Examples are chosen once, at POST /v1/jobs, and kept in the job's options: every worker and
every delivery path then shows the same ones, and the prompt hash covers them. The pool holds
K examples and a few spares (at most SPARES, fewer from one trajectory where the project
allows), so that leaving out those of the trajectory being judged still leaves K.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.critic.labels import LabelSet
from app.critic.prompt import (
    TEMPLATE_PLACEHOLDERS,
    Example,
    PromptTemplateError,
    PromptTemplates,
    StepText,
    check_template,
    make_example,
    step_texts,
)
from app.jobs import schemas
from app.models import HumanLabel, Trajectory
from app.recipe.steps import split_steps
from app.status import PromptVariant

SPARES = 8
# Human labels read per label, at most: enough to skip over those of over-represented
# trajectories, bounded whatever the project's size.
_READ_PER_LABEL = 4


def prepared(
    session: Session, project_id: uuid.UUID, critic: schemas.CriticOptions, labels: LabelSet
) -> schemas.CriticOptions:
    """The critic options of a new job: its templates checked, its examples chosen."""
    prompt = critic.prompt
    if prompt is not None:
        for part in TEMPLATE_PLACEHOLDERS:
            text = getattr(prompt, part)
            if text is not None:
                check_template(part, text)
        if prompt == schemas.PromptTemplate():
            critic = critic.model_copy(update={"prompt": None})  # the built-in prompt
    if critic.examples is not None:
        if critic.examples.chosen is not None:
            raise PromptTemplateError(
                "critic.examples.chosen is set by srft when the job is created; send only "
                "from_human_labels",
                location="critic.examples.chosen",
            )
        chosen = choose_examples(session, project_id, labels, critic.examples.from_human_labels)
        examples = critic.examples.model_copy(update={"chosen": chosen})
        critic = critic.model_copy(update={"examples": examples})
    return critic


def choose_examples(
    session: Session, project_id: uuid.UUID, labels: LabelSet, k: int
) -> list[schemas.FewShotExample]:
    """Up to k + min(k, SPARES) human-labeled steps of the project whose label is one of
    `labels`: round-robin over the labels that have any (in the label set's order), each
    label's in human-label id order, at most min(k, SPARES) from one trajectory unless the
    project has no others to give."""
    spares = min(k, SPARES)
    wanted = k + spares
    queues: list[list[Any]] = []
    for name in labels.names:
        rows = session.execute(
            select(
                HumanLabel.id,
                HumanLabel.trajectory_id,
                HumanLabel.step_index,
                HumanLabel.label,
                HumanLabel.note,
            )
            .where(HumanLabel.project_id == project_id, HumanLabel.label == name)
            .order_by(HumanLabel.id)
            .limit(_READ_PER_LABEL * wanted)
        ).all()
        if rows:
            queues.append(list(rows))
    chosen = _round_robin(queues, wanted, spares)
    trajectory_ids = sorted({row.trajectory_id for row in chosen})
    rows = session.execute(
        select(Trajectory.id, Trajectory.messages).where(Trajectory.id.in_(trajectory_ids))
    ).all()
    messages_of: dict[uuid.UUID, list[dict[str, Any]]] = {row.id: row.messages for row in rows}
    texts: dict[uuid.UUID, dict[int, StepText]] = {}
    found: list[schemas.FewShotExample] = []
    for row in chosen:
        messages = messages_of.get(row.trajectory_id)
        if messages is None:
            continue
        if row.trajectory_id not in texts:
            steps = step_texts(messages, split_steps(messages))
            texts[row.trajectory_id] = {text.index: text for text in steps}
        text = texts[row.trajectory_id].get(row.step_index)
        if text is None:
            continue
        example = make_example(text, row.label, row.note, messages)
        found.append(
            schemas.FewShotExample(
                human_label_id=row.id,
                trajectory_id=str(row.trajectory_id),
                step_index=row.step_index,
                label=example.label,
                action=example.action,
                observation=example.observation,
                reason=example.reason,
                source=example.source,
            )
        )
    return found


def _round_robin(queues: Sequence[list[Any]], wanted: int, cap: int) -> list[Any]:
    """Rows taken from each queue in turn, skipping rows of a trajectory that already gave
    `cap`; the skipped ones fill what is left, in turn too."""
    chosen: list[Any] = []
    per_trajectory: Counter[uuid.UUID] = Counter()
    skipped: list[list[Any]] = [[] for _ in queues]
    positions = [0] * len(queues)
    while len(chosen) < wanted and any(p < len(q) for p, q in zip(positions, queues, strict=True)):
        for number, queue in enumerate(queues):
            while positions[number] < len(queue) and len(chosen) < wanted:
                row = queue[positions[number]]
                positions[number] += 1
                if per_trajectory[row.trajectory_id] < cap:
                    per_trajectory[row.trajectory_id] += 1
                    chosen.append(row)
                    break
                skipped[number].append(row)
    for round_ in itertools.zip_longest(*skipped):
        chosen += [row for row in round_ if row is not None][: wanted - len(chosen)]
    return chosen


def templates(options: schemas.CriticOptions) -> PromptTemplates:
    """What the job's critic is asked with, from its critic options."""
    prompt = options.prompt or schemas.PromptTemplate()
    few_shot = options.examples
    chosen = (few_shot.chosen or []) if few_shot is not None else []
    pool = tuple(Example(e.label, e.action, e.observation, e.reason, e.source) for e in chosen)
    return PromptTemplates(
        system=prompt.system,
        instructions=prompt.instructions,
        step_question=prompt.step_question,
        variant=PromptVariant(prompt.variant),
        examples=pool,
        shown_examples=few_shot.from_human_labels if few_shot is not None and pool else 0,
    )


def shown_options(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored options as the job shows them: the examples summarised (which human labels,
    how many a prompt shows, per label) rather than their texts."""
    few_shot = stored.get("examples")
    if not isinstance(few_shot, dict):
        return stored
    chosen = few_shot.get("chosen") or []
    k = int(few_shot.get("from_human_labels", 0))
    summary = {
        "from_human_labels": k,
        "shown": min(k, len(chosen)),
        "pool": len(chosen),
        "labels": dict(Counter(e["label"] for e in chosen)),
        "human_label_ids": [e["human_label_id"] for e in chosen],
    }
    return {**stored, "examples": summary}
