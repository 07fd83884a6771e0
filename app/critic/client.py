"""The critic client: one call to any OpenAI-compatible chat-completions endpoint.

A thin class around the official `openai` SDK with the SDK's own retries turned off: retrying
is decided one level up (`app.critic.judge`), where attempts are counted, Retry-After is
honoured and unparseable answers are re-asked. Here each failure is classified once into a
`CriticCallError` that says whether retrying can help.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

from app.retry import retry_after_s
from app.status import ErrorKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    finish_reason: str | None
    reasoning_tokens: int = 0
    system_fingerprint: str | None = None


@dataclass(frozen=True)
class EndpointOptions:
    """A job's options for the request body (`app.jobs.schemas.CriticOptions`)."""

    max_tokens_param: str = "max_tokens"
    seed: int | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    structured_output: bool = True


def request_body(
    *,
    model: str,
    messages: list[dict[str, Any]],
    temperature: float,
    max_tokens: int,
    response_format: dict[str, Any] | None,
    options: EndpointOptions,
) -> dict[str, Any]:
    """The chat-completions request body, the one the online path posts and the batch path
    writes into its input files."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": temperature,
        options.max_tokens_param: max_tokens,
    }
    if options.seed is not None:
        body["seed"] = options.seed
    if response_format is not None and options.structured_output:
        body["response_format"] = response_format
    # The job's request refused any field set above (`RESERVED_BODY_FIELDS`).
    body.update(options.extra_body)
    return body


@dataclass(frozen=True)
class ContextRefusal:
    """What a server said when it refused a prompt longer than its context: its context
    length, the prompt's tokens and the tokens requested in all (prompt and answer), as far as
    its message says."""

    context_tokens: int | None = None
    prompt_tokens: int | None = None
    requested_tokens: int | None = None


class CriticCallError(Exception):
    """A failed call, and which `ErrorKind` of failure it was."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        refusal: ContextRefusal | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.refusal = refusal


# How servers say that a prompt is longer than the model's context (400s):
#   vLLM:   "This model's maximum context length is N tokens. However, you requested M tokens
#            (P in the messages, C in the completion). ..." (older), "... However, your request
#            has P input tokens. ..." and "... is N tokens and your request has P input tokens
#            (C > N - P)" (newer);
#   SGLang: "The input (P tokens) is longer than the model's context length (N tokens)." and
#           "Requested token count exceeds the model's maximum context length of N tokens. You
#            requested a total of M tokens: P tokens from the input messages and C tokens for
#            the completion. ...";
#   OpenAI: code `context_length_exceeded`, "This model's maximum context length is N tokens.
#           However, your messages resulted in P tokens. ...".
_CONTEXT_SAYS = re.compile(
    r"maximum context length|longer than the model's context length|context length exceeded"
    r"|context_length_exceeded",
    re.IGNORECASE,
)
_CONTEXT_LIMIT = re.compile(
    r"maximum context length (?:is|of) (\d+)|model's context length \((\d+) tokens\)",
    re.IGNORECASE,
)
_PROMPT_TOKENS = re.compile(
    r"\((\d+) in the messages|has (\d+) input tokens|messages resulted in (\d+) tokens"
    r"|the input \((\d+) tokens\)|(\d+) tokens from the input messages",
    re.IGNORECASE,
)
_REQUESTED_TOKENS = re.compile(
    r"you requested (\d+) tokens|requested a total of (\d+) tokens", re.IGNORECASE
)


def context_refusal(message: str, code: str | None = None) -> ContextRefusal | None:
    """The refusal a 400's message (and error code) describes, if it says the prompt does not
    fit the model's context; None for any other 400."""
    if code != "context_length_exceeded" and _CONTEXT_SAYS.search(message) is None:
        return None

    def number(pattern: re.Pattern[str]) -> int | None:
        found = pattern.search(message)
        if found is None:
            return None
        return int(next(group for group in found.groups() if group is not None))

    return ContextRefusal(number(_CONTEXT_LIMIT), number(_PROMPT_TOKENS), number(_REQUESTED_TOKENS))


_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class RequestEncoder:
    """A request body as JSON, as the SDK would encode it, with long texts encoded once.

    Step-mode requests of one trajectory repeat one long prefix (the trajectory, often
    100 KB or more) and differ only in a short question; escaping that prefix anew for every
    call was the largest single CPU cost of a call. The JSON of the last LONG_TEXTS long
    message texts is kept and reused.
    """

    LONG_CHARS = 1024
    LONG_TEXTS = 64

    def __init__(self) -> None:
        self._texts: OrderedDict[str, bytes] = OrderedDict()

    def encode(self, body: dict[str, Any]) -> bytes:
        parts: list[bytes] = [b"{"]
        for key, value in body.items():
            if len(parts) > 1:
                parts.append(b",")
            parts.append(_dumps(key).encode() + b":")
            if key == "messages" and isinstance(value, list):
                parts.append(b"[")
                for number, message in enumerate(value):
                    if number:
                        parts.append(b",")
                    self._message(message, parts)
                parts.append(b"]")
            else:
                parts.append(_dumps(value).encode())
        parts.append(b"}")
        return b"".join(parts)

    def _message(self, message: Any, parts: list[bytes]) -> None:
        if not isinstance(message, dict):
            parts.append(_dumps(message).encode())
            return
        parts.append(b"{")
        for number, (key, value) in enumerate(message.items()):
            parts.append(f"{',' if number else ''}{_dumps(key)}:".encode())
            parts.append(self._value(value))
        parts.append(b"}")

    def _value(self, value: Any) -> bytes:
        if not isinstance(value, str) or len(value) < self.LONG_CHARS:
            return _dumps(value).encode()
        encoded = self._texts.get(value)
        if encoded is None:
            encoded = _dumps(value).encode()
            self._texts[value] = encoded
            if len(self._texts) > self.LONG_TEXTS:
                self._texts.popitem(last=False)
        else:
            self._texts.move_to_end(value)
        return encoded


# Connections per SDK client (see `CriticClient`).
CONNECTIONS_PER_CLIENT = 8


class CriticClient:
    """Calls one endpoint. The API key is held by the SDK client and never logged.

    `max_connections` is how many calls may be in flight at once (the concurrency cap). The
    HTTP connection pool under the SDK does work proportional to its connections on every
    request (it probes each idle connection's socket), which with dozens of calls in flight
    costs more CPU than the rest of the call; so calls are spread round-robin over several
    SDK clients of about CONNECTIONS_PER_CLIENT connections each, whose pools stay small.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float,
        max_connections: int | None = None,
    ) -> None:
        self.base_url = base_url
        count = 1 if not max_connections else -(-max_connections // CONNECTIONS_PER_CLIENT)
        self._clients = [
            openai.AsyncOpenAI(
                base_url=base_url,
                # Local servers (vLLM, Ollama, the rules critic) accept any key; the SDK needs
                # one.
                api_key=api_key or "not-needed",
                timeout=timeout_s,
                max_retries=0,
            )
            for _ in range(count)
        ]
        self._turns = itertools.cycle(self._clients)
        self._encoder = RequestEncoder()
        # Whether each model of this endpoint takes `response_format` json_schema (absent:
        # not known yet). After the first refusal of a model we stop sending it for that model
        # and rely on the prompt and tolerant parsing instead.
        self._structured: dict[str, bool] = {}

    def structured_supported(self, model: str) -> bool | None:
        """Whether `model` at this endpoint took a `response_format` (True), refused one
        (False), or has not been asked with one yet (None)."""
        return self._structured.get(model)

    async def complete(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        temperature: float,
        max_tokens: int,
        response_format: dict[str, Any] | None = None,
        options: EndpointOptions | None = None,
    ) -> Completion:
        started = time.monotonic()
        options = options or EndpointOptions()
        if self._structured.get(model) is False:
            response_format = None
        kwargs = request_body(
            model=model,
            messages=messages,
            temperature=temperature,
            max_tokens=max_tokens,
            response_format=response_format,
            options=options,
        )
        try:
            # The SDK's generic `post`: the same request, headers, auth and errors as
            # `chat.completions.create`, without its walk of the whole (long) request through
            # the typed-parameter transform and of the answer through its models on every
            # call; the body is encoded here (see `RequestEncoder`), the answer read below.
            answer = await next(self._turns).post(
                "/chat/completions", content=self._encoder.encode(kwargs), cast_to=bytes
            )
        except openai.BadRequestError as exc:
            said = _error_text(exc)
            refusal = context_refusal(said, _error_code(exc))
            if refusal is not None:
                raise CriticCallError(
                    ErrorKind.CONTEXT_EXCEEDED,
                    f"400 from critic: {exc.message}",
                    retryable=False,
                    refusal=refusal,
                ) from exc
            if "response_format" in kwargs and refuses_response_format(said):
                if self._structured.get(model) is not False:
                    log.warning(
                        "critic endpoint %s refused response_format for model %r; continuing "
                        "without it: %s",
                        self.base_url,
                        model,
                        exc.message,
                    )
                self._structured[model] = False
                return await self.complete(
                    model=model,
                    messages=messages,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    options=options,
                )
            raise CriticCallError(
                ErrorKind.REJECTED, f"400 from critic: {exc.message}", retryable=False
            ) from exc
        except openai.RateLimitError as exc:
            raise CriticCallError(
                ErrorKind.RATE_LIMITED,
                f"429 from critic: {exc.message}",
                retryable=True,
                retry_after=retry_after_s(exc.response.headers),
            ) from exc
        except openai.APITimeoutError as exc:
            raise CriticCallError(
                ErrorKind.TIMEOUT, "the critic did not answer in time", retryable=True
            ) from exc
        except openai.APIConnectionError as exc:
            raise CriticCallError(
                ErrorKind.CONNECTION, f"cannot reach the critic: {exc}", retryable=True
            ) from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status >= 500 or status in (408, 409)
            raise CriticCallError(
                ErrorKind.SERVER_ERROR if status >= 500 else ErrorKind.REJECTED,
                f"{status} from critic: {exc.message}",
                retryable=retryable,
                retry_after=retry_after_s(exc.response.headers),
            ) from exc
        if "response_format" in kwargs:
            self._structured[model] = True
        try:
            response = json.loads(answer)
        except ValueError as exc:
            raise CriticCallError(
                ErrorKind.SERVER_ERROR, f"the critic's answer is not JSON: {exc}", retryable=True
            ) from exc
        return _completion(response, time.monotonic() - started)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


def _error_text(exc: openai.APIStatusError) -> str:
    """The error's message as the server wrote it (the SDK's `message` may be its summary)."""
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    said = error.get("message") if isinstance(error, dict) else None
    return f"{exc.message} {said}" if isinstance(said, str) else str(exc.message)


def _error_code(exc: openai.APIStatusError) -> str | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else None


def refuses_response_format(message: str) -> bool:
    """Whether a 400's message says the server does not take the request's `response_format`
    (vLLM, SGLang and OpenAI each name the field); the online and the batch path both ask."""
    return "response_format" in message


def parse_completion(response: Any, latency_s: float = 0.0) -> Completion:
    """A Completion from a ChatCompletion as JSON: the online answer, or the body of a
    batch output line."""
    return _completion(response, latency_s)


def _completion(response: Any, latency_s: float) -> Completion:
    """A Completion from a ChatCompletion as JSON (tolerant of missing parts).

    Only `content` is the answer: a reasoning parser's `reasoning_content` (vLLM, SGLang,
    DeepSeek) or `reasoning` holds thoughts, which are never read as a verdict."""
    body = response if isinstance(response, dict) else {}
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    choice = choice if isinstance(choice, dict) else None
    message = choice.get("message") if choice is not None else None
    content = message.get("content") if isinstance(message, dict) else None
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    answer_details = usage.get("completion_tokens_details")
    answer_details = answer_details if isinstance(answer_details, dict) else {}
    fingerprint = body.get("system_fingerprint")
    return Completion(
        text=content if isinstance(content, str) else ("" if content is None else str(content)),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        latency_s=latency_s,
        finish_reason=choice.get("finish_reason") if choice is not None else None,
        reasoning_tokens=int(answer_details.get("reasoning_tokens") or 0),
        system_fingerprint=fingerprint[:128] if isinstance(fingerprint, str) else None,
    )
