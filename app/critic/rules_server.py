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
- `GET /admin/requests`: the messages of the last requests it answered (newest last), with the
  body's other fields (`fields`: model, temperature, max_tokens, seed, response_format, ...),
  so a test can check exactly what a critic was sent.

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

Serving-stack variants: the server behaves like one kind of server, chosen at start
(`variants=` / `srft critic serve-rules --variant NAME`, repeatable) or per request by a
`rules_variant` field in the body (a name or a list of names, added to those of the start; a
job sends it with `critic.extra_body`, as it would send any server-specific knob). Several may
be combined. Every answer carries `system_fingerprint` and `completion_tokens_details.
reasoning_tokens`.

- `reasoning_content` / `reasoning`: a reasoning parser's answer (vLLM, SGLang, DeepSeek): the
  thoughts in `message.reasoning_content` (or `message.reasoning`), the answer in `content`;
- `think_tags`: a reasoning model without a parser (Qwen3, R1): `<think>thoughts</think>`
  then the answer, all in `content`; `think_open`: the chat template opened `<think>` in the
  prompt, so `content` is the thoughts, a lone `</think>`, then the answer. The thoughts of all
  four hold a decoy verdict (the JSON form of the answer with every label wrong, at most
  DECOY_STEPS entries of it), and count as reasoning tokens; `max_tokens` cuts thoughts and
  answer together, so a small one leaves a thought block that never closes;
- `no_response_format`: refuses a `response_format` of type `json_schema` with the 400 of a
  vLLM that does not know it (a validation error naming `response_format`);
- `json_schema`: enforces a `json_schema` response format as constrained decoding does: a
  malformed schema is a 400, and the answer is the bare JSON, checked against the schema
  (never the `malformed` fault's prose);
- `max_completion_tokens`: refuses `max_tokens` as OpenAI's reasoning models do (400,
  `unsupported_parameter`: use `max_completion_tokens`);
- `context_vllm`, `context_sglang`, `context_openai`: a context of `context_tokens` tokens
  (start option, or `rules_context_tokens` in the body; default RULES_CONTEXT_TOKENS), counted
  by the server's own tokenizer-like count (words and punctuation marks, not characters / 3.5),
  refusing a longer prompt plus its `max_tokens` with that server's 400 wording.

Refusals are counted in `GET /admin/stats` under `refused` (by the field refused).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import random
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
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

VARIANTS: tuple[str, ...] = (
    "reasoning_content",
    "reasoning",
    "think_tags",
    "think_open",
    "no_response_format",
    "json_schema",
    "max_completion_tokens",
    "context_vllm",
    "context_sglang",
    "context_openai",
)
_REASONING_VARIANTS = ("reasoning_content", "reasoning", "think_tags", "think_open")
_CONTEXT_VARIANTS = ("context_vllm", "context_sglang", "context_openai")
RULES_CONTEXT_TOKENS = 8192
DECOY_STEPS = 8
# The server's own count: a token per word and per punctuation mark, as a tokenizer of code
# and logs roughly does (heavier than characters / 3.5 on such text).
_SERVER_TOKEN = re.compile(r"\w+|[^\w\s]")
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
    reasoning_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    refused: Counter[str] = field(default_factory=Counter)
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
                "reasoning": self.reasoning_tokens,
            },
            "refused": dict(self.refused),
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


# Verdicts from elsewhere than the rules (`bench/recipe_critics.py`: true labels): given the
# request's model, its messages and its prompt's prefix read back, a verdict for every shown
# step, or None to let the rules judge.
VerdictSource = Callable[
    [str, Sequence[Any], rules.PromptPrefix], Sequence[rules.RuleVerdict] | None
]


@dataclass(frozen=True)
class _Answer:
    content: str
    finish_reason: str
    steps: int


class RulesCritic:
    """The server's state and behaviour, apart from HTTP plumbing."""

    def __init__(
        self,
        latency_ms: int,
        plan: FaultPlan,
        api_key: str | None,
        variants: frozenset[str] = frozenset(),
        context_tokens: int | None = None,
        batch_delay_s: float = 0.0,
        verdict_source: VerdictSource | None = None,
    ) -> None:
        self.verdict_source = verdict_source
        self.latency_ms = plan.latency_ms if plan.latency_ms is not None else latency_ms
        self.batch_delay_s = plan.batch_delay_s if plan.batch_delay_s is not None else batch_delay_s
        self.api_key = api_key
        self.variants = variants
        self.context_tokens = context_tokens
        self.faults = [_ArmedFault(rule) for rule in plan.faults]
        self.batch_faults = [_ArmedFault(rule) for rule in plan.batch_faults]
        self.stats = Stats()
        self._seen_prefixes = _Memory(_MEMORY)  # digest -> prompt tokens of that prefix
        self._request_counts = _Memory(_MEMORY)  # full-request digest -> times seen
        self._prefixes = _Memory(_PARSED_MEMORY)  # prefix digest -> (PromptPrefix, verdicts)
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT_REQUESTS)

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
        """A batch line's answer: what `/v1/chat/completions` answers for its body (the same
        variants and refusals; the chat endpoint's fault plan does not apply to lines)."""
        try:
            validated = _validated(body)
            variants = self.variants_of(validated)
            self.refuse(validated, variants)
            return 200, self.complete(validated, None, variants)
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

    def variants_of(self, body: dict[str, Any]) -> frozenset[str]:
        """The variants that apply to a request: those of the start and of its body."""
        asked = body.get("rules_variant")
        names = [asked] if isinstance(asked, str) else asked
        if names is None:
            return self.variants
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError(400, "`rules_variant` must be a variant name or a list of them")
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown:
            raise RequestError(
                400,
                f"unknown rules_variant {', '.join(unknown)}; known: {', '.join(VARIANTS)}",
            )
        return self.variants | frozenset(names)

    def refuse(self, body: dict[str, Any], variants: frozenset[str]) -> None:
        """Raise the 400 the emulated server would answer for this body, if any."""
        response_format = body.get("response_format")
        is_schema = (
            isinstance(response_format, dict) and response_format.get("type") == "json_schema"
        )
        if "no_response_format" in variants and is_schema:
            self.stats.refused["response_format"] += 1
            raise RequestError(
                400,
                "1 validation error for ChatCompletionRequest\nresponse_format.type\n  Input "
                "should be 'text' or 'json_object' [type=literal_error, "
                "input_value='json_schema', input_type=str]",
                kind="BadRequestError",
            )
        if "json_schema" in variants and is_schema:
            assert isinstance(response_format, dict)
            spec = response_format.get("json_schema")
            if not (
                isinstance(spec, dict)
                and isinstance(spec.get("name"), str)
                and isinstance(spec.get("schema"), dict)
            ):
                self.stats.refused["response_format"] += 1
                raise RequestError(
                    400,
                    "Invalid schema for response_format: `json_schema` must be an object with "
                    "a `name` and a `schema`.",
                    code="invalid_json_schema",
                )
        if "max_completion_tokens" in variants and body.get("max_tokens") is not None:
            self.stats.refused["max_tokens"] += 1
            raise RequestError(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                "'max_completion_tokens' instead.",
                code="unsupported_parameter",
            )
        styles = [v for v in _CONTEXT_VARIANTS if v in variants]
        if styles:
            self._refuse_long(body, styles[0])

    def _refuse_long(self, body: dict[str, Any], style: str) -> None:
        limit = body.get("rules_context_tokens", self.context_tokens or RULES_CONTEXT_TOKENS)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise RequestError(400, "`rules_context_tokens` must be a positive integer")
        prompt = server_prompt_tokens(body["messages"])
        answer = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        answer = answer if isinstance(answer, int) else 0
        requested = prompt + answer
        if requested <= limit:
            return
        self.stats.refused["context_length"] += 1
        if style == "context_sglang":
            if prompt >= limit:
                message = (
                    f"The input ({prompt} tokens) is longer than the model's context length "
                    f"({limit} tokens)."
                )
            else:
                message = (
                    f"Requested token count exceeds the model's maximum context length of "
                    f"{limit} tokens. You requested a total of {requested} tokens: {prompt} "
                    f"tokens from the input messages and {answer} tokens for the completion. "
                    "Please reduce the number of tokens in the input messages or the "
                    "completion to fit within the limit."
                )
            raise RequestError(400, message, kind="BadRequestError")
        if style == "context_openai":
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {requested} tokens ({prompt} in the messages, {answer} in the "
                "completion). Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
            )
        raise RequestError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{requested} tokens ({prompt} in the messages, {answer} in the completion). "
            "Please reduce the length of the messages or completion.",
            kind="BadRequestError",
        )

    def complete(
        self,
        body: dict[str, Any],
        fault: FaultRule | None,
        variants: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """A ChatCompletion for a validated body (see `_validated`)."""
        messages: list[Any] = body["messages"]
        self.recent.append(
            {"messages": messages, "fields": {k: v for k, v in body.items() if k != "messages"}}
        )
        digests = _message_digests(messages, body.get("response_format"))
        parsed, verdicts = self._read(messages, digests, str(body.get("model") or ""))
        prompt_tokens = estimate_prompt_tokens(messages, body.get("response_format"))
        cached = self._cached_tokens(messages, digests, body.get("response_format"))
        temperature = float(body.get("temperature") or 0.0)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        schema = _enforced_schema(body, variants)
        choices = []
        completion_tokens = reasoning_tokens = 0
        order = _answer_order(body.get("response_format"))
        for number in range(int(body.get("n") or 1)):
            seed = f"{digests[-1]}:{self._next_count(digests[-1])}"
            answer = _answer(parsed, verdicts, temperature, seed, fault, limit, order, schema)
            message, thought_tokens = _reasoned(answer, parsed, verdicts, variants, limit)
            completion_tokens += estimate_tokens(answer.content) + thought_tokens
            reasoning_tokens += thought_tokens
            choices.append(
                {
                    "index": number,
                    "message": message,
                    "finish_reason": "length"
                    if message.pop("_cut", False)
                    else answer.finish_reason,
                    "logprobs": None,
                }
            )
            self.stats.steps_answered += answer.steps
        self.stats.completions += 1
        self.stats.by_mode[parsed.mode] += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cached_tokens += cached
        self.stats.reasoning_tokens += reasoning_tokens
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
                "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
            },
        }

    def _read(
        self, messages: list[Any], digests: list[str], model: str = ""
    ) -> tuple[rules.ParsedPrompt, list[rules.RuleVerdict]]:
        """The prompt read back and the rules applied to it; prefixes are read once, since
        every step request of a trajectory repeats the same long prefix."""
        try:
            key = digests[1] if len(digests) > 1 else digests[0]
            if self.verdict_source is not None:
                key = f"{model}:{key}"
            cached = self._prefixes.get(key)
            if cached is None:
                prefix = rules.read_prefix(messages)
                found = None
                if self.verdict_source is not None:
                    found = self.verdict_source(model, messages, prefix)
                judged = (
                    list(found)
                    if found is not None
                    else rules.judge_steps(prefix.steps, prefix.label_names)
                )
                cached = (prefix, judged)
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
    order: Sequence[str] = (),
    schema: dict[str, Any] | None = None,
) -> _Answer:
    entries = _sampled(verdicts, parsed.label_names, temperature, seed)
    if order:
        entries = [{key: entry[key] for key in order} for entry in entries]
    kind = fault.kind if fault is not None else None
    if kind == "wrong_count":
        if parsed.mode == JobMode.TRAJECTORY:
            entries = entries[:-1]
        else:
            entries = [{**entries[0], "index": entries[0]["index"] + 1}]
    value: Any = {"steps": entries} if parsed.mode == JobMode.TRAJECTORY else entries[0]
    content = json.dumps(value)
    finish = "stop"
    if schema is not None:
        # Constrained decoding: the answer is the schema's JSON, whatever else would happen.
        problem = schema_violation(value, schema)
        if problem is not None:
            raise RequestError(500, f"the answer does not fit the requested schema: {problem}")
        kind = None if kind == "malformed" else kind
    if kind == "malformed":
        content = f"Here are my labels:\n{value!r}"
    elif kind == "truncated":
        content, finish = content[: len(content) // 2], "length"
    if isinstance(limit, int) and limit > 0 and estimate_tokens(content) > limit:
        content, finish = content[: math.floor(limit * CHARS_PER_TOKEN)], "length"
    return _Answer(content, finish, len(entries))


def _answer_order(response_format: Any) -> tuple[str, ...]:
    """The order of an answer entry's fields that the request's JSON schema gives (the
    reason_first variant puts the reason before the label); () for none or another schema."""
    try:
        schema = response_format["json_schema"]["schema"]
        if "steps" in schema["properties"]:
            schema = schema["properties"]["steps"]["items"]
        keys = tuple(schema["properties"])
    except (KeyError, TypeError):
        return ()
    return keys if sorted(keys) == ["index", "label", "reason"] else ()


def server_prompt_tokens(messages: Sequence[Any]) -> int:
    """A prompt's length as the context variants count it (see `_SERVER_TOKEN`)."""
    total = 3
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        text = content if isinstance(content, str) else json.dumps(content)
        total += 4 + len(_SERVER_TOKEN.findall(text))
    return total


def _enforced_schema(body: dict[str, Any], variants: frozenset[str]) -> dict[str, Any] | None:
    response_format = body.get("response_format")
    if "json_schema" not in variants or not isinstance(response_format, dict):
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def schema_violation(value: Any, schema: dict[str, Any], where: str = "answer") -> str | None:
    """What in `value` breaks `schema`, for the JSON Schema subset structured outputs use
    (type, properties, required, additionalProperties: false, items, enum); None if nothing."""
    kinds: dict[str, type | tuple[type, ...]] = {
        "object": dict,
        "array": list,
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    expected = schema.get("type")
    if isinstance(expected, str) and expected in kinds:
        wrong_bool = expected in ("integer", "number") and isinstance(value, bool)
        if wrong_bool or not isinstance(value, kinds[expected]):
            return f"{where} is not of type {expected}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} is not one of {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in value:
                return f"{where}.{name} is missing"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                return f"{where} has properties the schema does not allow: {', '.join(extra)}"
        for name, item in value.items():
            if name in properties:
                problem = schema_violation(item, properties[name], f"{where}.{name}")
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for number, item in enumerate(value):
            problem = schema_violation(item, schema["items"], f"{where}[{number}]")
            if problem:
                return problem
    return None


def _reasoned(
    answer: _Answer,
    parsed: rules.ParsedPrompt,
    verdicts: list[rules.RuleVerdict],
    variants: frozenset[str],
    limit: Any,
) -> tuple[dict[str, Any], int]:
    """The answer's message as the emulated server writes it, and its reasoning tokens (see
    the module docstring). The key `_cut` marks an answer cut at `limit` here."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
    style = next((v for v in _REASONING_VARIANTS if v in variants), None)
    if style is None:
        return message, 0
    thoughts = _thoughts(parsed, verdicts)
    thought_tokens = estimate_tokens(thoughts)
    if style in ("reasoning_content", "reasoning"):
        message[style] = thoughts
        return message, thought_tokens
    opening = "<think>\n" if style == "think_tags" else ""
    content = f"{opening}{thoughts}\n</think>\n\n{answer.content}"
    if isinstance(limit, int) and limit > 0 and estimate_tokens(content) > limit:
        content = content[: math.floor(limit * CHARS_PER_TOKEN)]
        message["_cut"] = True
    message["content"] = content
    return message, thought_tokens


def _thoughts(parsed: rules.ParsedPrompt, verdicts: list[rules.RuleVerdict]) -> str:
    """A reasoning model's thoughts, holding a decoy verdict: the answer's JSON form with
    every label wrong, which a parser that reads the thoughts would take."""
    names = parsed.label_names

    def wrong(label: str) -> str:
        return next((n for n in names if n != label), label)

    # At most DECOY_STEPS entries: thoughts that grow with the answer would crowd it out of
    # `max_tokens` (a parser that took a short decoy fails on the missing steps instead).
    entries = [
        {"index": v.index, "label": wrong(v.label), "reason": "first guess, before checking"}
        for v in verdicts[:DECOY_STEPS]
    ]
    decoy: Any = {"steps": entries} if parsed.mode == JobMode.TRAJECTORY else entries[0]
    return (
        "Let me look at what each step did and what it printed. A first guess, before "
        f"checking the observations:\n{json.dumps(decoy)}\nNow checking each step against "
        "its observation and the steps after it; several guesses above were wrong."
    )


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
    variants: Sequence[str] = (),
    context_tokens: int | None = None,
    *,
    batch_delay_s: float = 0.0,
    batch_limits: BatchLimits | None = None,
    verdict_source: VerdictSource | None = None,
) -> FastAPI:
    """The rules critic app. `faults`: a fault plan (model, mapping, list of rules or JSON);
    `variants`: the serving-stack variants it emulates for every request (see the module
    docstring); `context_tokens`: the context of the `context_*` variants; `batch_delay_s`
    and `batch_limits`: its Files and Batches API (`app.critic.rules_batches`);
    `verdict_source`: verdicts that replace the rules' where it has them."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"unknown rules critic variant {', '.join(unknown)}; known: {', '.join(VARIANTS)}"
        )
    critic = RulesCritic(
        latency_ms,
        _normalised_plan(faults),
        api_key,
        frozenset(variants),
        context_tokens,
        batch_delay_s,
        verdict_source,
    )
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
        """The messages and other body fields of the last requests answered, oldest first."""
        return {"requests": list(critic.recent)}

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
    variants = critic.variants_of(body)
    critic.refuse(body, variants)
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
    return JSONResponse(critic.complete(body, fault, variants))


def serve_rules(
    host: str = "127.0.0.1",
    port: int = 8088,
    latency_ms: int = 0,
    faults_json: str | None = None,
    api_key: str | None = None,
    *,
    variants: Sequence[str] = (),
    context_tokens: int | None = None,
    batch_delay_s: float = 0.0,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Run the rules critic until interrupted (blocking). Raises ValueError on a bad plan or
    an unknown variant."""
    try:
        plan = _normalised_plan(faults_json)
    except ValidationError as exc:
        raise ValueError(f"invalid fault plan: {exc}") from exc
    app = create_rules_app(
        latency_ms=latency_ms,
        faults=plan,
        api_key=api_key,
        variants=variants,
        context_tokens=context_tokens,
        batch_delay_s=batch_delay_s,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)


def start_rules_server_thread(
    latency_ms: int = 0,
    host: str = "127.0.0.1",
    variants: Sequence[str] = (),
    context_tokens: int | None = None,
    verdict_source: VerdictSource | None = None,
) -> int:
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
    app = create_rules_app(
        latency_ms=latency_ms,
        variants=variants,
        context_tokens=context_tokens,
        verdict_source=verdict_source,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
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
