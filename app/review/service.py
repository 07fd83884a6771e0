"""Human labels: set, remove, read. Labels must belong to the project's label sets.

Also the one loader of what a policy reads of each step (`step_labels`): exports build from
it and the review pages preview with it, so a preview is the export by construction; the
queries behind the review pages (a job's trajectories, a trajectory's step cards), the
critic evaluation (label pairs, disagreements, the gold steps several jobs are compared on,
the review queue) and gold-set files (export, import).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, tuple_
from sqlalchemy.orm import Session, load_only

from app.auth.service import Caller
from app.critic.labels import DEFAULT_LABELS
from app.errors import NotFoundError, SrftError
from app.jobs import tallies
from app.models import HumanLabel, Job, Trajectory, Verdict, utcnow
from app.models import JobTrajectory as JobTrajectoryRow
from app.pagination import decode_cursor, encode_cursor
from app.recipe.masking import DEFAULT_MASK_LABELS, StepLabel, critic_label, resolve_labels
from app.review import evaluation, gold
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


def check_label(allowed: Sequence[str], label: str, location: str, where: str = "") -> None:
    """Refuse a human label that is not one of the project's (`known_labels`); `where`
    begins the message (an import's `line 12: `)."""
    if label not in allowed:
        raise UnknownLabelError(
            f"{where}{label!r} is not a label of this project (labels: {', '.join(allowed)})",
            location=location,
        )


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
    check_label(known_labels(session, project_id), label, "body.label")
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


# ---------------------------------------------------------------------- comparing critics


@dataclass(frozen=True)
class GoldSteps:
    """The human-labeled steps every compared job has a done verdict on, in (trajectory, step)
    order: their human labels, and each job's label of them (in the jobs' order)."""

    steps: list[tuple[uuid.UUID, int]]
    human: list[str]
    critics: list[list[str]]
    # Every human-labeled step of the project, compared or not.
    human_labeled: int


def gold_steps(session: Session, project_id: uuid.UUID, jobs: Sequence[Job]) -> GoldSteps:
    """What `evaluation.compare` needs, read from the project's human labels outward: each
    label's verdicts by (trajectory, step) among the jobs, so the cost follows the gold set,
    never the size of the jobs."""
    rank = {job.id: n for n, job in enumerate(jobs)}
    query = (
        select(
            HumanLabel.trajectory_id,
            HumanLabel.step_index,
            HumanLabel.label,
            Verdict.job_id,
            Verdict.label,
        )
        .select_from(HumanLabel)
        .join(
            Verdict,
            and_(
                Verdict.trajectory_id == HumanLabel.trajectory_id,
                Verdict.step_index == HumanLabel.step_index,
            ),
        )
        .where(
            HumanLabel.project_id == project_id,
            Verdict.job_id.in_(list(rank)),
            Verdict.status == VerdictStatus.DONE,
            Verdict.label.is_not(None),
        )
    )
    human: dict[tuple[uuid.UUID, int], str] = {}
    critic: dict[tuple[uuid.UUID, int], list[str | None]] = {}
    for trajectory_id, step_index, human_label, job_id, verdict_label in session.execute(query):
        step = (trajectory_id, step_index)
        human[step] = human_label
        critic.setdefault(step, [None] * len(rank))[rank[job_id]] = verdict_label
    steps = sorted(
        (step for step, found in critic.items() if None not in found),
        key=lambda step: (str(step[0]), step[1]),
    )
    labeled = session.scalar(
        select(func.count()).select_from(HumanLabel).where(HumanLabel.project_id == project_id)
    )
    return GoldSteps(
        steps=steps,
        human=[human[step] for step in steps],
        critics=[[str(critic[step][n]) for step in steps] for n in range(len(rank))],
        human_labeled=int(labeled or 0),
    )


# Jobs one comparison may put side by side.
MAX_COMPARED_JOBS = 8


class InvalidEvaluationError(SrftError):
    status_code = 422
    code = "invalid_evaluation"


def compared_jobs(
    session: Session, project_id: uuid.UUID, job_ids: Sequence[uuid.UUID]
) -> list[Job]:
    """The jobs named by `job_id` (1 to MAX_COMPARED_JOBS, each once) of the project."""
    if not job_ids:
        raise InvalidEvaluationError("name at least one job_id", location="query.job_id")
    if len(job_ids) > MAX_COMPARED_JOBS:
        raise InvalidEvaluationError(
            f"at most {MAX_COMPARED_JOBS} jobs can be compared at once, not {len(job_ids)}",
            location="query.job_id",
        )
    if len(set(job_ids)) != len(job_ids):
        raise InvalidEvaluationError("a job_id is named twice", location="query.job_id")
    jobs = []
    for job_id in job_ids:
        job = session.get(Job, job_id)
        if job is None or job.project_id != project_id:
            raise NotFoundError(f"job {job_id} not found", location="query.job_id")
        jobs.append(job)
    return jobs


def critic_cost(
    session: Session,
    job: Job,
    price_prompt_per_mtok: float | None = None,
    price_completion_per_mtok: float | None = None,
) -> dict[str, Any]:
    """What the job's critic spent per labeled (done) step, from its running totals: prompt
    and completion tokens, and in dollars when both prices (per million tokens) are given."""
    totals = tallies.read(session, job.id)
    done = totals[tallies.STEPS_DONE]
    prompt = totals[tallies.PROMPT_TOKENS] / done if done else 0.0
    completion = totals[tallies.COMPLETION_TOKENS] / done if done else 0.0
    usd = None
    if price_prompt_per_mtok is not None and price_completion_per_mtok is not None:
        usd = (prompt * price_prompt_per_mtok + completion * price_completion_per_mtok) / 1e6
    return {
        "steps_done": done,
        "prompt_tokens_per_step": prompt,
        "completion_tokens_per_step": completion,
        "usd_per_step": usd,
    }


def mask_labels_of(
    session: Session, project_id: uuid.UUID, jobs: Sequence[Job], wanted: Sequence[str] | None
) -> list[str]:
    """The mask labels asked for (default DEFAULT_MASK_LABELS), each a label of one of the
    jobs or of the project; UnknownLabelError at `query.mask_labels` otherwise."""
    known: list[str] = []
    for job in jobs:
        known += [name for name, _ in job.labels if name not in known]
    known += [name for name in known_labels(session, project_id) if name not in known]
    masked = list(dict.fromkeys(wanted or DEFAULT_MASK_LABELS))
    unknown = [name for name in masked if name not in known]
    if unknown:
        raise UnknownLabelError(
            f"unknown mask label {unknown[0]!r} (labels: {', '.join(known)})",
            location="query.mask_labels",
        )
    return masked


def comparison(
    session: Session,
    project_id: uuid.UUID,
    jobs: Sequence[Job],
    mask_labels: Sequence[str],
    *,
    resamples: int,
    price_prompt_per_mtok: float | None = None,
    price_completion_per_mtok: float | None = None,
) -> dict[str, Any]:
    """The jobs' critics side by side on the same human-labeled steps (`gold_steps`), scored
    by `evaluation.compare`, with each job's cost per labeled step."""
    found = gold_steps(session, project_id, jobs)
    result = evaluation.compare(
        found.human,
        found.critics,
        [[name for name, _ in job.labels] for job in jobs],
        mask_labels,
        resamples=resamples,
    )
    return {
        "job_ids": [job.id for job in jobs],
        "mask_labels": list(mask_labels),
        "human_labeled": found.human_labeled,
        "compared": result.compared,
        "left_out": found.human_labeled - result.compared,
        "bootstrap": {
            "resamples": result.resamples,
            "seed": result.seed,
            "confidence": evaluation.CONFIDENCE,
        },
        "jobs": [
            {
                "job_id": job.id,
                "critic": {"model": job.critic_model, "mode": job.mode, "votes": job.votes},
                "labels": [name for name, _ in job.labels],
                **critic.as_dict(),
                "cost": critic_cost(session, job, price_prompt_per_mtok, price_completion_per_mtok),
            }
            for job, critic in zip(jobs, result.critics, strict=True)
        ],
        "agreement": [
            {
                "job_ids": [jobs[pair.first].id, jobs[pair.second].id],
                "label_kappa": pair.label_kappa,
                "mask_kappa": pair.mask_kappa,
                "macro_f1_difference": pair.macro_f1_difference.as_dict(),
                "mask_f1_difference": pair.mask_f1_difference.as_dict(),
            }
            for pair in result.pairs
        ],
    }


# The review queue looks at most this many candidate steps per item asked for, and never more
# than MAX_QUEUE_WINDOW: its cost is bounded by the request, not by the jobs.
QUEUE_WINDOW_PER_ITEM = 20
MAX_QUEUE_WINDOW = 5000
# Weights of the queue's score (documented in the README): a step the critics label
# differently outranks any step they agree on.
DISAGREEMENT_WEIGHT = 4.0
SPLIT_VOTES_WEIGHT = 2.0
RARE_LABEL_WEIGHT = 1.0
_IN_CHUNK = 500


@dataclass
class QueueItem:
    """An unlabeled step the queue proposes, its score and why."""

    trajectory_id: uuid.UUID
    step_index: int
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)
    # (job id, label, agreement) of each job with a done verdict here, in the jobs' order.
    verdicts: list[tuple[uuid.UUID, str, float | None]] = field(default_factory=list)


def _label_shares(session: Session, job: Job) -> dict[str, float]:
    """Each label's share of the job's done verdicts, from its running totals."""
    histogram = tallies.family(tallies.read(session, job.id), tallies.LABEL)
    total = sum(histogram.values())
    return {name: count / total for name, count in histogram.items()} if total else {}


def score_queue_item(
    item: QueueItem, jobs: int, shares: Mapping[uuid.UUID, Mapping[str, float]]
) -> None:
    """Score a step from its verdicts: DISAGREEMENT_WEIGHT x (distinct labels - 1) / (jobs - 1)
    + SPLIT_VOTES_WEIGHT x the largest (1 - vote agreement) + RARE_LABEL_WEIGHT x the largest
    (1 - share of the verdict's label among its job's labels)."""
    labels = [label for _, label, _ in item.verdicts]
    distinct = len(set(labels))
    disagreement = (distinct - 1) / (jobs - 1) if jobs > 1 else 0.0
    split = max((1 - a for _, _, a in item.verdicts if a is not None), default=0.0)
    rare_job, rare_label, rarity = None, "", 0.0
    for job_id, label, _ in item.verdicts:
        value = 1 - shares.get(job_id, {}).get(label, 0.0)
        if value > rarity:
            rare_job, rare_label, rarity = job_id, label, value
    item.score = round(
        DISAGREEMENT_WEIGHT * disagreement
        + SPLIT_VOTES_WEIGHT * split
        + RARE_LABEL_WEIGHT * rarity,
        6,
    )
    if distinct > 1:
        item.reasons.append(f"critics disagree: {', '.join(sorted(set(labels)))}")
    if split > 0:
        item.reasons.append(f"votes split: agreement {1 - split:.0%}")
    if rare_job is not None and rarity >= 0.5:
        item.reasons.append(
            f"job {rare_job} rarely says {rare_label} ({1 - rarity:.0%} of its labels)"
        )
    if len(item.verdicts) < jobs:
        item.reasons.append(f"{jobs - len(item.verdicts)} job(s) have no verdict here")


def review_queue(
    session: Session, jobs: Sequence[Job], *, limit: int, cursor: str | None
) -> tuple[list[QueueItem], int, str | None]:
    """The `limit` best steps for a human to label next (no human label yet), ranked by
    `score_queue_item`, from a bounded window of candidates: the first job's next
    `limit` x QUEUE_WINDOW_PER_ITEM (at most MAX_QUEUE_WINDOW) unlabeled done verdicts in id
    order, after the cursor's. Returns the items, how many candidates were scanned and the
    cursor of the next window (None when the first job has no more)."""
    first = jobs[0]
    window = min(limit * QUEUE_WINDOW_PER_ITEM, MAX_QUEUE_WINDOW)
    query = (
        select(
            Verdict.id, Verdict.trajectory_id, Verdict.step_index, Verdict.label, Verdict.agreement
        )
        .outerjoin(
            HumanLabel,
            and_(
                HumanLabel.trajectory_id == Verdict.trajectory_id,
                HumanLabel.step_index == Verdict.step_index,
            ),
        )
        .where(_done(first), HumanLabel.id.is_(None))
    )
    if cursor is not None:
        (after,) = decode_cursor(cursor, int)
        query = query.where(Verdict.id > after)
    rows = session.execute(query.order_by(Verdict.id).limit(window)).all()
    items: dict[tuple[uuid.UUID, int], QueueItem] = {}
    for row in rows:
        item = QueueItem(row.trajectory_id, row.step_index)
        item.verdicts.append((first.id, str(row.label), row.agreement))
        items[(row.trajectory_id, row.step_index)] = item
    others = [job.id for job in jobs[1:]]
    rank = {job.id: n for n, job in enumerate(jobs)}
    keys = list(items)
    for start in range(0, len(keys) if others else 0, _IN_CHUNK):
        chunk = keys[start : start + _IN_CHUNK]
        found = session.execute(
            select(
                Verdict.job_id,
                Verdict.trajectory_id,
                Verdict.step_index,
                Verdict.label,
                Verdict.agreement,
            ).where(
                Verdict.job_id.in_(others),
                Verdict.status == VerdictStatus.DONE,
                Verdict.label.is_not(None),
                tuple_(Verdict.trajectory_id, Verdict.step_index).in_(chunk),
            )
        )
        for verdict in found:
            items[(verdict.trajectory_id, verdict.step_index)].verdicts.append(
                (verdict.job_id, str(verdict.label), verdict.agreement)
            )
    shares = {job.id: _label_shares(session, job) for job in jobs}
    for item in items.values():
        item.verdicts.sort(key=lambda verdict: rank[verdict[0]])
        score_queue_item(item, len(jobs), shares)
    ranked = sorted(
        items.values(), key=lambda item: (-item.score, str(item.trajectory_id), item.step_index)
    )
    next_cursor = encode_cursor(rows[-1].id) if len(rows) == window else None
    return ranked[:limit], len(rows), next_cursor


# ---------------------------------------------------------------------- gold sets

GOLD_PAGE = 500


def gold_lines(session: Session, project_id: uuid.UUID) -> Iterator[bytes]:
    """The project's human labels as gold-set lines (`gold.format_line`), by id, read a page
    at a time (keyset on the id), never all at once."""
    after = 0
    while True:
        rows = session.execute(
            select(
                HumanLabel.id,
                HumanLabel.step_index,
                HumanLabel.label,
                HumanLabel.note,
                HumanLabel.author,
                Trajectory.content_hash,
                Trajectory.task_id,
            )
            .join(Trajectory, Trajectory.id == HumanLabel.trajectory_id)
            .where(HumanLabel.project_id == project_id, HumanLabel.id > after)
            .order_by(HumanLabel.id)
            .limit(GOLD_PAGE)
        ).all()
        for row in rows:
            yield gold.format_line(
                row.content_hash, row.step_index, row.label, row.note, row.author, row.task_id
            )
        if len(rows) < GOLD_PAGE:
            return
        after = rows[-1].id


@dataclass(frozen=True)
class GoldImport:
    imported: int
    updated: int
    unchanged: int
    # Lines whose trajectory is not in this project, by line number.
    unmatched: list[int]


def import_gold(session: Session, caller: Caller, lines: Sequence[gold.GoldLine]) -> GoldImport:
    """Store a parsed gold set as the project's human labels, each replacing the step's
    earlier one, with `set_label`'s rules: the step must exist and the label be one of the
    project's. A line whose trajectory (by content hash) is not in this project is counted
    as unmatched; any other bad line raises before anything is written."""
    project_id = caller.project_id
    hashes = sorted({line.content_hash for line in lines})
    trajectories: dict[str, tuple[uuid.UUID, int]] = {}
    for start in range(0, len(hashes), _IN_CHUNK):
        for row in session.execute(
            select(Trajectory.content_hash, Trajectory.id, Trajectory.num_steps).where(
                Trajectory.project_id == project_id,
                Trajectory.content_hash.in_(hashes[start : start + _IN_CHUNK]),
            )
        ):
            trajectories[row.content_hash] = (row.id, row.num_steps)
    allowed = known_labels(session, project_id)
    matched: list[tuple[gold.GoldLine, uuid.UUID]] = []
    unmatched: list[int] = []
    for line in lines:
        found = trajectories.get(line.content_hash)
        if found is None:
            unmatched.append(line.line)
            continue
        trajectory_id, num_steps = found
        if line.step_index >= num_steps:
            raise gold.InvalidGoldSetError(
                f"line {line.line}: the trajectory has steps 0-{num_steps - 1}, "
                f"not {line.step_index}",
                location=f"line {line.line}: step_index",
            )
        check_label(allowed, line.label, f"line {line.line}: label", f"line {line.line}: ")
        matched.append((line, trajectory_id))

    ids = sorted({trajectory_id for _, trajectory_id in matched})
    existing: dict[tuple[uuid.UUID, int], HumanLabel] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        existing.update(labels_of(session, ids[start : start + _IN_CHUNK]))
    imported = updated = unchanged = 0
    now = utcnow()
    for line, trajectory_id in matched:
        author = line.author or caller.name
        found_label = existing.get((trajectory_id, line.step_index))
        if found_label is None:
            session.add(
                HumanLabel(
                    project_id=project_id,
                    trajectory_id=trajectory_id,
                    step_index=line.step_index,
                    label=line.label,
                    note=line.note,
                    author=author,
                )
            )
            imported += 1
        elif (found_label.label, found_label.note, found_label.author) == (
            line.label,
            line.note,
            author,
        ):
            unchanged += 1
        else:
            found_label.label, found_label.note, found_label.author = line.label, line.note, author
            found_label.updated_at = now
            updated += 1
    session.flush()
    return GoldImport(imported, updated, unchanged, unmatched)
