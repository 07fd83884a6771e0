"""Fixtures of the review tests: `srft` commands against the test's app."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from app.cli import client as cli_client
from tests.conftest import Caller


@pytest.fixture
def cli(client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """`srft` commands talk to the test's app in-process (on the test's session), with the
    caller's key."""

    def forward(request: httpx.Request) -> httpx.Response:
        answer = client.request(
            request.method,
            request.url.raw_path.decode(),
            headers={**caller.headers, "Content-Type": request.headers.get("content-type", "")},
            content=request.content,
        )
        kind = answer.headers.get("content-type", "")
        return httpx.Response(
            answer.status_code, headers={"Content-Type": kind}, content=answer.content
        )

    def in_process(url: str, api_key: str, timeout: float) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(forward), base_url="http://srft")

    monkeypatch.setattr(cli_client, "_client", in_process)
