"""Masking policies: how much each step of a trajectory is trained.

Pure. docs/recipe.md: SRFT keeps unresolved runs but gives no loss to the steps the critic judged
harmful, while those steps stay in the context, so the student sees mistakes and the recoveries
after them without learning to make them. The other policies are what SRFT is measured against:
SFT (everything), RFT (resolved only), masked unresolved only, and `prefix`, which ends an
unresolved row before its first harmful step instead of masking it.

A trajectory whose resolution is unknown counts as unresolved: training on a run as if it
succeeded needs evidence that it did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from app.status import LabelSource, TrainingOutcome

Policy = Literal["sft", "rft", "srft", "srft_unresolved", "prefix"]
POLICIES: tuple[str, ...] = get_args(Policy)
Unlabeled = Literal["mask", "train", "drop"]
UNLABELED_MODES: tuple[str, ...] = get_args(Unlabeled)
DROP_REASONS: tuple[str, ...] = ("unresolved", "resolved", "unlabeled", "too_few_trained_steps")
# What an export masks, and the review pages preview, unless told otherwise: the default label
# set's harmful step (app/critic/labels.py).
DEFAULT_MASK_LABELS: tuple[str, ...] = ("mistake",)


@dataclass(frozen=True)
class StepLabel:
    """What is known about one step: a label (None = no verdict), the individual vote labels
    when the critic voted several times, and where the label came from."""

    label: str | None
    votes: tuple[str, ...] = ()
    source: LabelSource = LabelSource.CRITIC


NO_LABEL = StepLabel(None, (), LabelSource.NONE)


def critic_label(label: str, vote_labels: Sequence[str] | None) -> StepLabel:
    """A finished critic verdict as the policy reads it: its label, and its votes when the
    critic voted more than once (one vote says no more than the label)."""
    votes = tuple(vote_labels or ())
    return StepLabel(label, votes if len(votes) > 1 else ())


def resolve_labels(
    num_steps: int, human: Mapping[int, str], critic: Sequence[Mapping[int, StepLabel]]
) -> tuple[StepLabel, ...]:
    """What the policy reads of each step: a reviewer's label wins over any critic verdict
    (and carries no votes: a human's word is not a vote); else the verdict of the last job in
    `critic` (one mapping per job, step -> `critic_label`, in the order the jobs are listed)
    that has one, so a later job overrides an earlier; else no label.

    The one rule for exports and for the review pages' preview of them."""
    labels: list[StepLabel] = []
    for step in range(num_steps):
        if step in human:
            labels.append(StepLabel(human[step], (), LabelSource.HUMAN))
            continue
        labels.append(next((job[step] for job in reversed(critic) if step in job), NO_LABEL))
    return tuple(labels)


@dataclass(frozen=True)
class PolicyOptions:
    """Checked on construction, so a bad export request fails before any row is written."""

    mask_labels: frozenset[str] = frozenset(DEFAULT_MASK_LABELS)
    critique_resolved: bool = False
    unlabeled: Unlabeled = "mask"
    soft: bool = False
    min_trained_steps: int = 1

    def __post_init__(self) -> None:
        if self.unlabeled not in UNLABELED_MODES:
            raise ValueError(
                f"unlabeled must be one of {', '.join(UNLABELED_MODES)}, got {self.unlabeled!r}"
            )
        if self.min_trained_steps < 0:
            raise ValueError(f"min_trained_steps must be >= 0, got {self.min_trained_steps}")


@dataclass(frozen=True)
class StepDecision:
    weight: float  # 0.0 = no loss, 1.0 = trained; in between only with soft=True
    outcome: TrainingOutcome  # `cut`: after the prefix end, not in the row at all
    label: str | None  # the label given, recorded even when the policy did not consult it
    source: LabelSource  # `policy` when the policy did not consult the label


@dataclass(frozen=True)
class TrajectoryDecision:
    kept: bool
    drop_reason: str | None  # None when kept, else one of DROP_REASONS
    steps: tuple[StepDecision, ...]  # one per step, even when dropped; then every weight is 0
    context_steps: int  # leading steps the rendered row contains

    @property
    def trained_steps(self) -> int:
        return sum(1 for step in self.steps[: self.context_steps] if step.weight > 0)


def decide(
    policy: Policy, resolved: bool | None, labels: Sequence[StepLabel], options: PolicyOptions
) -> TrajectoryDecision:
    """The weight of every step of one trajectory under `policy`, or why it is left out."""
    if policy not in POLICIES:
        expected = ", ".join(POLICIES)
        raise ValueError(f"unknown masking policy {policy!r}; expected one of {expected}")
    is_resolved = resolved is True
    untouched = tuple(
        StepDecision(1.0, TrainingOutcome.TRAINED, item.label, LabelSource.POLICY)
        for item in labels
    )
    if policy == "rft" and not is_resolved:
        return _dropped(untouched, len(labels), "unresolved")
    if policy == "srft_unresolved" and is_resolved:
        return _dropped(untouched, len(labels), "resolved")
    critiqued = policy not in ("sft", "rft") and (not is_resolved or options.critique_resolved)
    if not critiqued:
        return _checked(untouched, len(labels), options)

    steps = tuple(_judge(item, options) for item in labels)
    if options.unlabeled == "drop" and any(item.label is None for item in labels):
        # Even past a prefix cut: a run the critic did not finish is not a run we trust.
        return _dropped(steps, len(steps), "unlabeled")
    if policy != "prefix":
        return _checked(steps, len(steps), options)
    end = next((i for i, step in enumerate(steps) if step.weight == 0), len(steps))
    cut = tuple(replace(step, weight=0.0, outcome=TrainingOutcome.CUT) for step in steps[end:])
    return _checked(steps[:end] + cut, end, options)


def _judge(item: StepLabel, options: PolicyOptions) -> StepDecision:
    if item.label is None:
        weight = 1.0 if options.unlabeled == "train" else 0.0
        return StepDecision(weight, _outcome(weight), None, LabelSource.NONE)
    if options.soft and item.votes and item.source != LabelSource.HUMAN:
        # The share of voters who saw nothing to mask; a human's word is not a vote.
        kept_votes = sum(1 for vote in item.votes if vote not in options.mask_labels)
        weight = kept_votes / len(item.votes)
    else:
        weight = 0.0 if item.label in options.mask_labels else 1.0
    return StepDecision(weight, _outcome(weight), item.label, item.source)


def _outcome(weight: float) -> TrainingOutcome:
    return TrainingOutcome.TRAINED if weight > 0 else TrainingOutcome.MASKED


def _checked(
    steps: tuple[StepDecision, ...], context_steps: int, options: PolicyOptions
) -> TrajectoryDecision:
    decision = TrajectoryDecision(True, None, steps, context_steps)
    if decision.trained_steps < options.min_trained_steps:
        return _dropped(steps, context_steps, "too_few_trained_steps")
    return decision


def _dropped(
    steps: tuple[StepDecision, ...], context_steps: int, reason: str
) -> TrajectoryDecision:
    # A dropped row trains nothing; weights say so, so sums over decisions never count it.
    zeroed = tuple(
        replace(step, weight=0.0, outcome=TrainingOutcome.MASKED)
        if step.outcome == TrainingOutcome.TRAINED
        else step
        for step in steps
    )
    return TrajectoryDecision(False, reason, zeroed, context_steps)


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


@dataclass
class PolicyCounts:
    """What a policy did over an export, for the manifest: rows kept and dropped, and steps."""

    trajectories_kept: int = 0
    trajectories_dropped: dict[str, int] = field(default_factory=dict)
    steps_trained: int = 0
    steps_masked: int = 0
    steps_cut: int = 0
    trained_by_label: dict[str, int] = field(default_factory=dict)
    masked_by_label: dict[str, int] = field(default_factory=dict)
    steps_by_source: dict[str, int] = field(default_factory=dict)

    def add(self, decision: TrajectoryDecision) -> None:
        """Count a dropped trajectory by its reason, a kept one by its steps."""
        if not decision.kept:
            _bump(self.trajectories_dropped, str(decision.drop_reason))
            return
        self.trajectories_kept += 1
        for index, step in enumerate(decision.steps):
            if index >= decision.context_steps:
                self.steps_cut += 1
                continue
            key = step.label if step.label is not None else "unlabeled"
            _bump(self.steps_by_source, step.source)
            if step.weight > 0:
                self.steps_trained += 1
                _bump(self.trained_by_label, key)
            else:
                self.steps_masked += 1
                _bump(self.masked_by_label, key)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, keys sorted so the same export writes the same manifest."""
        return {
            "trajectories_kept": self.trajectories_kept,
            "trajectories_dropped": dict(sorted(self.trajectories_dropped.items())),
            "steps_trained": self.steps_trained,
            "steps_masked": self.steps_masked,
            "steps_cut": self.steps_cut,
            "trained_by_label": dict(sorted(self.trained_by_label.items())),
            "masked_by_label": dict(sorted(self.masked_by_label.items())),
            "steps_by_source": dict(sorted(self.steps_by_source.items())),
        }
