"""The critic client's reading of what a server says about waiting."""

from __future__ import annotations

import pytest

from app.retry import MAX_RETRY_AFTER_S, retry_after_s


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "86400"}, MAX_RETRY_AFTER_S),
        ({"retry-after": "9" * 5000}, None),
        ({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_finite_and_bounded(headers: dict[str, str], wait: float | None) -> None:
    assert retry_after_s(headers) == wait
