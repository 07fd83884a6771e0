"""How well a critic agrees with human reviewers, from (critic label, human label) pairs, and
several critics compared on the same steps with bootstrap intervals and Cohen's kappa.

Pure. Precision, recall and F1 are 0.0 wherever their denominator is 0 (a label nobody
predicted, a label no human used, or nothing compared), so every number is always a float and
never NaN. The confusion matrix has a row per human label and a column per critic label.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from app.recipe.masking import DEFAULT_MASK_LABELS


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    total = precision + recall
    return 2 * precision * recall / total if total else 0.0


@dataclass(frozen=True)
class LabelScore:
    """One label scored one-vs-rest; `support` is how many steps humans gave this label."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MaskScore:
    """The paper's decision: a step is masked (positive) when its label is in `mask_labels`.

    Human masking is the truth; the counts are of steps."""

    mask_labels: tuple[str, ...]
    precision: float
    recall: float
    f1: float
    true_positive: int  # both mask
    false_positive: int  # the critic masks, the human would train
    false_negative: int  # the critic trains, the human would mask
    true_negative: int  # both train

    def as_dict(self) -> dict[str, Any]:
        return {
            "mask_labels": list(self.mask_labels),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "counts": {
                "true_positive": self.true_positive,
                "false_positive": self.false_positive,
                "false_negative": self.false_negative,
                "true_negative": self.true_negative,
            },
        }


@dataclass(frozen=True)
class Evaluation:
    labels: tuple[str, ...]
    compared: int
    accuracy: float
    macro_f1: float
    per_label: tuple[LabelScore, ...]
    # confusion[i][j]: steps a human labelled labels[i] and the critic labels[j].
    confusion: tuple[tuple[int, ...], ...]
    masked_vs_trained: MaskScore

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_label": [score.as_dict() for score in self.per_label],
            "confusion": {
                "labels": list(self.labels),
                "rows": "human",
                "columns": "critic",
                "matrix": [list(row) for row in self.confusion],
            },
            "masked_vs_trained": self.masked_vs_trained.as_dict(),
        }


def evaluate(
    pairs: Iterable[tuple[str, str]],
    labels: Sequence[str],
    mask_labels: Collection[str] = DEFAULT_MASK_LABELS,
) -> Evaluation:
    """Score (critic label, human label) pairs, one pair per step."""
    return evaluate_counts(Counter(pairs), labels, mask_labels)


def evaluate_counts(
    counts: Mapping[tuple[str, str], int],
    labels: Sequence[str],
    mask_labels: Collection[str] = DEFAULT_MASK_LABELS,
) -> Evaluation:
    """Score counted (critic label, human label) pairs.

    Labels are in `labels` order; a label seen in the pairs but not listed (a human label
    outside the job's set) is appended, sorted. Macro F1 averages the labels that occur on
    either side, as scikit-learn does: a label neither side used is no evidence either way.
    """
    order = list(dict.fromkeys(labels))
    seen = {label for pair in counts for label in pair}
    order += sorted(seen - set(order))
    index = {label: i for i, label in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for (critic, human), count in counts.items():
        matrix[index[human]][index[critic]] += count

    compared = sum(sum(row) for row in matrix)
    scores: list[LabelScore] = []
    for i, label in enumerate(order):
        hit = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision, recall = _ratio(hit, predicted), _ratio(hit, support)
        scores.append(
            LabelScore(label, precision, recall, _f1(precision, recall), support, predicted)
        )
    used = [s for s in scores if s.support or s.predicted]
    macro_f1 = sum(s.f1 for s in used) / len(used) if used else 0.0
    accuracy = _ratio(sum(matrix[i][i] for i in range(len(order))), compared)

    masked = {index[label] for label in mask_labels if label in index}
    tp = fp = fn = tn = 0
    for h, row in enumerate(matrix):
        for c, count in enumerate(row):
            if c in masked and h in masked:
                tp += count
            elif c in masked:
                fp += count
            elif h in masked:
                fn += count
            else:
                tn += count
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    mask_score = MaskScore(
        tuple(mask_labels), precision, recall, _f1(precision, recall), tp, fp, fn, tn
    )
    return Evaluation(
        labels=tuple(order),
        compared=compared,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_label=tuple(scores),
        confusion=tuple(tuple(row) for row in matrix),
        masked_vs_trained=mask_score,
    )


# ---------------------------------------------------------------------- comparing critics

# The interval every comparison reports: the central 95% of the bootstrap replicates.
CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
# A comparison is computed per request: 8 jobs x 3,000 steps x 2,000 resamples is ~3.5 s of
# CPU on a 2-core box; 2,000 replicates already put a 95% percentile interval's ends within
# a fraction of their width.
MAX_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Interval:
    """A score on the compared steps and its percentile bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of sorted values, interpolating linearly between the two
    nearest ranks (NumPy's default, `statistics.quantiles(method="inclusive")`)."""
    if not ordered:
        return 0.0
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def bootstrap_draws(steps: int, resamples: int, seed: int = BOOTSTRAP_SEED) -> Iterator[list[int]]:
    """The resamples: each `steps` step indices drawn with replacement, from
    `random.Random(seed)` by `choices(range(steps), k=steps)`, one call per resample."""
    rng = random.Random(seed)
    population = range(steps)
    for _ in range(resamples):
        yield rng.choices(population, k=steps)


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items: (p_o - p_e) / (1 - p_e). Where chance
    agreement is already certain (both always say the same one thing) it is 1.0 if they agree
    and 0.0 otherwise; with nothing rated, 0.0."""
    total = len(first)
    if total == 0:
        return 0.0
    observed = sum(1 for a, b in zip(first, second, strict=True) if a == b) / total
    first_counts, second_counts = Counter(first), Counter(second)
    expected = sum(first_counts[k] * second_counts[k] for k in first_counts) / (total * total)
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return (observed - expected) / (1 - expected)


def _scores(result: Evaluation) -> list[float | None]:
    """The scores of an evaluation that get intervals, in a fixed order: accuracy, macro F1,
    masked precision, recall, F1, then precision, recall, F1 of each label. A score whose
    denominator is 0 on these steps (precision of a label never predicted, recall of one no
    human used, F1 of one neither used) is None: a resample without such steps says nothing
    of it, so it is left out of that score's replicates rather than counted as 0."""
    if not result.compared:
        return [None] * (5 + 3 * len(result.per_label))
    mask = result.masked_vs_trained
    flat: list[float | None] = [result.accuracy, result.macro_f1]
    positives = mask.true_positive + mask.false_positive
    truths = mask.true_positive + mask.false_negative
    flat += [
        mask.precision if positives else None,
        mask.recall if truths else None,
        mask.f1 if positives or truths else None,
    ]
    for score in result.per_label:
        flat += [
            score.precision if score.predicted else None,
            score.recall if score.support else None,
            score.f1 if score.predicted or score.support else None,
        ]
    return flat


def _difference(first: float | None, second: float | None) -> float | None:
    return first - second if first is not None and second is not None else None


@dataclass(frozen=True)
class CriticComparison:
    """One critic (job) on the compared steps: its evaluation, with an interval per score."""

    evaluation: Evaluation
    accuracy: Interval
    macro_f1: Interval
    mask_precision: Interval
    mask_recall: Interval
    mask_f1: Interval
    # Per label, in `evaluation.labels` order: (precision, recall, F1).
    per_label: tuple[tuple[Interval, Interval, Interval], ...]

    def as_dict(self) -> dict[str, Any]:
        result = self.evaluation
        mask = result.masked_vs_trained.as_dict()
        mask |= {
            "precision": self.mask_precision.as_dict(),
            "recall": self.mask_recall.as_dict(),
            "f1": self.mask_f1.as_dict(),
        }
        per_label = [
            {
                "label": score.label,
                "precision": precision.as_dict(),
                "recall": recall.as_dict(),
                "f1": f1.as_dict(),
                "support": score.support,
                "predicted": score.predicted,
            }
            for score, (precision, recall, f1) in zip(result.per_label, self.per_label, strict=True)
        ]
        return {
            "accuracy": self.accuracy.as_dict(),
            "macro_f1": self.macro_f1.as_dict(),
            "per_label": per_label,
            "masked_vs_trained": mask,
            "confusion": result.as_dict()["confusion"],
        }


@dataclass(frozen=True)
class PairAgreement:
    """Two critics on the compared steps: Cohen's kappa of their labels and of their masked /
    trained decisions, and the paired bootstrap interval of first minus second."""

    first: int
    second: int
    label_kappa: float
    mask_kappa: float
    macro_f1_difference: Interval
    mask_f1_difference: Interval


@dataclass(frozen=True)
class Comparison:
    compared: int
    resamples: int
    seed: int
    critics: tuple[CriticComparison, ...]
    pairs: tuple[PairAgreement, ...]


def compare(
    human: Sequence[str],
    critics: Sequence[Sequence[str]],
    labels: Sequence[Sequence[str]],
    mask_labels: Collection[str] = DEFAULT_MASK_LABELS,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Comparison:
    """Score several critics on the same steps: `human[i]` is step i's human label and
    `critics[j][i]` critic j's label of it (`labels[j]` its label set).

    Every score gets a 95% percentile bootstrap interval: `resamples` resamples of the steps
    with replacement (`bootstrap_draws`), the same resamples for every critic, so the
    differences between two critics are paired. For each critic a step is reduced to its
    cell (its (critic, human) label pair, an index into the few distinct pairs), and a resample
    to counts of cells (`Counter` over the drawn indices), so each resample costs one pass over
    the drawn steps per critic and a score of a confusion table.
    """
    steps = len(human)
    for labelled in critics:
        if len(labelled) != steps:
            raise ValueError("every critic must label the same steps as the humans")
    cells: list[list[tuple[str, str]]] = []  # critic -> its distinct (critic, human) pairs
    cell_of: list[list[int]] = []  # critic -> step -> index into its pairs
    for critic_labels in critics:
        index: dict[tuple[str, str], int] = {}
        cell_of.append(
            [
                index.setdefault((c, h), len(index))
                for c, h in zip(critic_labels, human, strict=True)
            ]
        )
        cells.append(list(index))

    def evaluation(j: int, drawn: Iterable[int], order: Sequence[str]) -> Evaluation:
        counted = Counter(map(cell_of[j].__getitem__, drawn))
        pairs = {cells[j][cell]: count for cell, count in counted.items()}
        return evaluate_counts(pairs, order, mask_labels)

    points = [evaluation(j, range(steps), labels[j]) for j in range(len(critics))]
    # A resample holds a subset of the steps: score it over the full data's labels, so the
    # scores line up (`_scores`) whichever labels it happens to hold.
    orders = [point.labels for point in points]
    # critic -> resample -> scores
    replicates: list[list[list[float | None]]] = [[] for _ in critics]
    for draw in bootstrap_draws(steps, resamples, seed) if steps else ():
        for j in range(len(critics)):
            replicates[j].append(_scores(evaluation(j, draw, orders[j])))

    def interval(value: float, samples: Iterable[float | None]) -> Interval:
        ordered = sorted(sample for sample in samples if sample is not None)
        if not ordered:
            return Interval(value, value, value)
        tail = (1 - CONFIDENCE) / 2
        return Interval(value, percentile(ordered, tail), percentile(ordered, 1 - tail))

    compared: list[CriticComparison] = []
    for j, point in enumerate(points):
        values = _scores(point)
        columns = [
            interval(value or 0.0, (sample[n] for sample in replicates[j]))
            for n, value in enumerate(values)
        ]
        compared.append(
            CriticComparison(
                evaluation=point,
                accuracy=columns[0],
                macro_f1=columns[1],
                mask_precision=columns[2],
                mask_recall=columns[3],
                mask_f1=columns[4],
                per_label=tuple(
                    (columns[n], columns[n + 1], columns[n + 2]) for n in range(5, len(columns), 3)
                ),
            )
        )

    masked = set(mask_labels)
    pairs: list[PairAgreement] = []
    for a in range(len(critics)):
        for b in range(a + 1, len(critics)):
            differences = [
                interval(
                    (_scores(points[a])[n] or 0.0) - (_scores(points[b])[n] or 0.0),
                    (
                        _difference(x[n], y[n])
                        for x, y in zip(replicates[a], replicates[b], strict=True)
                    ),
                )
                for n in (1, 4)  # macro F1, masked F1
            ]
            pairs.append(
                PairAgreement(
                    first=a,
                    second=b,
                    label_kappa=cohen_kappa(critics[a], critics[b]),
                    mask_kappa=cohen_kappa(
                        [str(label in masked) for label in critics[a]],
                        [str(label in masked) for label in critics[b]],
                    ),
                    macro_f1_difference=differences[0],
                    mask_f1_difference=differences[1],
                )
            )
    return Comparison(steps, resamples, seed, tuple(compared), tuple(pairs))
