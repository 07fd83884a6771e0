"""The FastAPI application: routers, error rendering, health, start-up and shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import __version__
from app.auth import service as auth_service
from app.config import Settings, get_settings
from app.db import Database
from app.errors import InvalidJsonError, InvalidRequestError, SrftError
from app.exports.router import router as exports_router
from app.exports.router import trajectories_router as trajectory_deletion_router
from app.jobs.router import router as jobs_router
from app.metrics import router as metrics_router
from app.middleware import RequestGuard, error_response
from app.review.evaluation_router import comparisons_router
from app.review.evaluation_router import router as evaluation_router
from app.review.router import human_labels_router
from app.review.router import router as review_router
from app.review.ui import router as review_ui_router
from app.trajectories.router import router as trajectories_router
from app.trajectories.router import uploads_router

log = logging.getLogger("srft")


async def _srft_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SrftError)
    return error_response(exc)


def _field_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[Any] = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        # The guard parses JSON bodies first; this is only a backstop with the same shape.
        return error_response(
            InvalidJsonError(
                f"malformed JSON: {first.get('ctx', {}).get('error')}", location="body"
            )
        )
    message = "; ".join(f"{_field_location(e.get('loc', ()))}: {e.get('msg')}" for e in errors)
    return error_response(
        InvalidRequestError(
            message or "invalid request", location=_field_location(first.get("loc", ())) or None
        )
    )


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error = SrftError(str(exc.detail), code=_HTTP_CODES.get(exc.status_code, "http_error"))
    error.status_code = exc.status_code
    return error_response(error, headers=dict(exc.headers or {}))


def create_app(settings: Settings | None = None, database: Database | None = None) -> FastAPI:
    """Build the app. Tests pass their own settings and database; `srft serve` passes none."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owns_database = database is None
        app.state.database = database or Database(settings.database_url)
        if owns_database:
            _bootstrap(app.state.database, settings)
        worker = None
        if settings.embedded_worker and owns_database:
            from app.worker.embedded import EmbeddedWorker

            worker = EmbeddedWorker()
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
            if owns_database:
                app.state.database.dispose()

    app = FastAPI(
        title="srft",
        version=__version__,
        summary="Critic labeling service for Step Rejection Fine-Tuning.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if database is not None:
        app.state.database = database
    app.add_exception_handler(SrftError, _srft_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Outermost of ours: bounds bodies before any route reads them and turns what no handler
    # took into a JSON error without dropping the connection.
    app.add_middleware(RequestGuard)
    app.include_router(trajectories_router)
    app.include_router(uploads_router)
    app.include_router(jobs_router)
    app.include_router(exports_router)
    app.include_router(trajectory_deletion_router)
    app.include_router(review_router)
    app.include_router(review_ui_router)
    app.include_router(evaluation_router)
    app.include_router(comparisons_router)
    app.include_router(human_labels_router)
    app.include_router(metrics_router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """The database and the broker are reachable."""
        checks = {
            "database": _check(request.app.state.database.ping),
            "broker": _check(lambda: _ping_broker(settings.broker_url)),
        }
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(
            status_code=200 if ready else 503,
            content={"status": "ready" if ready else "unavailable", "checks": checks},
        )

    return app


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as exc:  # a readiness probe reports every failure, it never raises
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def _ping_broker(url: str) -> None:
    from app.broker import ping_broker

    ping_broker(url)


def _bootstrap(database: Database, settings: Settings) -> None:
    """On an empty database, create project `default` and print its key, once."""
    try:
        with database.transaction() as session:
            new_key = auth_service.bootstrap(session, settings.bootstrap_api_key)
    except IntegrityError:
        # Another server process (`srft serve --workers N`) bootstrapped at the same moment.
        return
    if new_key is not None and settings.bootstrap_api_key:
        print(
            "srft: created project 'default' with the key from SRFT_BOOTSTRAP_API_KEY", flush=True
        )
    elif new_key is not None:
        print(
            "\nsrft: created project 'default'. Its API key is shown only this once:\n"
            f"    {new_key.key}\n"
            "Use it as 'Authorization: Bearer <key>' (or SRFT_API_KEY for the CLI).\n",
            flush=True,
        )
