"""The rules critic as an OpenAI-compatible chat-completions server.

It answers prompts built by `app.critic.prompt`, in both modes, with the labels of
`app.critic.rules`; it is the stand-in the tests and benchmarks use, and a cheap baseline.

- `POST /v1/chat/completions`: a ChatCompletion with `usage` estimated by the prompt module's
  heuristic. `prompt_tokens_details.cached_tokens` simulates prefix caching at message
  granularity: the longest prefix of messages (with the response format) already seen in an
  earlier request counts as cached. `temperature > 0` flips a few labels, seeded by the request
  content and how many times that exact request was seen, so k votes give the same multiset of
  answers whatever order they arrive in. `n` choices and `max_tokens` / `max_completion_tokens`
  (cut answer, `finish_reason: "length"`) are honoured; `stream` is refused.
- `GET /v1/models`.
- `/v1/files` and `/v1/batches`: the Batch API, each line answered as above
  (`app.critic.rules_batches`; `batch_delay_s` and `batch_faults` in the fault plan).
- Fault injection, from the start (`faults=`) or at run time: `GET|POST|DELETE /admin/faults`.
- `GET /admin/stats`, `POST /admin/stats/reset`.
- `GET /admin/requests`: the messages of the last requests it answered (newest last), so a
  test can check exactly what a critic was sent.

When an API key is configured every endpoint, admin included, wants `Authorization: Bearer
<key>`, and answers 401 with an OpenAI-style error otherwise.

Fault plan (JSON; unknown fields are rejected):

    {"latency_ms": 200,                       optional: replaces the current latency
     "faults": [
       {"kind": "429", "every": 3, "retry_after": 1},
       {"kind": "500", "count": 2},
       {"kind": "hang", "seconds": 30, "count": 1},
       {"kind": "malformed", "rate": 0.2, "seed": 1},
       {"kind": "truncated", "after": 10, "count": 1},
       {"kind": "wrong_count", "every": 5}]}

A rule fires on every request it sees, or on every `every`-th one, or at random with
probability `rate` (a generator seeded with `seed`, so runs repeat); `after` lets the first N
requests it sees pass; `count` caps how many times it fires in all. Rules are tried in order
and the first that fires applies; later rules do not see that request (their counters stay).
Kinds: `429` (Retry-After and retry-after-ms headers, `retry_after` seconds, default 1), `500`,
`hang` (sleeps `seconds`, default 30, or until the client goes away, then answers normally),
`malformed` (the answer written as a Python literal after a line of prose: not JSON),
`truncated` (the JSON answer cut in half, `finish_reason: "length"`), `wrong_count`
(trajectory mode: the last asked step is left out; step mode: the answer names the next step).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Self, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send

from app.critic import rules
from app.critic.prompt import CHARS_PER_TOKEN, estimate_prompt_tokens, estimate_tokens
from app.critic.rules_batches import BatchFault, BatchLimits, mount_batches
from app.status import JobMode

log = logging.getLogger(__name__)

FaultKind = Literal["429", "500", "hang", "malformed", "truncated", "wrong_count"]
BatchFaultKind = Literal["validation_failed", "partial_failure", "expired", "stuck"]
FAULT_KINDS: tuple[str, ...] = ("429", "500", "hang", "malformed", "truncated", "wrong_count")
BATCH_FAULT_KINDS: tuple[str, ...] = ("validation_failed", "partial_failure", "expired", "stuck")
MODEL_ID = "rules"
# A label flips with this probability per unit of temperature (capped at 1/2): enough for
# votes to disagree now and then, while the majority stays with the rules.
FLIP_PER_TEMPERATURE = 0.15
# Bounds for the memories kept per server (LRU): seen prefixes, read-back prompts, counters.
_MEMORY = 65_536
_PARSED_MEMORY = 256
# Requests whose messages `GET /admin/requests` shows.
_RECENT_REQUESTS = 64
_DISCONNECT_POLL_S = 0.05


class FaultTrigger(BaseModel):
    """When a fault rule fires (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    every: int | None = Field(default=None, ge=1)
    rate: float | None = Field(default=None, ge=0, le=1)
    seed: int = 0
    after: int = Field(default=0, ge=0)
    count: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_trigger(self) -> Self:
        if self.every is not None and self.rate is not None:
            raise ValueError("give either `every` or `rate`, not both")
        return self


class FaultRule(FaultTrigger):
    kind: FaultKind
    retry_after: float = Field(default=1.0, ge=0)
    seconds: float = Field(default=30.0, ge=0)

    @field_validator("kind", mode="before")
    @classmethod
    def _status_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value  # {"kind": 429} reads naturally


class BatchFaultRule(FaultTrigger):
    """A fault of a whole batch, tried when the batch is created (`app.critic.rules_batches`)."""

    kind: BatchFaultKind
    # partial_failure: every `line_every`-th line fails with a 500; expired: the last
    # 1/`line_every` of the lines are left unanswered.
    line_every: int = Field(default=2, ge=1)
    # stuck: polls answered `in_progress` before the batch runs (None: until the plan no
    # longer holds this rule).
    polls: int | None = Field(default=None, ge=0)


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    faults: list[FaultRule] = Field(default_factory=list)
    latency_ms: int | None = Field(default=None, ge=0)
    batch_faults: list[BatchFaultRule] = Field(default_factory=list)
    batch_delay_s: float | None = Field(default=None, ge=0)


RuleT = TypeVar("RuleT", bound=FaultTrigger)


@dataclass
class _ArmedFault(Generic[RuleT]):
    """A rule with its counters: requests seen, times fired, its random stream."""

    rule: RuleT
    seen: int = 0
    fired: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.rule.seed)

    def fires(self) -> bool:
        self.seen += 1
        rule = self.rule
        if self.seen <= rule.after or (rule.count is not None and self.fired >= rule.count):
            return False
        if rule.every is not None:
            hit = (self.seen - rule.after) % rule.every == 0
        elif rule.rate is not None:
            hit = self.rng.random() < rule.rate
        else:
            hit = True
        self.fired += hit
        return hit

    def describe(self) -> dict[str, Any]:
        return {**self.rule.model_dump(exclude_none=True), "seen": self.seen, "fired": self.fired}


@dataclass
class Stats:
    requests: int = 0
    completions: int = 0
    unauthorized: int = 0
    bad_requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    steps_answered: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    # files_uploaded, batches_created, batches_cancelled, batch_lines_answered
    batches: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "completions": self.completions,
            "unauthorized": self.unauthorized,
            "bad_requests": self.bad_requests,
            "faults": {kind: self.faults[kind] for kind in (*FAULT_KINDS, *BATCH_FAULT_KINDS)},
            "by_mode": {mode: self.by_mode[mode] for mode in JobMode},
            "steps_answered": self.steps_answered,
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "cached": self.cached_tokens,
            },
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "batches": {name: self.batches[name] for name in BATCH_COUNTS},
        }


BATCH_COUNTS = ("files_uploaded", "batches_created", "batches_cancelled", "batch_lines_answered")


class _Memory(OrderedDict[str, Any]):
    """A small LRU map: old entries go first once `limit` is reached."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class RequestError(Exception):
    """A request we answer with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {
            "error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _message_digests(messages: Sequence[Any], response_format: Any) -> list[str]:
    """Chained digests: entry k identifies messages[:k+1] together with the response format.

    The content string is hashed as it is (cheap for long trajectories); the other fields of a
    message are small and hashed as canonical JSON.
    """
    chain = hashlib.sha256(json.dumps(response_format, sort_keys=True).encode()).digest()
    digests: list[str] = []
    for message in messages:
        step = hashlib.sha256(chain)
        if isinstance(message, dict):
            content = message.get("content")
            rest = {k: v for k, v in message.items() if k != "content"}
            step.update(json.dumps(rest, sort_keys=True).encode())
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            step.update(b"\x00" + text.encode("utf-8", "surrogatepass"))
        else:
            step.update(json.dumps(message).encode())
        chain = step.digest()
        digests.append(chain.hex())
    return digests


@dataclass(frozen=True)
class _Answer:
    content: str
    finish_reason: str
    steps: int


class RulesCritic:
    """The server's state and behaviour, apart from HTTP plumbing."""

    def __init__(
        self, latency_ms: int, plan: FaultPlan, api_key: str | None, batch_delay_s: float = 0.0
    ) -> None:
        self.latency_ms = plan.latency_ms if plan.latency_ms is not None else latency_ms
        self.batch_delay_s = plan.batch_delay_s if plan.batch_delay_s is not None else batch_delay_s
        self.api_key = api_key
        self.faults = [_ArmedFault(rule) for rule in plan.faults]
        self.batch_faults = [_ArmedFault(rule) for rule in plan.batch_faults]
        self.stats = Stats()
        self._seen_prefixes = _Memory(_MEMORY)  # digest -> prompt tokens of that prefix
        self._request_counts = _Memory(_MEMORY)  # full-request digest -> times seen
        self._prefixes = _Memory(_PARSED_MEMORY)  # prefix digest -> (PromptPrefix, verdicts)
        self.recent: deque[list[Any]] = deque(maxlen=_RECENT_REQUESTS)

    # -- configuration

    def set_plan(self, plan: FaultPlan) -> None:
        self.faults = [_ArmedFault(rule) for rule in plan.faults]
        self.batch_faults = [_ArmedFault(rule) for rule in plan.batch_faults]
        if plan.latency_ms is not None:
            self.latency_ms = plan.latency_ms
        if plan.batch_delay_s is not None:
            self.batch_delay_s = plan.batch_delay_s

    def plan(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency_ms,
            "faults": [f.describe() for f in self.faults],
            "batch_delay_s": self.batch_delay_s,
            "batch_faults": [f.describe() for f in self.batch_faults],
        }

    def authorised(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def pick_batch_fault(self) -> BatchFaultRule | None:
        for armed in self.batch_faults:
            if armed.fires():
                self.stats.faults[armed.rule.kind] += 1
                return armed.rule
        return None

    def holds_batch_fault(self, fault: BatchFault) -> bool:
        return any(armed.rule is fault for armed in self.batch_faults)

    def count_batch(self, name: str, count: int = 1) -> None:
        self.stats.batches[name] += count

    def answer_line(self, body: Any) -> tuple[int, dict[str, Any]]:
        """A batch line's answer: what `/v1/chat/completions` answers for its body."""
        try:
            return 200, self.complete(_validated(body), None)
        except RequestError as exc:
            if exc.status == 400:
                self.stats.bad_requests += 1
            return exc.status, json.loads(bytes(exc.response().body))

    def pick_fault(self) -> FaultRule | None:
        for armed in self.faults:
            if armed.fires():
                self.stats.faults[armed.rule.kind] += 1
                return armed.rule
        return None

    # -- answering

    def complete(self, body: dict[str, Any], fault: FaultRule | None) -> dict[str, Any]:
        """A ChatCompletion for a validated body (see `_validated`)."""
        messages: list[Any] = body["messages"]
        self.recent.append(messages)
        digests = _message_digests(messages, body.get("response_format"))
        parsed, verdicts = self._read(messages, digests)
        prompt_tokens = estimate_prompt_tokens(messages, body.get("response_format"))
        cached = self._cached_tokens(messages, digests, body.get("response_format"))
        temperature = float(body.get("temperature") or 0.0)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        choices = []
        completion_tokens = 0
        for number in range(int(body.get("n") or 1)):
            seed = f"{digests[-1]}:{self._next_count(digests[-1])}"
            answer = _answer(parsed, verdicts, temperature, seed, fault, limit)
            completion_tokens += estimate_tokens(answer.content)
            choices.append(
                {
                    "index": number,
                    "message": {"role": "assistant", "content": answer.content, "refusal": None},
                    "finish_reason": answer.finish_reason,
                    "logprobs": None,
                }
            )
            self.stats.steps_answered += answer.steps
        self.stats.completions += 1
        self.stats.by_mode[parsed.mode] += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cached_tokens += cached
        return {
            "id": f"chatcmpl-rules-{self.stats.completions}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "system_fingerprint": "srft-rules",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def _read(
        self, messages: list[Any], digests: list[str]
    ) -> tuple[rules.ParsedPrompt, list[rules.RuleVerdict]]:
        """The prompt read back and the rules applied to it; prefixes are read once, since
        every step request of a trajectory repeats the same long prefix."""
        try:
            key = digests[1] if len(digests) > 1 else digests[0]
            cached = self._prefixes.get(key)
            if cached is None:
                prefix = rules.read_prefix(messages)
                cached = (prefix, rules.judge_steps(prefix.steps, prefix.label_names))
            self._prefixes.remember(key, cached)
            prefix, judged = cached
            parsed = rules.parse_question(messages, prefix)
            return parsed, rules.answer_prompt(parsed, judged)
        except rules.PromptFormatError as exc:
            raise RequestError(
                400, f"the rules critic answers only prompts built by app.critic.prompt: {exc}"
            ) from exc

    def _cached_tokens(self, messages: list[Any], digests: list[str], response_format: Any) -> int:
        cached = 0
        for length in range(len(digests), 0, -1):
            if digests[length - 1] in self._seen_prefixes:
                cached = int(self._seen_prefixes[digests[length - 1]])
                break
        for length, digest in enumerate(digests, start=1):
            if digest not in self._seen_prefixes:
                tokens = estimate_prompt_tokens(messages[:length], response_format)
                self._seen_prefixes.remember(digest, tokens)
        return cached

    def _next_count(self, digest: str) -> int:
        count = int(self._request_counts.get(digest, 0))
        self._request_counts.remember(digest, count + 1)
        return count


def _answer(
    parsed: rules.ParsedPrompt,
    verdicts: list[rules.RuleVerdict],
    temperature: float,
    seed: str,
    fault: FaultRule | None,
    limit: Any,
) -> _Answer:
    entries = _sampled(verdicts, parsed.label_names, temperature, seed)
    kind = fault.kind if fault is not None else None
    if kind == "wrong_count":
        if parsed.mode == JobMode.TRAJECTORY:
            entries = entries[:-1]
        else:
            entries = [{**entries[0], "index": entries[0]["index"] + 1}]
    value: Any = {"steps": entries} if parsed.mode == JobMode.TRAJECTORY else entries[0]
    content = json.dumps(value)
    finish = "stop"
    if kind == "malformed":
        content = f"Here are my labels:\n{value!r}"
    elif kind == "truncated":
        content, finish = content[: len(content) // 2], "length"
    if isinstance(limit, int) and limit > 0 and estimate_tokens(content) > limit:
        content, finish = content[: math.floor(limit * CHARS_PER_TOKEN)], "length"
    return _Answer(content, finish, len(entries))


def _sampled(
    verdicts: list[rules.RuleVerdict], names: Sequence[str], temperature: float, seed: str
) -> list[dict[str, Any]]:
    """The verdicts as answer entries; at temperature > 0 a few labels flip, reproducibly."""
    flip = min(0.5, FLIP_PER_TEMPERATURE * temperature) if len(names) > 1 else 0.0
    rng = random.Random(seed)
    entries = []
    for verdict in verdicts:
        label, reason = verdict.label, verdict.reason
        if flip and rng.random() < flip:
            label = rng.choice([n for n in names if n != verdict.label])
            reason = f"Sampled at temperature {temperature:g}: {verdict.label} became {label}."
        entries.append({"index": verdict.index, "label": label, "reason": reason})
    return entries


def _validated(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "`messages` must be a non-empty list")
    if body.get("stream"):
        raise RequestError(400, "the rules critic does not stream; send stream: false")
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise RequestError(400, "`n` must be an integer from 1 to 16")
    temperature = 0 if body.get("temperature") is None else body["temperature"]
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise RequestError(400, "`temperature` must be a number from 0 to 2")
    if not 0 <= temperature <= 2:
        raise RequestError(400, "`temperature` must be a number from 0 to 2")
    return body


def _normalised_plan(
    faults: FaultPlan | Mapping[str, Any] | Sequence[Any] | str | None,
) -> FaultPlan:
    if faults is None:
        return FaultPlan()
    if isinstance(faults, FaultPlan):
        return faults
    if isinstance(faults, str):
        return FaultPlan.model_validate_json(faults)
    if isinstance(faults, Mapping):
        return FaultPlan.model_validate(dict(faults))
    return FaultPlan.model_validate({"faults": list(faults)})


async def _sleep_unless_gone(request: Request, seconds: float) -> None:
    """Sleep, but stop early once the client has hung up: a hung request holds nothing then."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, _DISCONNECT_POLL_S))
        if await request.is_disconnected():
            return


def _plan_error(exc: ValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'plan'}: {e['msg']}" for e in exc.errors()
    )
    return RequestError(
        422, f"invalid fault plan: {problems}", code="invalid_fault_plan"
    ).response()


class _RequireKey:
    """Plain ASGI middleware: a wrapping `BaseHTTPMiddleware` would hide client disconnects
    from the handlers, and a hang fault must notice them."""

    def __init__(self, app: ASGIApp, critic: RulesCritic) -> None:
        self.app = app
        self.critic = critic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.critic.authorised(header):
                self.critic.stats.unauthorized += 1
                error = RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_rules_app(
    latency_ms: int = 0,
    faults: FaultPlan | Mapping[str, Any] | Sequence[Any] | str | None = None,
    api_key: str | None = None,
    *,
    batch_delay_s: float = 0.0,
    batch_limits: BatchLimits | None = None,
) -> FastAPI:
    """The rules critic app. `faults`: a fault plan (model, mapping, list of rules or JSON).
    `batch_delay_s` and `batch_limits`: its Files and Batches API (`app.critic.rules_batches`)."""
    critic = RulesCritic(latency_ms, _normalised_plan(faults), api_key, batch_delay_s)
    log.warning(
        "the rules critic labels steps with heuristics (failing output, exact repeats, "
        "recoveries), not with an LLM"
    )
    app = FastAPI(title="srft rules critic", docs_url=None, redoc_url=None)
    app.state.critic = critic

    app.add_middleware(_RequireKey, critic=critic)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        """Answer a critic prompt with the rules' labels."""
        critic.stats.requests += 1
        critic.stats.in_flight += 1
        critic.stats.max_in_flight = max(critic.stats.max_in_flight, critic.stats.in_flight)
        try:
            return await _chat_completion(critic, request)
        except RequestError as exc:
            if exc.status == 400:
                critic.stats.bad_requests += 1
            return exc.response()
        finally:
            critic.stats.in_flight -= 1

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The one model this server offers (any model name is accepted)."""
        return {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "srft"}],
        }

    @app.get("/admin/faults")
    async def get_faults() -> dict[str, Any]:
        """The fault plan in force, with each rule's counters."""
        return critic.plan()

    @app.post("/admin/faults")
    async def set_faults(request: Request) -> JSONResponse:
        """Replace the fault plan."""
        try:
            plan = FaultPlan.model_validate_json(await request.body())
        except ValidationError as exc:
            return _plan_error(exc)
        critic.set_plan(plan)
        return JSONResponse(critic.plan())

    @app.delete("/admin/faults")
    async def clear_faults() -> dict[str, Any]:
        """Remove every fault (latency stays)."""
        critic.set_plan(FaultPlan())
        return critic.plan()

    @app.get("/admin/stats")
    async def get_stats() -> dict[str, Any]:
        """Counts of requests, faults, modes and tokens since start or the last reset."""
        return critic.stats.as_dict()

    @app.get("/admin/requests")
    async def get_requests() -> dict[str, Any]:
        """The messages of the last requests answered, oldest first."""
        return {"requests": [{"messages": messages} for messages in critic.recent]}

    @app.post("/admin/stats/reset")
    async def reset_stats() -> dict[str, Any]:
        """Zero the counts (requests in flight stay counted as in flight)."""
        in_flight = critic.stats.in_flight
        critic.stats = Stats(in_flight=in_flight, max_in_flight=in_flight)
        return critic.stats.as_dict()

    mount_batches(app, critic, batch_limits or BatchLimits())
    return app


async def _chat_completion(critic: RulesCritic, request: Request) -> JSONResponse:
    try:
        body = _validated(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc
    fault = critic.pick_fault()
    if fault is not None and fault.kind == "429":
        seconds = fault.retry_after
        raise RequestError(
            429,
            f"Rate limit reached for requests (injected fault). Try again in {seconds:g}s.",
            kind="requests",
            code="rate_limit_exceeded",
            headers={
                "retry-after": str(math.ceil(seconds)),
                "retry-after-ms": str(round(seconds * 1000)),
            },
        )
    if fault is not None and fault.kind == "500":
        raise RequestError(
            500,
            "The server had an error processing your request (injected fault).",
            kind="server_error",
        )
    if fault is not None and fault.kind == "hang":
        await _sleep_unless_gone(request, fault.seconds)
    if critic.latency_ms:
        await asyncio.sleep(critic.latency_ms / 1000)
    return JSONResponse(critic.complete(body, fault))


def serve_rules(
    host: str = "127.0.0.1",
    port: int = 8088,
    latency_ms: int = 0,
    faults_json: str | None = None,
    api_key: str | None = None,
    *,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Run the rules critic until interrupted (blocking). Raises ValueError on a bad plan."""
    try:
        plan = _normalised_plan(faults_json)
    except ValidationError as exc:
        raise ValueError(f"invalid fault plan: {exc}") from exc
    app = create_rules_app(latency_ms=latency_ms, faults=plan, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)


def start_rules_server_thread(latency_ms: int = 0, host: str = "127.0.0.1") -> int:
    """Serve the rules critic from a daemon thread of this process; return its port.

    Used when no SRFT_CRITIC_BASE_URL is configured, so the embedded default labels out of
    the box. The port is chosen by the OS, then handed to uvicorn as an open socket.
    """
    import socket
    import threading
    import time

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(
        create_rules_app(latency_ms=latency_ms), log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread, which is what we want.
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="srft-rules-critic", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    return port
