"""Masking policies: which steps are trained, masked or cut, and which rows are dropped."""

from __future__ import annotations

import json
import random
from typing import Any, get_args

import pytest

from app.recipe.masking import (
    DEFAULT_MASK_LABELS,
    DROP_REASONS,
    NO_LABEL,
    POLICIES,
    Policy,
    PolicyCounts,
    PolicyOptions,
    StepDecision,
    StepLabel,
    TrajectoryDecision,
    critic_label,
    decide,
    resolve_labels,
)

DEFAULT = PolicyOptions()
SEQUENCE = ("good", "mistake", "unnecessary", "recover", "good")


def step_labels(*names: str | None) -> list[StepLabel]:
    return [StepLabel(name, source="critic" if name else "none") for name in names]


def outcomes(decision: TrajectoryDecision) -> str:
    """One letter per step: T trained, M masked, C cut."""
    return "".join({"trained": "T", "masked": "M", "cut": "C"}[s.outcome] for s in decision.steps)


def weights(decision: TrajectoryDecision) -> tuple[float, ...]:
    return tuple(step.weight for step in decision.steps)


def sources(decision: TrajectoryDecision) -> tuple[str, ...]:
    return tuple(step.source for step in decision.steps)


def test_policy_names_match_the_literal_type() -> None:
    assert POLICIES == get_args(Policy) == ("sft", "rft", "srft", "srft_unresolved", "prefix")
    assert DROP_REASONS == ("unresolved", "resolved", "unlabeled", "too_few_trained_steps")


# policy, resolved -> (drop reason or None, outcomes, context_steps, source of every step)
MATRIX: list[tuple[str, bool | None, str | None, str, int, str]] = [
    ("sft", True, None, "TTTTT", 5, "policy"),
    ("sft", False, None, "TTTTT", 5, "policy"),
    ("sft", None, None, "TTTTT", 5, "policy"),
    ("rft", True, None, "TTTTT", 5, "policy"),
    ("rft", False, "unresolved", "MMMMM", 5, "policy"),
    ("rft", None, "unresolved", "MMMMM", 5, "policy"),
    ("srft", True, None, "TTTTT", 5, "policy"),
    ("srft", False, None, "TMTTT", 5, "critic"),
    ("srft", None, None, "TMTTT", 5, "critic"),
    ("srft_unresolved", True, "resolved", "MMMMM", 5, "policy"),
    ("srft_unresolved", False, None, "TMTTT", 5, "critic"),
    ("srft_unresolved", None, None, "TMTTT", 5, "critic"),
    ("prefix", True, None, "TTTTT", 5, "policy"),
    ("prefix", False, None, "TCCCC", 1, "critic"),
    ("prefix", None, None, "TCCCC", 1, "critic"),
]


@pytest.mark.parametrize(("policy", "resolved", "reason", "expected", "context", "source"), MATRIX)
def test_every_policy_for_every_resolution(
    policy: Policy,
    resolved: bool | None,
    reason: str | None,
    expected: str,
    context: int,
    source: str,
) -> None:
    decision = decide(policy, resolved, step_labels(*SEQUENCE), DEFAULT)
    assert decision.kept is (reason is None)
    assert decision.drop_reason == reason
    assert outcomes(decision) == expected
    assert weights(decision) == tuple(1.0 if o == "T" else 0.0 for o in expected)
    assert decision.context_steps == context
    assert sources(decision) == (source,) * len(SEQUENCE)
    # The label given is recorded whether or not the policy consulted it.
    assert tuple(step.label for step in decision.steps) == SEQUENCE
    assert decision.trained_steps == expected.count("T")


def test_masking_unnecessary_too() -> None:
    options = PolicyOptions(mask_labels=frozenset({"mistake", "unnecessary"}))
    decision = decide("srft", False, step_labels(*SEQUENCE), options)
    assert outcomes(decision) == "TMMTT"
    assert weights(decision) == (1.0, 0.0, 0.0, 1.0, 1.0)


def test_mask_labels_are_the_only_thing_that_masks() -> None:
    options = PolicyOptions(mask_labels=frozenset({"unnecessary"}))
    decision = decide("srft", False, step_labels(*SEQUENCE), options)
    assert outcomes(decision) == "TTMTT"


def test_prefix_ends_at_the_first_step_in_mask_labels() -> None:
    labels = step_labels("good", "unnecessary", "good", "mistake", "good")
    only_mistake = decide("prefix", False, labels, DEFAULT)
    assert (outcomes(only_mistake), only_mistake.context_steps) == ("TTTCC", 3)
    both = PolicyOptions(mask_labels=frozenset({"mistake", "unnecessary"}))
    with_unnecessary = decide("prefix", False, labels, both)
    assert (outcomes(with_unnecessary), with_unnecessary.context_steps) == ("TCCCC", 1)
    assert weights(with_unnecessary) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_a_prefix_without_a_masked_step_is_the_whole_trajectory() -> None:
    decision = decide("prefix", False, step_labels("good", "recover", "unnecessary"), DEFAULT)
    assert (outcomes(decision), decision.context_steps) == ("TTT", 3)


CRITIQUED = PolicyOptions(critique_resolved=True)


@pytest.mark.parametrize(
    ("policy", "reason", "expected", "context", "source"),
    [
        ("srft", None, "TMTTT", 5, "critic"),
        ("prefix", None, "TCCCC", 1, "critic"),
        # critique_resolved changes how resolved runs are trained, not which are kept,
        # and the baselines never consult verdicts.
        ("srft_unresolved", "resolved", "MMMMM", 5, "policy"),
        ("rft", None, "TTTTT", 5, "policy"),
        ("sft", None, "TTTTT", 5, "policy"),
    ],
)
def test_critique_resolved_applies_labels_to_resolved_runs(
    policy: Policy, reason: str | None, expected: str, context: int, source: str
) -> None:
    decision = decide(policy, True, step_labels(*SEQUENCE), CRITIQUED)
    assert decision.drop_reason == reason
    assert outcomes(decision) == expected
    assert decision.context_steps == context
    assert sources(decision) == (source,) * len(SEQUENCE)


def test_critique_resolved_does_not_change_unresolved_runs() -> None:
    plain = decide("srft", False, step_labels(*SEQUENCE), DEFAULT)
    assert decide("srft", False, step_labels(*SEQUENCE), CRITIQUED) == plain


WITH_GAP = ("good", None, "mistake", "good")


@pytest.mark.parametrize(
    ("policy", "unlabeled", "reason", "expected", "context"),
    [
        ("srft", "mask", None, "TMMT", 4),
        ("srft", "train", None, "TTMT", 4),
        ("srft", "drop", "unlabeled", "MMMM", 4),
        ("srft_unresolved", "mask", None, "TMMT", 4),
        ("srft_unresolved", "train", None, "TTMT", 4),
        ("srft_unresolved", "drop", "unlabeled", "MMMM", 4),
        # Under prefix an unlabeled step that is masked ends the row like a mistake.
        ("prefix", "mask", None, "TCCC", 1),
        ("prefix", "train", None, "TTCC", 2),
        ("prefix", "drop", "unlabeled", "MMMM", 4),
    ],
)
def test_unlabeled_steps(
    policy: Policy, unlabeled: Any, reason: str | None, expected: str, context: int
) -> None:
    options = PolicyOptions(unlabeled=unlabeled)
    decision = decide(policy, False, step_labels(*WITH_GAP), options)
    assert decision.drop_reason == reason
    assert outcomes(decision) == expected
    assert decision.context_steps == context
    assert decision.steps[1].source == "none"
    assert decision.steps[1].label is None
    assert all(decision.steps[i].source == "critic" for i in (0, 2, 3))


def test_an_unlabeled_step_past_the_prefix_end_still_drops_under_drop() -> None:
    labels = step_labels("good", "mistake", None)
    assert decide("prefix", False, labels, PolicyOptions(unlabeled="mask")).kept
    decision = decide("prefix", False, labels, PolicyOptions(unlabeled="drop"))
    assert decision.drop_reason == "unlabeled"


@pytest.mark.parametrize("policy", ["sft", "rft", "srft", "prefix"])
def test_unlabeled_steps_of_uncritiqued_runs_are_trained_even_under_drop(policy: Policy) -> None:
    decision = decide(policy, True, step_labels(*WITH_GAP), PolicyOptions(unlabeled="drop"))
    assert decision.kept
    assert outcomes(decision) == "TTTT"
    assert sources(decision) == ("policy",) * 4
    assert decision.steps[1].label is None


SOFT = PolicyOptions(soft=True)


@pytest.mark.parametrize(
    ("step", "options", "weight", "outcome"),
    [
        (StepLabel("mistake", ("mistake", "good", "good")), SOFT, 2 / 3, "trained"),
        # The votes decide, not the majority label.
        (StepLabel("good", ("good", "mistake", "mistake")), SOFT, 1 / 3, "trained"),
        (StepLabel("mistake", ("mistake", "mistake")), SOFT, 0.0, "masked"),
        (StepLabel("good", ("good", "recover", "unnecessary", "good")), SOFT, 1.0, "trained"),
        (
            StepLabel("good", ("unnecessary", "mistake", "good", "good")),
            PolicyOptions(soft=True, mask_labels=frozenset({"mistake", "unnecessary"})),
            0.5,
            "trained",
        ),
        # A single verdict has no share to take.
        (StepLabel("mistake"), SOFT, 0.0, "masked"),
        (StepLabel("good"), SOFT, 1.0, "trained"),
        # Without soft, votes are ignored.
        (StepLabel("mistake", ("mistake", "good", "good")), DEFAULT, 0.0, "masked"),
        (StepLabel("good", ("good", "mistake", "mistake")), DEFAULT, 1.0, "trained"),
        # A human label is not a vote: it decides alone.
        (StepLabel("mistake", ("mistake", "good", "good"), "human"), SOFT, 0.0, "masked"),
        (StepLabel("good", ("mistake", "mistake", "good"), "human"), SOFT, 1.0, "trained"),
    ],
)
def test_soft_weights(step: StepLabel, options: PolicyOptions, weight: float, outcome: str) -> None:
    decision = decide("srft", False, [StepLabel("good"), step], options)
    assert decision.steps[1].weight == weight
    assert decision.steps[1].outcome == outcome
    assert decision.steps[1].label == step.label
    assert decision.steps[1].source == step.source


def test_soft_prefix_ends_only_at_a_zero_weight_step() -> None:
    labels = [
        StepLabel("good"),
        StepLabel("mistake", ("mistake", "good", "good")),
        StepLabel("mistake", ("mistake", "mistake", "mistake")),
        StepLabel("good"),
    ]
    decision = decide("prefix", False, labels, SOFT)
    assert weights(decision) == (1.0, 2 / 3, 0.0, 0.0)
    assert outcomes(decision) == "TTCC"
    assert decision.context_steps == 2
    assert decision.trained_steps == 2


def test_soft_unlabeled_steps_follow_the_unlabeled_mode() -> None:
    labels = [StepLabel(None, source="none"), StepLabel("good")]
    masked = decide("srft", False, labels, PolicyOptions(soft=True, unlabeled="mask"))
    trained = decide("srft", False, labels, PolicyOptions(soft=True, unlabeled="train"))
    assert weights(masked) == (0.0, 1.0)
    assert weights(trained) == (1.0, 1.0)


def test_human_source_is_carried_through() -> None:
    labels = [StepLabel("mistake", source="human"), StepLabel("good", source="human")]
    labels.append(StepLabel("good"))
    decision = decide("srft", False, labels, DEFAULT)
    assert sources(decision) == ("human", "human", "critic")
    assert outcomes(decision) == "MTT"
    # Where the policy does not consult labels, it says so, but keeps the label given.
    resolved = decide("srft", True, labels, DEFAULT)
    assert sources(resolved) == ("policy",) * 3
    assert resolved.steps[0].label == "mistake"


@pytest.mark.parametrize(
    ("labels", "minimum", "reason"),
    [
        (("mistake", "mistake"), 0, None),
        (("mistake", "mistake"), 1, "too_few_trained_steps"),
        (("good", "mistake", "good"), 2, None),
        (("good", "mistake", "good"), 3, "too_few_trained_steps"),
        (("good", "good"), 10, "too_few_trained_steps"),
    ],
)
def test_min_trained_steps(labels: tuple[str, ...], minimum: int, reason: str | None) -> None:
    decision = decide("srft", False, step_labels(*labels), PolicyOptions(min_trained_steps=minimum))
    assert decision.drop_reason == reason
    assert decision.kept is (reason is None)


def test_min_trained_steps_drops_resolved_runs_too() -> None:
    options = PolicyOptions(min_trained_steps=3)
    assert decide("sft", True, step_labels("good", "good"), options).drop_reason == (
        "too_few_trained_steps"
    )


def test_min_trained_steps_counts_only_the_prefix() -> None:
    labels = step_labels("mistake", "good", "good")
    decision = decide("prefix", False, labels, DEFAULT)
    assert decision.drop_reason == "too_few_trained_steps"
    assert decision.context_steps == 0
    assert outcomes(decision) == "CCC"
    kept = decide("prefix", False, labels, PolicyOptions(min_trained_steps=0))
    assert (kept.kept, kept.context_steps, kept.trained_steps) == (True, 0, 0)


def test_a_soft_partial_weight_counts_as_trained() -> None:
    labels = [StepLabel("mistake", ("mistake", "mistake", "good"))]
    decision = decide("srft", False, labels, PolicyOptions(soft=True))
    assert decision.kept
    assert decision.trained_steps == 1


def test_a_dropped_trajectory_trains_nothing() -> None:
    decision = decide(
        "srft", False, step_labels("good", "good"), PolicyOptions(min_trained_steps=3)
    )
    assert outcomes(decision) == "MM"
    assert weights(decision) == (0.0, 0.0)
    assert decision.trained_steps == 0


def test_policy_reasons_come_before_the_count() -> None:
    assert decide("rft", False, step_labels("mistake"), DEFAULT).drop_reason == "unresolved"
    options = PolicyOptions(unlabeled="drop")
    assert decide("srft", False, step_labels("mistake", None), options).drop_reason == "unlabeled"


def test_zero_steps_do_not_crash() -> None:
    assert decide("srft", False, [], DEFAULT) == TrajectoryDecision(
        False, "too_few_trained_steps", (), 0
    )
    assert decide("prefix", False, [], PolicyOptions(min_trained_steps=0)) == TrajectoryDecision(
        True, None, (), 0
    )
    assert decide("rft", None, [], DEFAULT).drop_reason == "unresolved"


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown masking policy 'rejection'"):
        decide("rejection", False, step_labels("good"), DEFAULT)  # type: ignore[arg-type]


def test_a_negative_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="min_trained_steps must be >= 0, got -1"):
        PolicyOptions(min_trained_steps=-1)


def test_an_unknown_unlabeled_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unlabeled must be one of mask, train, drop, got 'skip'"):
        PolicyOptions(unlabeled="skip")  # type: ignore[arg-type]


def test_counts_over_several_decisions() -> None:
    counts = PolicyCounts()
    both = PolicyOptions(mask_labels=frozenset({"mistake", "unnecessary"}))
    counts.add(decide("srft", True, step_labels("good", "mistake"), DEFAULT))
    counts.add(decide("srft", False, step_labels(*SEQUENCE), both))
    counts.add(decide("prefix", False, step_labels("good", None, "good"), DEFAULT))
    counts.add(decide("srft", False, [StepLabel("mistake", source="human")], DEFAULT))
    counts.add(decide("rft", None, step_labels("good"), DEFAULT))
    counts.add(decide("rft", False, step_labels("good"), DEFAULT))
    assert counts.as_dict() == {
        "trajectories_kept": 3,
        "trajectories_dropped": {"too_few_trained_steps": 1, "unresolved": 2},
        "steps_trained": 6,
        "steps_masked": 2,
        "steps_cut": 2,
        "trained_by_label": {"good": 4, "mistake": 1, "recover": 1},
        "masked_by_label": {"mistake": 1, "unnecessary": 1},
        "steps_by_source": {"critic": 6, "policy": 2},
    }
    as_json = json.dumps(counts.as_dict())
    assert json.loads(as_json) == counts.as_dict()


def test_counts_list_keys_in_sorted_order() -> None:
    counts = PolicyCounts()
    counts.add(decide("srft", False, step_labels("unnecessary", "recover", "good"), DEFAULT))
    counts.add(decide("srft_unresolved", True, step_labels("good"), DEFAULT))
    counts.add(decide("rft", False, step_labels("good"), DEFAULT))
    result = counts.as_dict()
    assert list(result["trained_by_label"]) == ["good", "recover", "unnecessary"]
    assert list(result["trajectories_dropped"]) == ["resolved", "unresolved"]


def test_counts_key_unlabeled_steps_as_unlabeled() -> None:
    counts = PolicyCounts()
    counts.add(decide("srft", False, step_labels(None, "good"), DEFAULT))
    counts.add(decide("srft", False, step_labels(None, "good"), PolicyOptions(unlabeled="train")))
    assert counts.masked_by_label == {"unlabeled": 1}
    assert counts.trained_by_label == {"good": 2, "unlabeled": 1}
    assert counts.steps_by_source == {"critic": 2, "none": 2}


# Random label sequences: the expectation below is written from the rules, not from the code.
LABEL_POOL: tuple[str | None, ...] = ("good", "unnecessary", "mistake", "recover", None)


def random_case(rng: random.Random) -> tuple[list[StepLabel], frozenset[str], str, bool | None]:
    names = [rng.choice(LABEL_POOL) for _ in range(rng.randint(1, 12))]
    mask = frozenset(rng.sample(["mistake", "unnecessary", "recover"], rng.randint(1, 2)))
    return step_labels(*names), mask, rng.choice(["mask", "train"]), rng.choice([False, None])


def expected_weight(item: StepLabel, mask: frozenset[str], unlabeled: str) -> float:
    if item.label is None:
        return 1.0 if unlabeled == "train" else 0.0
    return 0.0 if item.label in mask else 1.0


@pytest.mark.parametrize("seed", range(20))
def test_random_sequences_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        labels, mask, mode, resolved = random_case(rng)
        unlabeled: Any = mode
        n = len(labels)
        loose = PolicyOptions(mask_labels=mask, unlabeled=unlabeled, min_trained_steps=0)
        wanted = [expected_weight(item, mask, unlabeled) for item in labels]

        srft = decide("srft", resolved, labels, loose)
        masked = sum(item.label in mask for item in labels)
        masked += sum(item.label is None for item in labels) if unlabeled == "mask" else 0
        assert [s.outcome for s in srft.steps].count("masked") == masked
        assert list(weights(srft)) == wanted
        assert srft.context_steps == n
        assert decide("srft_unresolved", resolved, labels, loose) == srft

        prefix = decide("prefix", resolved, labels, loose)
        first = wanted.index(0.0) if 0.0 in wanted else n
        assert prefix.context_steps == first
        assert prefix.trained_steps == first
        assert all(step.weight == 1.0 for step in prefix.steps[:first])
        assert all(s.outcome == "cut" and s.weight == 0 for s in prefix.steps[first:])

        strict = PolicyOptions(mask_labels=mask, unlabeled=unlabeled)
        assert decide("srft", resolved, labels, strict).kept is (sum(wanted) >= 1)
        assert decide("prefix", resolved, labels, strict).kept is (first >= 1)
        assert weights(decide("srft", True, labels, strict)) == (1.0,) * n


@pytest.mark.parametrize("seed", range(5))
def test_random_soft_weights_are_the_share_of_unmasked_votes(seed: int) -> None:
    rng = random.Random(seed)
    voters = ["good", "mistake", "unnecessary", "recover"]
    for _ in range(200):
        votes = tuple(rng.choice(voters) for _ in range(rng.randint(1, 7)))
        label = votes[0]
        decision = decide(
            "srft", False, [StepLabel(label, votes)], PolicyOptions(soft=True, min_trained_steps=0)
        )
        clean = [vote for vote in votes if vote != "mistake"]
        assert decision.steps[0].weight == len(clean) / len(votes)
        assert (decision.steps[0].outcome == "masked") is (not clean)


@pytest.mark.parametrize("seed", range(5))
def test_random_counts_add_up(seed: int) -> None:
    rng = random.Random(seed)
    counts = PolicyCounts()
    decisions: list[TrajectoryDecision] = []
    for _ in range(100):
        labels, mask, _, _ = random_case(rng)
        unlabeled: Any = rng.choice(["mask", "train", "drop"])
        options = PolicyOptions(mask_labels=mask, unlabeled=unlabeled)
        policy: Any = rng.choice(POLICIES)
        decision = decide(policy, rng.choice([True, False, None]), labels, options)
        decisions.append(decision)
        counts.add(decision)
    kept = [d for d in decisions if d.kept]
    assert counts.trajectories_kept == len(kept)
    assert counts.trajectories_kept + sum(counts.trajectories_dropped.values()) == len(decisions)
    assert set(counts.trajectories_dropped) <= set(DROP_REASONS)
    kept_steps = sum(len(d.steps) for d in kept)
    assert counts.steps_trained + counts.steps_masked + counts.steps_cut == kept_steps
    assert counts.steps_trained == sum(d.trained_steps for d in kept)
    assert sum(counts.trained_by_label.values()) == counts.steps_trained
    assert sum(counts.masked_by_label.values()) == counts.steps_masked
    assert sum(counts.steps_by_source.values()) == counts.steps_trained + counts.steps_masked
    assert all(isinstance(step, StepDecision) for d in decisions for step in d.steps)


# ---------------------------------------------------------------------- label resolution


def test_a_verdict_keeps_its_votes_only_when_there_were_several() -> None:
    assert critic_label("mistake", ["mistake", "good", "mistake"]) == StepLabel(
        "mistake", ("mistake", "good", "mistake"), "critic"
    )
    assert critic_label("good", ["good"]) == StepLabel("good", (), "critic")
    assert critic_label("good", None) == StepLabel("good", (), "critic")


def test_a_human_label_beats_every_verdict_and_carries_no_votes() -> None:
    voted = critic_label("mistake", ["mistake", "mistake", "good"])
    labels = resolve_labels(3, {0: "good"}, [{0: voted, 1: voted}])
    assert labels == (StepLabel("good", (), "human"), voted, NO_LABEL)
    # Soft weights read the votes of a critic's verdict, never of a reviewer's label.
    soft = PolicyOptions(soft=True)
    assert weights(decide("srft", False, labels, soft)) == (1.0, pytest.approx(1 / 3), 0.0)


def test_a_later_job_overrides_an_earlier_one_where_it_has_a_verdict() -> None:
    earlier = {0: critic_label("good", None), 1: critic_label("good", None)}
    later = {1: critic_label("mistake", None), 2: critic_label("unnecessary", None)}
    assert [label.label for label in resolve_labels(4, {}, [earlier, later])] == [
        "good",
        "mistake",
        "unnecessary",
        None,
    ]
    assert [label.label for label in resolve_labels(4, {}, [later, earlier])] == [
        "good",
        "good",
        "unnecessary",
        None,
    ]


def test_the_default_mask_is_the_default_label_sets_harmful_step() -> None:
    assert DEFAULT_MASK_LABELS == ("mistake",)
    assert PolicyOptions().mask_labels == frozenset(DEFAULT_MASK_LABELS)
