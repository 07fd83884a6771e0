"""Asking the critic about steps: retries, re-asks, votes. Async; no database.

`Judge` turns critic requests (built by `app.critic.prompt`) into one outcome per step:

- transport failures that retrying can fix (429, 5xx, timeouts, lost connections) are retried
  with exponential backoff and full jitter, waiting at least what Retry-After asks;
- an answer that does not parse is re-asked in the same conversation, quoting the parse error;
- `votes: k` asks k times and keeps the majority label; ties go to the label of the
  lowest-numbered vote among them, so the outcome does not depend on which call returned first;
- a prompt the server refuses as longer than its context (a 400 that says so) re-plans the
  trajectory's windows with a smaller budget, from the server's own numbers when it gives them,
  and asks again (at most MAX_REPLANS times per trajectory in trajectory mode, per step in step
  mode), instead of failing the steps;
- when attempts run out the step's outcome carries the error instead of a label.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.critic.client import (
    Completion,
    ContextRefusal,
    CriticCallError,
    CriticClient,
    EndpointOptions,
)
from app.critic.labels import LabelSet
from app.critic.limits import Limiter
from app.critic.parse import (
    CriticAnswerError,
    Judgment,
    answer_part,
    parse_step_answer,
    parse_trajectory_answer,
)
from app.critic.prompt import (
    BUILT_IN,
    CriticRequest,
    PromptTemplates,
    PromptTooLargeError,
    StepRequests,
    TokenCounter,
    reask_messages,
    trajectory_windows,
)
from app.recipe.steps import Step
from app.status import Delivery, ErrorKind

log = logging.getLogger(__name__)
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

# Re-plans after a context refusal, and how the smaller budget is chosen: from the server's
# numbers (its context and its count of our prompt), with a margin; else this share of the old.
MAX_REPLANS = 3
REPLAN_MARGIN = 0.95
REPLAN_SHARE = 0.75


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
    # The job's own templates, prompt variant and few-shot examples.
    prompt: PromptTemplates = BUILT_IN
    # The critic model's tokenizer, to measure prompts with (else the estimate).
    count_tokens: TokenCounter | None = None


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


def prompt_layout(config: JudgeConfig, context_tokens: int | None = None) -> dict[str, Any]:
    """How prompts are laid out for this critic (the keyword arguments of
    `trajectory_windows` and `StepRequests`, online and in batches): its labels, its token
    budget (the configured one unless re-planning), its templates and its tokenizer."""
    return {
        "labels": config.labels,
        "context_tokens": context_tokens or config.context_tokens,
        "reserve_tokens": config.max_answer_tokens,
        "templates": config.prompt,
        "count_tokens": config.count_tokens,
    }


def answer_tokens(request: CriticRequest, config: JudgeConfig) -> int:
    """The answer's token bound sent with `request`."""
    return min(request.max_completion_tokens, config.max_answer_tokens)


class JudgeFailedError(Exception):
    def __init__(
        self,
        message: str,
        kind: ErrorKind,
        usage: Usage,
        refusal: ContextRefusal | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage
        self.refusal = refusal


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

    def _layout(self, context_tokens: int | None = None) -> dict[str, Any]:
        """`prompt_layout`, with a smaller token budget when re-planning."""
        return prompt_layout(self.config, context_tokens)

    # ------------------------------------------------------------------ public

    async def judge_trajectory(
        self,
        messages: list[dict[str, Any]],
        steps: Sequence[Step],
        resolved: bool | None,
        targets: set[int],
    ) -> AsyncIterator[list[StepOutcome]]:
        """Outcomes for `targets`, one window of the trajectory at a time (usually one).

        A window the server refuses as too long re-plans the windows of the targets not yet
        judged with a smaller budget; what the refused calls cost goes to the next outcomes.
        """
        budget = self.config.context_tokens
        windows = trajectory_windows(messages, list(steps), resolved, **self._layout())
        remaining = set(targets)
        carried = Usage()
        replans = 0
        while windows:
            plan, windows = windows, []
            for window in plan:
                wanted = [i for i in window.target_indices if i in remaining]
                if not wanted:
                    continue

                def parse(text: str, request: CriticRequest = window) -> dict[int, Judgment]:
                    return parse_trajectory_answer(
                        text, list(request.target_indices), self.config.labels
                    )

                votes = await self._vote(window, parse)
                refusal = _context_refusal(votes)
                if refusal is not None and replans < MAX_REPLANS:
                    replanned = self._replanned(messages, steps, resolved, budget, window, refusal)
                    if replanned is not None:
                        replans += 1
                        budget, windows = replanned
                        carried.merge(votes.usage)
                        break
                votes.usage.merge(carried)
                carried = Usage()
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
                remaining.difference_update(wanted)

    async def judge_steps(
        self,
        messages: list[dict[str, Any]],
        steps: Sequence[Step],
        resolved: bool | None,
        targets: Sequence[int],
    ) -> AsyncIterator[StepOutcome]:
        """One outcome per target step, each from its own call(s), as they complete."""

        # One layout for all the steps: every request shares the trajectory's prefix. A
        # context refusal replaces it with one of a smaller budget, for every step still to ask.
        plan = _StepPlan(
            self.config.context_tokens,
            StepRequests(messages, list(steps), resolved, **self._layout()),
        )

        def parse_for(index: int) -> Callable[[str], Judgment]:
            def parse(text: str) -> Judgment:
                return parse_step_answer(text, index, self.config.labels)

            return parse

        async def one(index: int) -> StepOutcome:
            nonlocal plan
            carried = Usage()
            for replans in itertools.count():
                asked = plan
                request = asked.requests.request(index)
                votes = await self._vote(request, parse_for(index))
                refusal = _context_refusal(votes)
                if refusal is None or replans >= MAX_REPLANS:
                    break
                if plan is asked:  # else another step re-planned meanwhile: ask with that
                    smaller = self._smaller_budget(asked.budget, request, refusal)
                    if smaller is None:
                        break
                    fresh = _StepPlan(
                        smaller,
                        StepRequests(messages, list(steps), resolved, **self._layout(smaller)),
                    )
                    try:
                        fresh.requests.request(index)
                    except PromptTooLargeError:
                        break
                    log.info(
                        "critic refused a step prompt of ~%d tokens as too long; re-planned "
                        "with a budget of %d tokens (was %d)",
                        request.approx_prompt_tokens,
                        smaller,
                        asked.budget,
                    )
                    plan = fresh
                carried.merge(votes.usage)
            votes.usage.merge(carried)
            return self._decide(index, votes.answers, votes, 0, 1)

        pending = [asyncio.ensure_future(one(index)) for index in targets]
        try:
            for finished in asyncio.as_completed(pending):
                yield await finished
        finally:
            for task in pending:
                task.cancel()

    # ------------------------------------------------------------------ internals

    def _replanned(
        self,
        messages: list[dict[str, Any]],
        steps: Sequence[Step],
        resolved: bool | None,
        budget: int,
        window: CriticRequest,
        refusal: ContextRefusal,
    ) -> tuple[int, list[CriticRequest]] | None:
        """A smaller budget and the trajectory's windows planned for it, after `window` was
        refused as too long; None when no smaller budget gives a plan."""
        smaller = self._smaller_budget(budget, window, refusal)
        if smaller is None:
            return None
        try:
            windows = trajectory_windows(messages, list(steps), resolved, **self._layout(smaller))
        except PromptTooLargeError:
            return None
        log.info(
            "critic refused a prompt of ~%d tokens as too long; re-planned the trajectory "
            "with a budget of %d tokens (was %d)",
            window.approx_prompt_tokens,
            smaller,
            budget,
        )
        return smaller, windows

    def _smaller_budget(
        self, budget: int, request: CriticRequest, refusal: ContextRefusal
    ) -> int | None:
        """The context budget to re-plan with after `request` was refused as too long, or
        None when no smaller budget leaves room for a prompt beside the answer's reserve.

        With the server's numbers, our measure of the prompt is scaled by how the server
        counted it, so the next prompts fit its context with REPLAN_MARGIN to spare; without
        them the budget shrinks by REPLAN_SHARE."""
        reserve = min(request.max_completion_tokens, self.config.max_answer_tokens)
        limit = refusal.context_tokens
        counted = refusal.prompt_tokens
        if counted is None and refusal.requested_tokens is not None:
            counted = refusal.requested_tokens - reserve
        smaller = math.floor(budget * REPLAN_SHARE)
        if limit is not None and counted is not None and counted > 0:
            room = (limit - reserve) * request.approx_prompt_tokens / counted
            smaller = min(reserve + math.floor(room * REPLAN_MARGIN), math.floor(budget * 0.95))
        elif limit is not None:
            smaller = min(smaller, limit)
        return smaller if smaller > reserve else None

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
                        f"{exc} (after {usage.attempts} attempts)",
                        exc.kind,
                        usage,
                        exc.refusal,
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
                # Ask again in the same conversation, saying what was wrong (quoting the
                # answer, not a reasoning model's thoughts before it).
                answer = answer_part(completion.text)
                quoted = completion.text if answer is None else answer
                messages = reask_messages(request, quoted, str(exc))


@dataclass(frozen=True)
class _StepPlan:
    """Step-mode requests of one trajectory laid out for one context budget."""

    budget: int
    requests: StepRequests


def _context_refusal(votes: _Votes[Any]) -> ContextRefusal | None:
    """What the server said, when every vote of a request was refused as too long."""
    if any(answer is not None for answer in votes.answers) or not votes.errors:
        return None
    refusals = [error.refusal for error in votes.errors]
    if any(error.kind != ErrorKind.CONTEXT_EXCEEDED for error in votes.errors):
        return None
    return next((r for r in refusals if r is not None), ContextRefusal())
