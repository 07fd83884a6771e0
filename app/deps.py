"""Request dependencies: the database session (owns the transaction) and the caller's project."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.config import Settings
from app.db import Database, unit_of_work


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One unit of work per request: committed when the handler returns without an error,
    before the response is sent (so a 2xx means stored and a failed commit is an error
    response), then its after-commit steps run (queueing tasks); any error rolls it all back
    and nothing is queued. Routes never commit themselves."""
    with database.sessions() as session, unit_of_work(session):
        yield session


# scope="function": the unit of work ends when the handler returns, before the response is
# sent (the default scope would commit after it, where a failure can no longer be reported).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_project_id(
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> uuid.UUID:
    return auth_service.authenticate(session, authorization)


def get_caller(
    session: SessionDep,
    authorization: Annotated[str | None, Header()] = None,
) -> auth_service.Caller:
    key = auth_service.authenticate_key(session, authorization)
    return auth_service.Caller(key.project_id, key.name)


CallerDep = Annotated[auth_service.Caller, Depends(get_caller)]
ProjectDep = Annotated[uuid.UUID, Depends(get_project_id)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
