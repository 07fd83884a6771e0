"""The critic client: one call to any OpenAI-compatible chat-completions endpoint.

A thin class around the official `openai` SDK with the SDK's own retries turned off: retrying
is decided one level up (`app.critic.judge`), where attempts are counted, Retry-After is
honoured and unparseable answers are re-asked. Here each failure is classified once into a
`CriticCallError` that says whether retrying can help.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import openai

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_s: float
    finish_reason: str | None


class CriticCallError(Exception):
    """A failed call. `kind`: rate_limited, server_error, timeout, connection, rejected."""

    def __init__(
        self, kind: str, message: str, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After (or retry-after-ms) header, when the server sent one."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    seconds = headers.get("retry-after")
    try:
        if milliseconds is not None:
            return max(0.0, float(milliseconds) / 1000)
        if seconds is not None:
            return max(0.0, float(seconds))
    except ValueError:
        return None  # an HTTP date: rare from LLM endpoints; fall back to our backoff
    return None


class CriticClient:
    """Calls one endpoint. The API key is held by the SDK client and never logged."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float) -> None:
        self.base_url = base_url
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            # Local servers (vLLM, Ollama, the rules critic) accept any key; the SDK needs one.
            api_key=api_key or "not-needed",
            timeout=timeout_s,
            max_retries=0,
        )
        # Some servers reject `response_format` json_schema; after the first such refusal we
        # stop sending it and rely on the prompt and tolerant parsing instead.
        self._schema_supported = True

    async def complete(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        temperature: float,
        max_tokens: int,
        response_format: dict[str, Any] | None = None,
    ) -> Completion:
        started = time.monotonic()
        kwargs: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        if response_format is not None and self._schema_supported:
            kwargs["response_format"] = response_format
        try:
            response = await self._client.chat.completions.create(**kwargs)
        except openai.BadRequestError as exc:
            if "response_format" in kwargs and "response_format" in str(exc):
                log.warning("critic endpoint refused response_format; continuing without it")
                self._schema_supported = False
                return await self.complete(
                    model=model,
                    messages=messages,
                    temperature=temperature,
                    max_tokens=max_tokens,
                )
            raise CriticCallError(
                "rejected", f"400 from critic: {exc.message}", retryable=False
            ) from exc
        except openai.RateLimitError as exc:
            raise CriticCallError(
                "rate_limited",
                f"429 from critic: {exc.message}",
                retryable=True,
                retry_after=_retry_after(exc.response.headers),
            ) from exc
        except openai.APITimeoutError as exc:
            raise CriticCallError(
                "timeout", "the critic did not answer in time", retryable=True
            ) from exc
        except openai.APIConnectionError as exc:
            raise CriticCallError(
                "connection", f"cannot reach the critic: {exc}", retryable=True
            ) from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status >= 500 or status in (408, 409)
            raise CriticCallError(
                "server_error" if status >= 500 else "rejected",
                f"{status} from critic: {exc.message}",
                retryable=retryable,
                retry_after=_retry_after(exc.response.headers),
            ) from exc
        return _completion(response, time.monotonic() - started)

    async def close(self) -> None:
        await self._client.close()


def _completion(response: Any, latency_s: float) -> Completion:
    choice = response.choices[0] if response.choices else None
    text = (choice.message.content or "") if choice is not None else ""
    usage = response.usage
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return Completion(
        text=text,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        cached_tokens=int(getattr(details, "cached_tokens", 0) or 0),
        latency_s=latency_s,
        finish_reason=choice.finish_reason if choice is not None else None,
    )
