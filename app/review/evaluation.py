"""How well a critic agrees with human reviewers, from (critic label, human label) pairs.

Pure. Precision, recall and F1 are 0.0 wherever their denominator is 0 (a label nobody
predicted, a label no human used, or nothing compared), so every number is always a float and
never NaN. The confusion matrix has a row per human label and a column per critic label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
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
