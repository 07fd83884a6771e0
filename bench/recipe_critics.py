"""The recipe check's critics, served over the OpenAI chat-completions API by the rules critic's
app with true labels as its verdict source:

- `oracle`: the environment's true label of every step;
- `oracle-p{P}-r{R}-s{S}`: the oracle corrupted to precision P and recall R of `mistake`
  (seed S): a true mistake stays one with probability R (else it is called `good`), and
  other steps are called `mistake` at the rate that gives precision P over the runs the job
  labels (the unresolved ones); the draws are a hash of (seed, run, step), so they repeat;
- any other model (`rules`): the rules critic itself.

The oracle finds a run by a digest of the prompt's task, outcome and trajectory (runs that read
the same are one run to srft too), and each step by its index (read back with
`app.critic.rules.read_prefix`); labels never appear in the text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.critic import rules
from app.critic.labels import DEFAULT_LABELS
from app.critic.prompt import trajectory_windows
from app.critic.rules_server import start_rules_server_thread
from app.recipe.steps import split_steps
from app.trajectories.formats import parse_upload
from bench.recipe_env import GOOD, MISTAKE
from bench.recipe_teachers import TeacherRun

_CORRUPTED = re.compile(r"oracle-p([0-9.]+)-r([0-9.]+)-s(\d+)")


def corrupted_model(precision: float, recall: float, seed: int) -> str:
    return f"oracle-p{precision:g}-r{recall:g}-s{seed}"


def task_key(messages: Sequence[Any]) -> str:
    """The digest a run is found by: a critic prompt's user message up to the end of its
    `<trajectory>` (the task, the outcome and every step; not the instructions)."""
    content = messages[1].get("content") if len(messages) > 1 else None
    if not isinstance(content, str) or "</trajectory>" not in content:
        raise rules.PromptFormatError("no <trajectory> section in the prompt")
    return hashlib.sha256(content.split("</trajectory>", 1)[0].encode()).hexdigest()


def run_key(run: TeacherRun) -> str:
    """`task_key` of the prompt srft's critic client builds for a teacher's run as srft stores
    it (its own importer, step split and prompt builder)."""
    (parsed,) = parse_upload(json.dumps(run.item()).encode(), "auto")
    steps = split_steps(parsed.messages)
    (request, *_) = trajectory_windows(
        parsed.messages, steps, parsed.resolved, DEFAULT_LABELS, context_tokens=128_000
    )
    return task_key(request.messages)


@dataclass(frozen=True)
class TrueLabels:
    labels: dict[str, tuple[str, ...]]  # run key -> the true label of each step
    resolved: dict[str, bool]
    conflicts: int  # runs whose text another run with other labels had (the first is kept)

    @classmethod
    def of(cls, runs: Sequence[TeacherRun]) -> TrueLabels:
        labels: dict[str, tuple[str, ...]] = {}
        resolved: dict[str, bool] = {}
        conflicts = 0
        for run in runs:
            key = run_key(run)
            if key in labels:
                conflicts += labels[key] != tuple(run.labels)
                continue
            labels[key] = tuple(run.labels)
            resolved[key] = run.resolved
        return cls(labels, resolved, conflicts)

    def false_positive_rate(self, precision: float, recall: float) -> float:
        """The share of other steps of unresolved runs to call `mistake` for `precision`."""
        unresolved = [self.labels[key] for key, done in self.resolved.items() if not done]
        mistakes = sum(label == MISTAKE for run in unresolved for label in run)
        others = sum(label != MISTAKE for run in unresolved for label in run)
        if not others or precision <= 0:
            return 0.0
        return min(1.0, mistakes * recall * (1 - precision) / (precision * others))

    def __call__(
        self, model: str, messages: Sequence[Any], prefix: rules.PromptPrefix
    ) -> list[rules.RuleVerdict] | None:
        corrupted = _CORRUPTED.fullmatch(model)
        if model != "oracle" and corrupted is None:
            return None
        key = task_key(messages)
        true = self.labels.get(key)
        if true is None:
            raise rules.PromptFormatError("the oracle does not know this run")
        verdicts: list[rules.RuleVerdict] = []
        if corrupted is not None:
            precision, recall, seed = (
                float(corrupted.group(1)),
                float(corrupted.group(2)),
                int(corrupted.group(3)),
            )
            false_positive = self.false_positive_rate(precision, recall)
        for step in prefix.steps:
            label = true[step.index]
            if corrupted is not None:
                draw = _unit(f"{seed}:{key}:{step.index}")
                if label == MISTAKE:
                    label = MISTAKE if draw < recall else GOOD
                elif draw < false_positive:
                    label = MISTAKE
            outcome = rules.Outcome(label)
            verdicts.append(rules.RuleVerdict(step.index, outcome, label, f"The step is {label}."))
        return verdicts


def _unit(text: str) -> float:
    """A uniform draw in [0, 1) from a hash of `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def serve_critics(true_labels: TrueLabels) -> int:
    """The oracle, corrupted oracles and rules critic, served from a thread; the port."""
    return start_rules_server_thread(verdict_source=true_labels)
