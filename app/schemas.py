"""Building blocks of request bodies, shared by every feature's `schemas.py`.

Every request body is a `RequestModel`: an unknown field is refused with its location (a typo
must not be silently ignored), and types are strict (`"yes"` or `1` is not `true`, `"5"` is
not `5`). Every string has a length bound and every integer a range, so nothing a client sends
can overflow a column or a 64-bit integer downstream.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

# 64-bit signed integers: what the database and numpy hold.
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# JSON has no UUID type: ids arrive as strings, which strict mode would refuse.
Id = Annotated[uuid.UUID, Field(strict=False)]
# A short name: a label, a format, a model, a tokenizer revision.
Name = Annotated[str, Field(min_length=1, max_length=200)]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_json`.")
    message: str = Field(description="What was wrong, for a person.")
    location: str | None = Field(
        description="Where: `line 3, column 5`, `body.critic.votes`, `query.cursor`, ..."
    )
    details: Any = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error statuses, all with the error body."""
    described = {
        400: "The body is not valid JSON (or not valid UTF-8).",
        401: "Missing, malformed or revoked API key.",
        403: "Refused (a cross-origin request to the review pages).",
        404: "No such resource in the caller's project.",
        409: "The resource is not in a state that allows this.",
        413: "The body is larger than this endpoint accepts.",
        416: "The requested byte range is outside the file.",
        422: "A field is missing, mistyped, out of range, or names something unknown.",
        503: "The database is unavailable; retry after `Retry-After` seconds.",
    }
    return {status: {"model": ErrorBody, "description": described[status]} for status in statuses}


# Every authenticated route can answer these.
COMMON_ERRORS = error_responses(400, 401, 413, 422, 503)
