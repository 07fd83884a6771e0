"""The rules critic over HTTP: answers, usage, votes, faults, stats, auth, and a real server
called through the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.critic import parse, prompt, rules
from app.critic.labels import DEFAULT_LABELS
from app.critic.parse import CriticAnswerError
from app.critic.prompt import CriticRequest
from app.critic.rules_server import create_rules_app, serve_rules
from app.recipe.steps import Step, split_steps
from app.trajectories.formats import parse_upload
from app.trajectories.formats.base import Trajectory
from tests.helpers import trajectory_file

LONG_RUN = "mini-swe-agent/mini-v2.2.7__deepseek-chat__django__django-13265.traj.json"
SHORT_RUN = "swe-agent/sweagent-tests__gpt4__pydicom__pydicom-1458.traj"
CONTEXT = 128_000


@cache
def real(relative: str) -> tuple[Trajectory, list[Step]]:
    trajectory = parse_upload(trajectory_file(relative).read_bytes())[0]
    return trajectory, split_steps(trajectory.messages)


def whole_request(relative: str = SHORT_RUN) -> CriticRequest:
    trajectory, steps = real(relative)
    (request,) = prompt.trajectory_windows(
        trajectory.messages, steps, trajectory.resolved, DEFAULT_LABELS, CONTEXT
    )
    return request


def one_step(index: int, relative: str = SHORT_RUN) -> CriticRequest:
    trajectory, steps = real(relative)
    return prompt.step_request(
        trajectory.messages, steps, index, trajectory.resolved, DEFAULT_LABELS, CONTEXT
    )


def expected_labels(relative: str = SHORT_RUN) -> dict[int, str]:
    trajectory, steps = real(relative)
    verdicts = rules.label_trajectory(trajectory.messages, steps, DEFAULT_LABELS)
    return {v.index: v.label for v in verdicts}


def body(request: CriticRequest, **extra: Any) -> dict[str, Any]:
    return {
        "model": "rules",
        "messages": request.messages,
        "response_format": request.response_format,
        **extra,
    }


# TestClient's response type depends on the installed httpx flavour; tests only read it.
Response = Any


def ask(client: TestClient, request: CriticRequest, **extra: Any) -> Response:
    return client.post("/v1/chat/completions", json=body(request, **extra))


def content(response: Response) -> str:
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


def statuses(client: TestClient, request: CriticRequest, times: int) -> list[int]:
    return [ask(client, request).status_code for _ in range(times)]


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app on a real uvicorn server in a thread, on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# ---------------------------------------------------------------------------- answers


def test_models_lists_the_rules_model() -> None:
    response = TestClient(create_rules_app()).get("/v1/models")
    assert response.json()["data"][0]["id"] == "rules"


def test_the_start_warns_that_labels_are_heuristic(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.critic.rules_server"):
        create_rules_app()
    assert "heuristics" in caplog.text
    assert "not with an LLM" in caplog.text


def test_a_trajectory_request_is_answered_with_the_rules() -> None:
    client = TestClient(create_rules_app())
    request = whole_request()
    response = ask(client, request, model="my-critic")
    assert response.status_code == 200
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "my-critic"
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop"
    judgments = parse.parse_trajectory_answer(
        choice["message"]["content"], request.target_indices, DEFAULT_LABELS
    )
    assert {i: j.label for i, j in judgments.items()} == expected_labels()
    assert set(expected_labels().values()) == {"good", "mistake", "recover", "unnecessary"}
    usage = completion["usage"]
    assert usage["prompt_tokens"] == request.approx_prompt_tokens
    assert usage["completion_tokens"] == prompt.estimate_tokens(choice["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_step_requests_are_answered_one_step_at_a_time() -> None:
    client = TestClient(create_rules_app())
    expected = expected_labels()
    for index in expected:
        judgment = parse.parse_step_answer(
            content(ask(client, one_step(index))), index, DEFAULT_LABELS
        )
        assert judgment.label == expected[index]
        assert judgment.reason.endswith("rule") or "rule" in judgment.reason


def test_the_shared_prefix_of_step_requests_counts_as_cached() -> None:
    client = TestClient(create_rules_app())
    first, second = one_step(0), one_step(1)
    usage = [ask(client, r).json()["usage"] for r in (first, second, second)]
    prefix = prompt.estimate_prompt_tokens(second.messages[:2], second.response_format)
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usage] == [
        0,
        prefix,
        second.approx_prompt_tokens,  # the same request again: all of it was seen
    ]
    assert prefix > 0.9 * second.approx_prompt_tokens


def test_a_reask_is_answered_like_the_request() -> None:
    client = TestClient(create_rules_app())
    request = one_step(3)
    again = prompt.reask_messages(request, "{oops", "the answer is truncated")
    response = client.post("/v1/chat/completions", json={"model": "rules", "messages": again})
    judgment = parse.parse_step_answer(content(response), 3, DEFAULT_LABELS)
    assert judgment.label == expected_labels()[3]


def test_temperature_zero_is_deterministic_and_n_gives_choices() -> None:
    client = TestClient(create_rules_app())
    request = whole_request(LONG_RUN)
    answers = [content(ask(client, request, temperature=0)) for _ in range(3)]
    assert len(set(answers)) == 1
    choices = ask(client, request, n=3).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert {c["message"]["content"] for c in choices} == {answers[0]}


def test_temperature_varies_labels_reproducibly_whatever_the_order() -> None:
    vote, other = whole_request(LONG_RUN), whole_request()
    first = TestClient(create_rules_app())
    votes = [content(ask(first, vote, temperature=1.0)) for _ in range(5)]
    ask(first, other, temperature=1.0)
    second = TestClient(create_rules_app())
    ask(second, other, temperature=1.0)
    assert [content(ask(second, vote, temperature=1.0)) for _ in range(5)] == votes
    assert len(set(votes)) == 5
    expected = expected_labels(LONG_RUN)
    for answer in votes:
        judgments = parse.parse_trajectory_answer(answer, vote.target_indices, DEFAULT_LABELS)
        flipped = [j for j in judgments.values() if j.label != expected[j.index]]
        assert 0 < len(flipped) < len(judgments) / 3  # a little, not a lot
        assert all(j.reason.startswith("Sampled at temperature 1:") for j in flipped)


def test_max_tokens_cuts_the_answer() -> None:
    client = TestClient(create_rules_app())
    choice = ask(client, whole_request(), max_tokens=20).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert prompt.estimate_tokens(choice["message"]["content"]) <= 20
    with pytest.raises(CriticAnswerError, match="truncated"):
        parse.parse_trajectory_answer(
            choice["message"]["content"], whole_request().target_indices, DEFAULT_LABELS
        )


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"model": "rules"}).encode(), "`messages` must be a non-empty list"),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode(),
            "does not stream",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "Label my steps"}]}).encode(),
            "answers only prompts built by app.critic.prompt",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(),
            "`n` must be",
        ),
    ],
)
def test_bad_requests_get_an_openai_style_400(payload: bytes, says: str) -> None:
    client = TestClient(create_rules_app())
    response = client.post("/v1/chat/completions", content=payload)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert says in error["message"]
    assert client.get("/admin/stats").json()["bad_requests"] == 1


# ---------------------------------------------------------------------------- auth


def test_an_api_key_is_required_when_configured() -> None:
    client = TestClient(create_rules_app(api_key="sk-test"))
    request = whole_request()
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-test"}):
        response = client.post("/v1/chat/completions", json=body(request), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/admin/stats").status_code == 401
    good = {"Authorization": "Bearer sk-test"}
    assert client.post("/v1/chat/completions", json=body(request), headers=good).status_code == 200
    stats = client.get("/admin/stats", headers=good).json()
    assert stats["unauthorized"] == 4
    assert stats["requests"] == 1


# ---------------------------------------------------------------------------- faults


def set_plan(client: TestClient, plan: dict[str, Any]) -> Response:
    return client.post("/admin/faults", json=plan)


def test_429_every_third_request_with_retry_after() -> None:
    client = TestClient(create_rules_app())
    set_plan(client, {"faults": [{"kind": "429", "every": 3, "retry_after": 1.5}]})
    request = whole_request()
    responses = [ask(client, request) for _ in range(7)]
    assert [r.status_code for r in responses] == [200, 200, 429, 200, 200, 429, 200]
    limited = responses[2]
    assert limited.headers["retry-after"] == "2"
    assert limited.headers["retry-after-ms"] == "1500"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.get("/admin/stats").json()["faults"]["429"] == 2


def test_500_for_the_first_two_requests() -> None:
    client = TestClient(create_rules_app(faults={"faults": [{"kind": 500, "count": 2}]}))
    responses = [ask(client, whole_request()) for _ in range(4)]
    assert [r.status_code for r in responses] == [500, 500, 200, 200]
    assert responses[0].json()["error"]["type"] == "server_error"


def test_after_skips_the_first_requests() -> None:
    plan = json.dumps({"faults": [{"kind": "500", "after": 2, "count": 1}]})
    client = TestClient(create_rules_app(faults=plan))
    assert statuses(client, whole_request(), 4) == [200, 200, 500, 200]


def test_rate_faults_repeat_with_their_seed() -> None:
    plan = {"faults": [{"kind": "500", "rate": 0.3, "seed": 7}]}
    runs = []
    for _ in range(2):
        client = TestClient(create_rules_app(faults=plan))
        runs.append(statuses(client, whole_request(), 40))
    assert runs[0] == runs[1]
    assert 4 <= runs[0].count(500) <= 20


def test_the_first_rule_that_fires_applies_and_later_rules_do_not_see_it() -> None:
    client = TestClient(create_rules_app())
    set_plan(client, {"faults": [{"kind": "500", "count": 1}, {"kind": "429", "every": 2}]})
    assert statuses(client, whole_request(), 5) == [500, 200, 429, 200, 429]
    rules_now = client.get("/admin/faults").json()["faults"]
    assert [(r["kind"], r["seen"], r["fired"]) for r in rules_now] == [
        ("500", 5, 1),
        ("429", 4, 2),
    ]


def test_hang_sleeps_then_answers() -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "hang", "seconds": 0.3, "count": 1}]))
    started = time.monotonic()
    response = ask(client, whole_request())
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert client.get("/admin/stats").json()["faults"]["hang"] == 1


def test_malformed_answers_are_not_json() -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "malformed"}]))
    request = whole_request()
    text = content(ask(client, request))
    with pytest.raises(CriticAnswerError, match="not valid JSON"):
        parse.parse_trajectory_answer(text, request.target_indices, DEFAULT_LABELS)


def test_truncated_answers_stop_for_length() -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "truncated"}]))
    request = one_step(2)
    choice = ask(client, request).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(CriticAnswerError, match="truncated"):
        parse.parse_step_answer(choice["message"]["content"], 2, DEFAULT_LABELS)


def test_wrong_count_drops_a_step_or_answers_another() -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "wrong_count"}]))
    request = whole_request()
    last = request.target_indices[-1]
    with pytest.raises(CriticAnswerError, match=f"^step {last} is missing$"):
        parse.parse_trajectory_answer(
            content(ask(client, request)), request.target_indices, DEFAULT_LABELS
        )
    with pytest.raises(CriticAnswerError, match="about step 5, but step 4 was asked for"):
        parse.parse_step_answer(content(ask(client, one_step(4))), 4, DEFAULT_LABELS)


def test_deleting_faults_restores_answers_and_keeps_latency() -> None:
    client = TestClient(create_rules_app())
    assert set_plan(client, {"latency_ms": 100, "faults": [{"kind": "500"}]}).status_code == 200
    assert statuses(client, whole_request(), 2) == [500, 500]
    cleared = client.delete("/admin/faults").json()
    assert cleared == {"latency_ms": 100, "faults": [], "batch_delay_s": 0.0, "batch_faults": []}
    started = time.monotonic()
    assert statuses(client, whole_request(), 1) == [200]
    assert time.monotonic() - started >= 0.1


@pytest.mark.parametrize(
    ("plan", "says"),
    [
        ({"faults": [{"kind": "404"}]}, "faults.0.kind"),
        ({"faults": [{"kind": "500", "every": 2, "rate": 0.5}]}, "either `every` or `rate`"),
        ({"faults": [{"kind": "500", "evry": 2}]}, "faults.0.evry"),
        ({"faults": [{"kind": "429", "rate": 1.5}]}, "faults.0.rate"),
        ({"fault": []}, "fault"),
    ],
)
def test_bad_fault_plans_are_rejected(plan: dict[str, Any], says: str) -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "500"}]))
    response = set_plan(client, plan)
    assert response.status_code == 422
    assert says in response.json()["error"]["message"]
    assert [r["kind"] for r in client.get("/admin/faults").json()["faults"]] == ["500"]


def test_serve_rules_refuses_a_bad_plan_before_serving() -> None:
    with pytest.raises(ValueError, match="invalid fault plan"):
        serve_rules(faults_json='{"faults": [{"kind": "teapot"}]}')


# ---------------------------------------------------------------------------- stats


def test_stats_count_requests_modes_faults_and_tokens() -> None:
    client = TestClient(create_rules_app(faults=[{"kind": "429", "count": 1}]))
    usages = []
    for request in (whole_request(), whole_request(), one_step(0), one_step(1)):
        response = ask(client, request)
        if response.status_code == 200:
            usages.append(response.json()["usage"])
    stats = client.get("/admin/stats").json()
    assert stats["requests"] == 4
    assert stats["completions"] == 3
    assert stats["by_mode"] == {"trajectory": 1, "step": 2}
    assert stats["faults"]["429"] == 1
    assert stats["steps_answered"] == len(whole_request().target_indices) + 2
    assert stats["tokens"] == {
        "prompt": sum(u["prompt_tokens"] for u in usages),
        "completion": sum(u["completion_tokens"] for u in usages),
        "cached": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages),
        "reasoning": sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages),
    }
    assert stats["tokens"]["cached"] > 0
    reset = client.post("/admin/stats/reset").json()
    assert reset["requests"] == 0
    assert reset["tokens"] == {"prompt": 0, "completion": 0, "cached": 0, "reasoning": 0}
    assert set(reset["faults"].values()) == {0}


# ---------------------------------------------------------------------------- a real server


def test_a_hung_request_times_out_and_frees_the_server() -> None:
    app = create_rules_app(faults=[{"kind": "hang", "seconds": 30, "count": 1}])
    with serving(app) as url:
        payload = body(whole_request())
        with httpx.Client(base_url=url, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=payload)
            assert client.post("/v1/chat/completions", json=payload).status_code == 200
            deadline = time.monotonic() + 5
            while client.get("/admin/stats").json()["in_flight"]:
                assert time.monotonic() < deadline, "the hung request was never let go"
                time.sleep(0.05)


def test_latency_does_not_block_concurrent_requests() -> None:
    app = create_rules_app(latency_ms=1000)
    payload = body(one_step(1))

    async def burst(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=payload) for _ in range(64))
            )
        return [r.status_code for r in responses]

    with serving(app) as url:
        assert asyncio.run(burst(url)) == [200] * 64
        stats = httpx.get(f"{url}/admin/stats").json()
    assert stats["max_in_flight"] == 64
    assert stats["completions"] == 64


def _sdk_answer(client: openai.OpenAI, request: CriticRequest) -> str:
    completion = client.chat.completions.create(  # type: ignore[call-overload]
        model="rules",
        messages=request.messages,
        response_format=request.response_format,
        temperature=0,
        max_tokens=request.max_completion_tokens,
    )
    return completion.choices[0].message.content or ""


def test_the_openai_sdk_labels_a_real_run_end_to_end() -> None:
    """Requests from prompt.py, sent by the official SDK to a real server, parsed by parse.py,
    give what rules.py prescribes: whole runs exactly, windows as their prompts show them."""
    app = create_rules_app(api_key="sk-e2e")
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-e2e", max_retries=0)
        expected = expected_labels()
        _, steps = real(SHORT_RUN)
        for step in steps:
            request = one_step(step.index)
            judgment = parse.parse_step_answer(
                _sdk_answer(client, request), step.index, DEFAULT_LABELS
            )
            assert judgment.label == expected[step.index]

        long_trajectory, long_steps = real(LONG_RUN)
        windows = prompt.trajectory_windows(
            long_trajectory.messages, long_steps, None, DEFAULT_LABELS, 16_000
        )
        assert len(windows) > 1
        labelled: dict[int, str] = {}
        for window in windows:
            judgments = parse.parse_trajectory_answer(
                _sdk_answer(client, window), window.target_indices, DEFAULT_LABELS
            )
            shown = rules.answer_prompt(rules.parse_prompt(window.messages))
            assert {i: j.label for i, j in judgments.items()} == {v.index: v.label for v in shown}
            labelled.update({i: j.label for i, j in judgments.items()})
        assert sorted(labelled) == list(range(len(long_steps)))
        prescribed = expected_labels(LONG_RUN)
        agree = sum(labelled[i] == prescribed[i] for i in labelled)
        assert agree >= 0.9 * len(prescribed)  # windows hide only a few distant repeats

        (whole,) = prompt.trajectory_windows(
            long_trajectory.messages, long_steps, None, DEFAULT_LABELS, 10**6
        )
        judgments = parse.parse_trajectory_answer(
            _sdk_answer(client, whole), whole.target_indices, DEFAULT_LABELS
        )
        assert {i: j.label for i, j in judgments.items()} == prescribed

        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-other", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            _sdk_answer(stranger, whole)

        headers = {"Authorization": "Bearer sk-e2e"}
        plan = {"faults": [{"kind": "429", "count": 1, "retry_after": 3}]}
        httpx.post(f"{url}/admin/faults", json=plan, headers=headers).raise_for_status()
        with pytest.raises(openai.RateLimitError) as limited:
            _sdk_answer(client, whole)
        assert limited.value.response.headers["retry-after"] == "3"
        stats = httpx.get(f"{url}/admin/stats", headers=headers).json()
    assert stats["by_mode"] == {"trajectory": len(windows) + 1, "step": len(steps)}
    assert stats["unauthorized"] == 1
