"""Asking the critic about steps: retries, re-asks, votes. Async; no database.

`Judge` turns critic requests (built by `app.critic.prompt`) into one outcome per step:

- transport failures that retrying can fix (429, 5xx, timeouts, lost connections) are retried
  with exponential backoff and full jitter, waiting at least what Retry-After asks;
- an answer that does not parse is re-asked in the same conversation, quoting the parse error;
- `votes: k` asks k times and keeps the majority label; ties go to the label of the
  lowest-numbered vote among them, so the outcome does not depend on which call returned first;
- when attempts run out the step's outcome carries the error instead of a label.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.critic.client import Completion, CriticCallError, CriticClient, EndpointOptions
from app.critic.labels import LabelSet
from app.critic.limits import Limiter
from app.critic.parse import (
    CriticAnswerError,
    Judgment,
    parse_step_answer,
    parse_trajectory_answer,
)
from app.critic.prompt import (
    CriticRequest,
    StepRequests,
    reask_messages,
    trajectory_windows,
)
from app.recipe.steps import Step
from app.status import Delivery, ErrorKind

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class JudgeConfig:
    model: str
    labels: LabelSet
    votes: int = 1
    temperature: float = 0.0
    context_tokens: int = 128_000
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_answer_tokens: int = 8192
    endpoint: EndpointOptions = field(default_factory=EndpointOptions)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 0
    reasoning_tokens: int = 0
    # The last `system_fingerprint` the server reported, if any.
    system_fingerprint: str | None = None

    def add(self, completion: Completion) -> None:
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.cached_tokens += completion.cached_tokens
        self.reasoning_tokens += completion.reasoning_tokens
        self.latency_s += completion.latency_s
        self.system_fingerprint = completion.system_fingerprint or self.system_fingerprint

    def merge(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.latency_s += other.latency_s
        self.attempts += other.attempts
        self.system_fingerprint = other.system_fingerprint or self.system_fingerprint

    def share(self, parts: int, position: int) -> Usage:
        """This usage split over `parts` steps (integer tokens; remainders go to the first)."""

        def cut(total: int) -> int:
            return total // parts + (1 if position < total % parts else 0)

        return Usage(
            cut(self.prompt_tokens),
            cut(self.completion_tokens),
            cut(self.cached_tokens),
            self.latency_s / parts,
            self.attempts,
            cut(self.reasoning_tokens),
            self.system_fingerprint,
        )


@dataclass
class StepOutcome:
    index: int
    label: str | None
    reason: str | None
    agreement: float | None
    vote_labels: list[str]
    usage: Usage
    error: str | None = None
    error_kind: ErrorKind | None = None
    delivery: Delivery = Delivery.ONLINE


def prompt_layout(config: JudgeConfig) -> dict[str, Any]:
    """How prompts are laid out for this critic: its labels and its token budget (the
    keyword arguments of `trajectory_windows` and `StepRequests`, online and in batches)."""
    return {
        "labels": config.labels,
        "context_tokens": config.context_tokens,
        "reserve_tokens": config.max_answer_tokens,
    }


def answer_tokens(request: CriticRequest, config: JudgeConfig) -> int:
    """The answer's token bound sent with `request`."""
    return min(request.max_completion_tokens, config.max_answer_tokens)


class JudgeFailedError(Exception):
    def __init__(self, message: str, kind: ErrorKind, usage: Usage) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage


@dataclass
class _Votes(Generic[T]):
    """The answers of k votes on one request (None where a vote failed), in vote order."""

    answers: list[T | None] = field(default_factory=list)
    errors: list[JudgeFailedError] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


def decide(
    index: int,
    judgments: Sequence[Judgment | None],
    usage: Usage,
    errors: Sequence[JudgeFailedError],
    position: int,
    parts: int,
) -> StepOutcome:
    """One step's outcome from its votes' judgments (None where a vote failed), in vote
    order: the majority label, ties to the lowest-numbered vote; `usage` (of every vote of the
    request) split over the `parts` steps the request asked about, this one at `position`."""
    usage = usage.share(parts, position)
    answered = [j for j in judgments if j is not None]
    if not answered:
        error = errors[0] if errors else None
        return StepOutcome(
            index,
            None,
            None,
            None,
            [],
            usage,
            error=str(error) if error else "the critic gave no verdict for this step",
            error_kind=error.kind if error else ErrorKind.MISSING,
        )
    counts = Counter(j.label for j in answered)
    best = max(counts.values())
    # Ties: the lowest-numbered vote among the tied labels wins (deterministic).
    winner = next(j for j in answered if counts[j.label] == best)
    return StepOutcome(
        index,
        winner.label,
        winner.reason,
        best / len(answered),
        [j.label for j in answered],
        usage,
    )


class Judge:
    def __init__(
        self,
        client: CriticClient,
        limiter: Limiter,
        config: JudgeConfig,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.config = config
        self._sleep = sleep
        self._rng = rng or random.Random()

    def _layout(self) -> dict[str, Any]:
        return prompt_layout(self.config)

    # ------------------------------------------------------------------ public

    async def judge_trajectory(
        self,
        messages: list[dict[str, Any]],
        steps: Sequence[Step],
        resolved: bool | None,
        targets: set[int],
    ) -> AsyncIterator[list[StepOutcome]]:
        """Outcomes for `targets`, one window of the trajectory at a time (usually one)."""
        windows = trajectory_windows(messages, list(steps), resolved, **self._layout())
        for window in windows:
            wanted = [i for i in window.target_indices if i in targets]
            if not wanted:
                continue

            def parse(text: str, request: CriticRequest = window) -> dict[int, Judgment]:
                return parse_trajectory_answer(
                    text, list(request.target_indices), self.config.labels
                )

            votes = await self._vote(window, parse)
            yield [
                self._decide(
                    index,
                    [answer.get(index) if answer else None for answer in votes.answers],
                    votes,
                    position,
                    len(window.target_indices),
                )
                for position, index in enumerate(wanted)
            ]

    async def judge_steps(
        self,
        messages: list[dict[str, Any]],
        steps: Sequence[Step],
        resolved: bool | None,
        targets: Sequence[int],
    ) -> AsyncIterator[StepOutcome]:
        """One outcome per target step, each from its own call(s), as they complete."""

        # One layout for all the steps: every request shares the trajectory's prefix.
        requests = StepRequests(messages, list(steps), resolved, **self._layout())

        async def one(index: int) -> StepOutcome:
            request = requests.request(index)

            def parse(text: str) -> Judgment:
                return parse_step_answer(text, index, self.config.labels)

            votes = await self._vote(request, parse)
            return self._decide(index, votes.answers, votes, 0, 1)

        pending = [asyncio.ensure_future(one(index)) for index in targets]
        try:
            for finished in asyncio.as_completed(pending):
                yield await finished
        finally:
            for task in pending:
                task.cancel()

    # ------------------------------------------------------------------ internals

    async def _vote(self, request: CriticRequest, parse: Callable[[str], T]) -> _Votes[T]:
        results = await asyncio.gather(
            *(self._ask(request, parse) for _ in range(self.config.votes)),
            return_exceptions=True,
        )
        votes: _Votes[T] = _Votes()
        for result in results:
            if isinstance(result, JudgeFailedError):
                votes.errors.append(result)
                votes.answers.append(None)
                votes.usage.merge(result.usage)
            elif isinstance(result, BaseException):
                raise result
            else:
                parsed, usage = result
                votes.answers.append(parsed)
                votes.usage.merge(usage)
        return votes

    def _decide(
        self,
        index: int,
        judgments: Sequence[Judgment | None],
        votes: _Votes[Any],
        position: int,
        parts: int,
    ) -> StepOutcome:
        return decide(index, judgments, votes.usage, votes.errors, position, parts)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + self._rng.uniform(0, 0.1 * retry_after + 0.05)
        ceiling = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        return self._rng.uniform(0, ceiling)

    async def _ask(self, request: CriticRequest, parse: Callable[[str], T]) -> tuple[T, Usage]:
        usage = Usage()
        messages = request.messages
        while True:
            usage.attempts += 1
            try:
                async with self.limiter.slot(request.approx_prompt_tokens):
                    completion = await self.client.complete(
                        model=self.config.model,
                        messages=messages,
                        temperature=self.config.temperature,
                        max_tokens=answer_tokens(request, self.config),
                        response_format=request.response_format,
                        options=self.config.endpoint,
                    )
            except CriticCallError as exc:
                if not exc.retryable or usage.attempts >= self.config.max_attempts:
                    raise JudgeFailedError(
                        f"{exc} (after {usage.attempts} attempts)", exc.kind, usage
                    ) from exc
                await self._sleep(self._backoff(usage.attempts, exc.retry_after))
                continue
            usage.add(completion)
            try:
                return parse(completion.text), usage
            except CriticAnswerError as exc:
                if usage.attempts >= self.config.max_attempts:
                    raise JudgeFailedError(
                        f"unparseable answer after {usage.attempts} attempts: {exc}",
                        ErrorKind.UNPARSEABLE,
                        usage,
                    ) from exc
                # Ask again in the same conversation, saying what was wrong.
                messages = reask_messages(request, completion.text, str(exc))
