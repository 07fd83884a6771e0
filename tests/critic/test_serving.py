"""Today's serving stacks through the production client (`CriticClient` + `Judge`) and the rules
critic emulating each: reasoning answers, structured outputs and their refusal, per-job
endpoint options, context refusals and re-planning, and prompts measured with a tokenizer."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.critic import prompt
from app.critic.client import ContextRefusal, CriticClient, EndpointOptions, context_refusal
from app.critic.judge import Judge, JudgeConfig, StepOutcome
from app.critic.labels import DEFAULT_LABELS
from app.critic.limits import LocalLimiter
from app.critic.parse import CriticAnswerError, answer_part, parse_step_answer
from app.critic.rules_server import start_rules_server_thread
from app.recipe.steps import Step, split_steps
from app.status import ErrorKind
from app.trajectories.formats import parse_upload
from app.worker.runtime import CriticTokenizers
from tests.builders import make_trajectory
from tests.helpers import all_trajectory_files

Run = tuple[str, list[dict[str, Any]], list[Step], bool | None]


@cache
def shared_runs() -> tuple[Run, ...]:
    """Every run of the shared real trajectories."""
    runs: list[Run] = []
    for path in all_trajectory_files():
        for number, trajectory in enumerate(parse_upload(path.read_bytes())):
            name = f"{path.name}#{number}"
            runs.append(
                (name, trajectory.messages, split_steps(trajectory.messages), trajectory.resolved)
            )
    return tuple(runs)


@cache
def server(*variants: str, context_tokens: int | None = None) -> str:
    """A rules critic emulating `variants` (in a thread, one per set for the whole run)."""
    port = start_rules_server_thread(variants=variants, context_tokens=context_tokens)
    return f"http://127.0.0.1:{port}"


def admin(url: str, path: str) -> Any:
    return httpx.get(f"{url}/admin/{path}").json()


def reset(url: str) -> None:
    httpx.post(f"{url}/admin/stats/reset").raise_for_status()


def judge(url: str, **config: Any) -> Judge:
    settings: dict[str, Any] = {"model": "rules", "labels": DEFAULT_LABELS} | config
    return Judge(
        CriticClient(f"{url}/v1", None, timeout_s=30),
        LocalLimiter(8),
        JudgeConfig(**settings),
    )


async def label_runs(
    critic: Judge, runs: Sequence[Run], mode: str = "trajectory"
) -> dict[tuple[str, int], StepOutcome]:
    outcomes: dict[tuple[str, int], StepOutcome] = {}
    for name, messages, steps, resolved in runs:
        targets = [s.index for s in steps]
        if mode == "trajectory":
            async for window in critic.judge_trajectory(messages, steps, resolved, set(targets)):
                for outcome in window:
                    outcomes[(name, outcome.index)] = outcome
        else:
            async for outcome in critic.judge_steps(messages, steps, resolved, targets):
                outcomes[(name, outcome.index)] = outcome
    return outcomes


def labels_of(outcomes: dict[tuple[str, int], StepOutcome]) -> dict[tuple[str, int], str | None]:
    return {key: outcome.label for key, outcome in outcomes.items()}


def run_all(critic: Judge, runs: Sequence[Run], mode: str = "trajectory") -> dict[Any, StepOutcome]:
    async def go() -> dict[Any, StepOutcome]:
        try:
            return await label_runs(critic, runs, mode)
        finally:
            await critic.client.close()

    return asyncio.run(go())


@cache
def plain_labels() -> dict[tuple[str, int], str | None]:
    """The plain rules critic's labels of every shared run, through the same client."""
    return labels_of(run_all(judge(server()), shared_runs()))


# ---------------------------------------------------------------------------- reading answers


ANSWER = '{"index": 3, "label": "good", "reason": "ran the tests"}'
DECOY = '{"index": 3, "label": "mistake", "reason": "a first guess"}'


@pytest.mark.parametrize(
    "text",
    [
        f"<think>\nI guess {DECOY} at first.\n</think>\n\n{ANSWER}",
        f"I guess {DECOY} at first, but no.\n</think>\n{ANSWER}",  # template opened <think>
        f"<THINK>{DECOY}</think >```json\n{ANSWER}\n```",
    ],
)
def test_the_answer_is_read_after_the_thoughts_never_inside_them(text: str) -> None:
    judgment = parse_step_answer(text, 3, DEFAULT_LABELS)
    assert (judgment.label, judgment.reason) == ("good", "ran the tests")


def test_thoughts_that_never_close_are_a_truncated_answer() -> None:
    text = f"<think>\nStep 3 looks like {DECOY} but let me check the observation"
    with pytest.raises(CriticAnswerError, match="never closed"):
        parse_step_answer(text, 3, DEFAULT_LABELS)
    assert answer_part(text) is None
    with pytest.raises(CriticAnswerError, match="empty after the thoughts"):
        parse_step_answer(f"<think>{DECOY}</think>\n", 3, DEFAULT_LABELS)


def test_an_answer_without_thoughts_is_read_as_before() -> None:
    assert answer_part(ANSWER) == ANSWER
    assert parse_step_answer(ANSWER, 3, DEFAULT_LABELS).label == "good"


# ---------------------------------------------------------------------------- context refusals


@pytest.mark.parametrize(
    ("message", "code", "expected"),
    [
        (  # vLLM, before 0.8
            "This model's maximum context length is 4096 tokens. However, you requested 5000 "
            "tokens (4000 in the messages, 1000 in the completion). Please reduce the length "
            "of the messages or completion.",
            None,
            ContextRefusal(4096, 4000, 5000),
        ),
        (  # vLLM, newer
            "'max_tokens' or 'max_completion_tokens' is too large: 1000. This model's maximum "
            "context length is 4096 tokens and your request has 3500 input tokens "
            "(1000 > 4096 - 3500). None",
            None,
            ContextRefusal(4096, 3500, None),
        ),
        (
            "This model's maximum context length is 1536 tokens. However, your request has "
            "4176 input tokens. Please reduce the length of the input messages.",
            None,
            ContextRefusal(1536, 4176, None),
        ),
        (  # SGLang
            "The input (5000 tokens) is longer than the model's context length (4096 tokens).",
            None,
            ContextRefusal(4096, 5000, None),
        ),
        (
            "Requested token count exceeds the model's maximum context length of 4096 tokens. "
            "You requested a total of 5000 tokens: 4000 tokens from the input messages and "
            "1000 tokens for the completion. Please reduce the number of tokens in the input "
            "messages or the completion to fit within the limit.",
            None,
            ContextRefusal(4096, 4000, 5000),
        ),
        (  # OpenAI
            "This model's maximum context length is 128000 tokens. However, your messages "
            "resulted in 130000 tokens. Please reduce the length of the messages.",
            "context_length_exceeded",
            ContextRefusal(128000, 130000, None),
        ),
        ("Input is too long for this endpoint.", "context_length_exceeded", ContextRefusal()),
    ],
)
def test_context_refusals_are_recognised_with_their_numbers(
    message: str, code: str | None, expected: ContextRefusal
) -> None:
    assert context_refusal(message, code) == expected


@pytest.mark.parametrize(
    "message",
    [
        "Unsupported parameter: 'max_tokens' is not supported with this model.",
        "1 validation error for ChatCompletionRequest\nresponse_format.type\n  Input should be "
        "'text' or 'json_object'",
        "temperature must be at most 2",
    ],
)
def test_other_400s_are_not_context_refusals(message: str) -> None:
    assert context_refusal(message, "invalid_request_error") is None


# ---------------------------------------------------------------------------- variants label right


@pytest.mark.parametrize(
    "variants",
    [
        ("reasoning_content",),
        ("reasoning",),
        ("think_tags",),
        ("think_open",),
        ("no_response_format",),
        ("json_schema",),
        ("think_tags", "no_response_format"),
    ],
)
def test_each_variant_labels_the_shared_real_runs_like_the_plain_critic(
    variants: tuple[str, ...],
) -> None:
    url = server(*variants)
    reset(url)
    outcomes = run_all(judge(url), shared_runs())
    assert labels_of(outcomes) == plain_labels()
    assert None not in plain_labels().values()
    assert len(outcomes) == sum(len(steps) for _, _, steps, _ in shared_runs())
    stats = admin(url, "stats")
    # One request per window: no re-ask was needed to get past the thoughts.
    assert all(o.usage.attempts == 1 for o in outcomes.values())
    reasoning = any(v.startswith(("reasoning", "think")) for v in variants)
    assert (stats["tokens"]["reasoning"] > 0) == reasoning
    assert (sum(o.usage.reasoning_tokens for o in outcomes.values()) > 0) == reasoning
    assert {o.usage.system_fingerprint for o in outcomes.values()} == {"srft-rules"}
    if "no_response_format" in variants:
        # Refused once, then never sent again to this endpoint for this model.
        assert stats["refused"] == {"response_format": 1}
        assert all("response_format" not in r["fields"] for r in admin(url, "requests")["requests"])
    else:
        assert stats["refused"] == {}


def test_step_mode_reads_the_answer_not_the_decoy_in_the_thoughts() -> None:
    runs = shared_runs()[:3]
    plain = labels_of(run_all(judge(server()), runs, mode="step"))
    for variant in ("reasoning_content", "think_tags", "think_open"):
        assert labels_of(run_all(judge(server(variant)), runs, mode="step")) == plain, variant


def test_a_cut_thought_block_is_re_asked_and_ends_unparseable() -> None:
    # Thoughts alone are longer than the answer's room: the block never closes.
    name, messages, steps, resolved = shared_runs()[0]
    critic = judge(server("think_tags"), max_answer_tokens=40, max_attempts=2)
    outcomes = run_all(critic, [(name, messages, steps[:1], resolved)], mode="step")
    (outcome,) = outcomes.values()
    assert outcome.label is None
    assert outcome.error_kind == ErrorKind.UNPARSEABLE
    assert "never closed" in (outcome.error or "")
    assert outcome.usage.attempts == 2


# ---------------------------------------------------------------------------- structured outputs


def one_step_request(url: str, **options: Any) -> tuple[CriticClient, Any]:
    _, messages, steps, resolved = shared_runs()[0]
    request = prompt.step_request(
        messages, steps, steps[0].index, resolved, DEFAULT_LABELS, 128_000
    )
    return CriticClient(f"{url}/v1", None, timeout_s=30), request


async def ask(client: CriticClient, request: Any, model: str, **options: Any) -> Any:
    return await client.complete(
        model=model,
        messages=request.messages,
        temperature=0.0,
        max_tokens=512,
        response_format=request.response_format,
        options=EndpointOptions(**options),
    )


def test_a_refused_response_format_is_remembered_per_model() -> None:
    url = server("no_response_format")
    reset(url)
    client, request = one_step_request(url)

    async def go() -> None:
        assert client.structured_supported("critic-a") is None
        await ask(client, request, "critic-a")
        assert client.structured_supported("critic-a") is False
        await asyncio.gather(*(ask(client, request, "critic-a") for _ in range(5)))
        assert admin(url, "stats")["refused"] == {"response_format": 1}
        # Another model of the same endpoint is asked with it (and refused) on its own.
        assert client.structured_supported("critic-b") is None
        await ask(client, request, "critic-b")
        assert client.structured_supported("critic-b") is False
        await client.close()

    asyncio.run(go())
    stats = admin(url, "stats")
    assert stats["refused"] == {"response_format": 2}
    assert stats["completions"] == 7


def test_an_enforcing_server_gets_the_schema_and_the_client_remembers_it_worked() -> None:
    url = server("json_schema")
    client, request = one_step_request(url)

    async def go() -> None:
        await ask(client, request, "rules")
        assert client.structured_supported("rules") is True
        await ask(client, request, "rules", structured_output=False)
        await client.close()

    asyncio.run(go())
    first, second = admin(url, "requests")["requests"][-2:]
    assert first["fields"]["response_format"] == request.response_format
    assert "response_format" not in second["fields"]  # `structured_output: "off"`


def test_an_enforcing_server_refuses_a_malformed_schema() -> None:
    url = server("json_schema")
    body = {
        "model": "rules",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "response_format" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------- endpoint options


def test_endpoint_options_reach_the_server_exactly() -> None:
    url = server("max_completion_tokens")
    client, request = one_step_request(url)
    extra = {"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}}

    async def go() -> Any:
        try:
            return await ask(
                client,
                request,
                "rules",
                max_tokens_param="max_completion_tokens",
                seed=7,
                extra_body=extra,
            )
        finally:
            await client.close()

    completion = asyncio.run(go())
    assert completion.system_fingerprint == "srft-rules"
    fields = admin(url, "requests")["requests"][-1]["fields"]
    assert fields == {
        "model": "rules",
        "temperature": 0.0,
        "max_completion_tokens": 512,
        "seed": 7,
        "response_format": request.response_format,
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False},
    }


def test_max_tokens_refused_by_a_reasoning_model_fails_the_step_without_retrying() -> None:
    url = server("max_completion_tokens")
    reset(url)
    name, messages, steps, resolved = shared_runs()[0]
    outcomes = run_all(judge(url), [(name, messages, steps[:2], resolved)], mode="step")
    for outcome in outcomes.values():
        assert outcome.label is None
        assert outcome.error_kind == ErrorKind.REJECTED
        assert "max_completion_tokens" in (outcome.error or "")
        assert outcome.usage.attempts == 1
    assert admin(url, "stats")["refused"] == {"max_tokens": 2}
    endpoint = EndpointOptions(max_tokens_param="max_completion_tokens")
    fixed = run_all(
        judge(url, endpoint=endpoint), [(name, messages, steps[:2], resolved)], mode="step"
    )
    assert all(o.label is not None for o in fixed.values())


# ---------------------------------------------------------------------------- context re-plans


def longest_run() -> Run:
    return max(shared_runs(), key=lambda run: sum(len(json.dumps(m)) for m in run[1]))


@pytest.mark.parametrize("style", ["context_vllm", "context_sglang", "context_openai"])
@pytest.mark.parametrize("mode", ["trajectory", "step"])
def test_a_small_context_re_plans_instead_of_failing(style: str, mode: str) -> None:
    url = server(style, context_tokens=12_000)
    reset(url)
    run = longest_run()
    critic = judge(url, max_answer_tokens=2048)  # believes in the default 128k context
    outcomes = run_all(critic, [run], mode=mode)
    assert len(outcomes) == len(run[2])
    failed = {k: (o.error_kind, o.error) for k, o in outcomes.items() if o.label is None}
    assert failed == {}
    stats = admin(url, "stats")
    assert stats["refused"]["context_length"] >= 1  # the re-plan, counted at the critic
    # Each refusal cost an attempt of the steps that were asked again.
    assert max(o.usage.attempts for o in outcomes.values()) >= 2
    if mode == "trajectory":
        # The whole run did not fit 12k of the server's tokens: it was cut into windows.
        asked = admin(url, "requests")["requests"]
        assert any("this excerpt shows steps" in r["messages"][1]["content"] for r in asked)


def test_a_context_too_small_for_the_answer_fails_with_context_exceeded() -> None:
    url = server("context_vllm", context_tokens=3000)
    name, messages, steps, resolved = longest_run()
    critic = judge(url, max_answer_tokens=2900)
    outcomes = run_all(critic, [(name, messages, steps[:2], resolved)], mode="step")
    for outcome in outcomes.values():
        assert outcome.label is None
        assert outcome.error_kind == ErrorKind.CONTEXT_EXCEEDED
        assert "maximum context length is 3000" in (outcome.error or "")


# ---------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.chat_tokenizers import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("critic-tokenizer") / "chatml")


def wide_run() -> tuple[list[dict[str, Any]], list[Step]]:
    """A run whose observations are Cyrillic: ~2 bytes, so ~2 byte-level tokens, a character,
    where the estimate counts 1 token per 3.5 characters."""
    messages: list[dict[str, Any]] = make_trajectory(steps=4)["messages"]
    for message in messages:
        if message["role"] == "tool":
            message["content"] = ("проверка " * 700).strip()
    return messages, split_steps(messages)


def test_windows_are_measured_with_the_tokenizer_when_one_is_configured(
    tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizers = CriticTokenizers(Settings(tokenizer_dirs=str(tokenizer_dir.parent)))
    count = tokenizers(str(tokenizer_dir), True)
    assert count is not None
    messages, steps = wide_run()
    observation = next(m["content"] for m in messages if m["role"] == "tool")
    assert count(observation) > 3 * prompt.estimate_tokens(observation)
    context = 12_000
    estimated = prompt.trajectory_windows(messages, steps, None, DEFAULT_LABELS, context, 1024)
    measured = prompt.trajectory_windows(
        messages, steps, None, DEFAULT_LABELS, context, 1024, count_tokens=count
    )
    # The estimate says the whole run fits; the tokenizer says it does not, so it is split.
    assert len(estimated) == 1
    assert estimated[0].observation_cap is None
    assert len(measured) > 1 or measured[0].observation_cap is not None
    for request in measured:
        text = "\n".join(m["content"] for m in request.messages)
        assert count(text) + 1024 <= context
    assert sorted(i for r in measured for i in r.target_indices) == [s.index for s in steps]
    # Loaded once per process, by name.
    assert tokenizers(str(tokenizer_dir), True) is count


def test_a_tokenizer_that_cannot_be_loaded_is_logged_once_and_the_estimate_kept(
    tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizers = CriticTokenizers(Settings(tokenizer_dirs=""))
    with caplog.at_level(logging.WARNING):
        # A job's own tokenizer must be a Hub id or under SRFT_TOKENIZER_DIRS.
        assert tokenizers(str(tokenizer_dir), False) is None
        assert tokenizers(str(tokenizer_dir), False) is None
    warnings = [r for r in caplog.records if "cannot be loaded" in r.getMessage()]
    assert len(warnings) == 1
    allowed = CriticTokenizers(Settings(tokenizer_dirs=str(tokenizer_dir.parent)))
    assert allowed(str(tokenizer_dir), False) is not None


def test_the_judge_lays_out_step_requests_with_the_tokenizer(tokenizer_dir: Path) -> None:
    count = CriticTokenizers(Settings())(str(tokenizer_dir), True)
    assert count is not None
    messages, steps = wide_run()
    url = server()
    reset(url)
    critic = judge(url, context_tokens=12_000, max_answer_tokens=1024, count_tokens=count)
    outcomes = run_all(critic, [("wide", messages, steps, None)], mode="step")
    assert all(o.label is not None for o in outcomes.values())
    for asked in admin(url, "requests")["requests"][-len(steps) :]:
        text = "\n".join(m["content"] for m in asked["messages"])
        assert count(text) + 1024 <= 12_000


def test_unknown_variants_are_refused_at_start_and_per_request() -> None:
    with pytest.raises(ValueError, match="unknown rules critic variant thinking"):
        start_rules_server_thread(variants=["thinking"])
    response = httpx.post(
        f"{server()}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "rules_variant": ["thinking"]},
    )
    assert response.status_code == 400
    assert "unknown rules_variant thinking" in response.json()["error"]["message"]
