"""One error base class for everything a caller can get wrong.

Pure modules (importers, parsers) raise these too, so this file imports nothing from the web
stack; `app.main` renders them as `{"error": {"code", "message", "location"}}`.
"""

from __future__ import annotations

from typing import Any


class SrftError(Exception):
    """An error with a stable machine code, a human message and, where it applies, a location."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        location: str | None = None,
        code: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.location = location
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "location": self.location,
        }
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}

    def __str__(self) -> str:
        return f"{self.message} (at {self.location})" if self.location else self.message


class InternalError(SrftError):
    """A bug of ours: the request was not applied."""

    status_code = 500
    code = "internal_error"


class InvalidRequestError(SrftError):
    """A field of the request (path, query, header or body) is missing, mistyped or out of
    range; the location names it (`body.critic.votes`, `query.limit`)."""

    status_code = 422
    code = "validation_error"


class InvalidJsonError(SrftError):
    status_code = 400
    code = "invalid_json"


class InvalidEncodingError(SrftError):
    status_code = 400
    code = "invalid_encoding"


class InvalidParquetError(SrftError):
    """A Parquet body that cannot be read, or a value in it that JSON cannot carry."""

    status_code = 400
    code = "invalid_parquet"


class UnsupportedMediaTypeError(SrftError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidTrajectoryError(SrftError):
    """The content parsed, but is not a valid run of the named format."""

    status_code = 422
    code = "invalid_trajectory"


class UnknownFormatError(SrftError):
    status_code = 422
    code = "unknown_format"


class NoStepsError(SrftError):
    status_code = 422
    code = "no_steps"


class PayloadTooLargeError(SrftError):
    status_code = 413
    code = "payload_too_large"


class UnauthorizedError(SrftError):
    status_code = 401
    code = "unauthorized"


class NotFoundError(SrftError):
    status_code = 404
    code = "not_found"


class ConflictError(SrftError):
    status_code = 409
    code = "conflict"


class ForbiddenError(SrftError):
    status_code = 403
    code = "forbidden"


class InvalidCursorError(SrftError):
    status_code = 422
    code = "invalid_cursor"


class RangeNotSatisfiableError(SrftError):
    status_code = 416
    code = "range_not_satisfiable"


class DatabaseUnavailableError(SrftError):
    """The database cannot be reached right now; the same request may succeed shortly."""

    status_code = 503
    code = "database_unavailable"
