"""Request dependencies: the database session (owns the transaction) and the caller's project."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.config import Settings
from app.db import Database


def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One session per request. Write routes commit before answering (so a 2xx means stored);
    anything left uncommitted is rolled back, and an error rolls everything back."""
    session = database.sessions()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def get_project_id(
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> uuid.UUID:
    return auth_service.authenticate(session, authorization)


def get_caller(
    session: Annotated[Session, Depends(get_session)],
    authorization: Annotated[str | None, Header()] = None,
) -> auth_service.Caller:
    key = auth_service.authenticate_key(session, authorization)
    return auth_service.Caller(key.project_id, key.name)


SessionDep = Annotated[Session, Depends(get_session)]
CallerDep = Annotated[auth_service.Caller, Depends(get_caller)]
ProjectDep = Annotated[uuid.UUID, Depends(get_project_id)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
