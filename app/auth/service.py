"""Projects, API keys and review UI sessions.

A key is shown once at creation; only its sha256 is stored. A review UI session is the same
idea for the browser: its random token lives in the cookie, its sha256 in `ui_sessions`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.errors import UnauthorizedError
from app.models import ApiKey, Project, UiSession, utcnow

KEY_PREFIX = "srft_"
DEFAULT_PROJECT = "default"


@dataclass(frozen=True)
class NewKey:
    project_id: uuid.UUID
    project_name: str
    key_id: uuid.UUID
    key: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def get_or_create_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(
    session: Session, name: str, *, project_name: str = DEFAULT_PROJECT, key: str | None = None
) -> NewKey:
    """Create an API key for `project_name` (created if missing) and return it in clear once."""
    project = get_or_create_project(session, project_name)
    key = key or generate_key()
    row = ApiKey(project_id=project.id, name=name, prefix=key[:12], key_hash=hash_key(key))
    session.add(row)
    session.flush()
    return NewKey(project.id, project.name, row.id, key)


def bootstrap(session: Session, key: str | None = None) -> NewKey | None:
    """On an empty database, create project `default` with one key; otherwise do nothing."""
    if session.scalar(select(func.count()).select_from(Project)):
        return None
    return create_key(session, "bootstrap", key=key)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's project, and the key's name (recorded as an author)."""

    project_id: uuid.UUID
    name: str


def authenticate(session: Session, authorization: str | None) -> uuid.UUID:
    """The project id for an `Authorization: Bearer <key>` header, or 401."""
    return authenticate_key(session, authorization).project_id


def authenticate_key(session: Session, authorization: str | None) -> ApiKey:
    """The API key row for an `Authorization: Bearer <key>` header, or 401."""
    if not authorization:
        raise UnauthorizedError(
            "missing API key: send 'Authorization: Bearer <key>'", location="header.Authorization"
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnauthorizedError(
            "malformed Authorization header: expected 'Bearer <key>'",
            location="header.Authorization",
        )
    found = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None))
    )
    if found is None:
        raise UnauthorizedError("invalid or revoked API key", location="header.Authorization")
    return found


def start_ui_session(session: Session, key: ApiKey, ttl_s: int) -> str:
    """Open a review UI session for `key` that lasts `ttl_s` seconds; return its token, in
    clear this once."""
    now = utcnow()
    # The key's sessions that expired without being presented again go now.
    session.execute(
        delete(UiSession).where(UiSession.api_key_id == key.id, UiSession.expires_at <= now)
    )
    token = secrets.token_urlsafe(32)
    session.add(
        UiSession(
            api_key_id=key.id,
            token_hash=hash_key(token),
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
    )
    session.flush()
    return token


def ui_session_key(session: Session, token: str) -> ApiKey | None:
    """The API key of the live session with this token, else None. A session that expired or
    whose key was revoked is deleted here."""
    found = session.execute(
        select(UiSession, ApiKey)
        .join(ApiKey, UiSession.api_key_id == ApiKey.id)
        .where(UiSession.token_hash == hash_key(token))
    ).first()
    if found is None:
        return None
    ui_session, key = found
    if key.revoked_at is not None or _as_utc(ui_session.expires_at) <= utcnow():
        session.delete(ui_session)
        session.flush()
        return None
    return key


def end_ui_session(session: Session, token: str) -> None:
    """Delete the session with this token (sign-out): the cookie no longer signs anyone in."""
    session.execute(delete(UiSession).where(UiSession.token_hash == hash_key(token)))
    session.flush()


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back the stored UTC time without its zone.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
