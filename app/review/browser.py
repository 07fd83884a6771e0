"""Signing in from a browser: the review pages' session cookie and same-origin checks.

A page accepts `Authorization: Bearer <key>` or the `srft_ui_session` cookie that
`POST /ui/login` sets: the random token of a server-side session (never the key, see
`service.start_ui_session`), HttpOnly, SameSite=Strict, path /ui, expiring with the session.
Every state-changing request that a page of another origin made the browser send is refused
(`refuse_cross_origin`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.config import Settings
from app.deps import SessionDep
from app.errors import ForbiddenError, UnauthorizedError

COOKIE = "srft_ui_session"
# Earlier versions kept the raw API key in this cookie; sign-in and sign-out clear it.
LEGACY_COOKIE = "srft_ui_key"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Sec-Fetch-Site values of a request the page itself (or the user, typing a URL) made.
OWN_FETCH_SITES = frozenset({"same-origin", "none"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, the default port filled in; None if it is no
    http(s) origin (`null`, garbage)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]


def refuse_cross_origin(request: Request) -> None:
    """Refuse a state-changing request that a page of another origin made the browser send.

    SameSite=Strict keeps the cookie off cross-site requests, but not off same-site ones
    (another port or subdomain of the host), and a forged sign-in needs no cookie at all: it
    would swap the reviewer's session for the attacker's, and later labels would land in the
    attacker's project. Browsers say where a request comes from in Sec-Fetch-Site and Origin;
    a request with neither (curl, a script) came from no page and passes.
    """
    if request.method not in UNSAFE_METHODS:
        return
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in OWN_FETCH_SITES:
        raise ForbiddenError(
            f"cross-origin request refused: Sec-Fetch-Site is {fetch_site[:40]!r}",
            location="header.Sec-Fetch-Site",
        )
    origin = request.headers.get("origin")
    # Behind a proxy, request.url is the public address when the proxy passes Host on and
    # uvicorn trusts its X-Forwarded-Proto (--proxy-headers --forwarded-allow-ips).
    own = _origin(f"{request.url.scheme}://{request.url.netloc}")
    if origin is not None and (own is None or _origin(origin) != own):
        raise ForbiddenError(
            f"cross-origin request refused: Origin {origin[:100]!r} is not this site",
            location="header.Origin",
        )


def _key_caller(session: Session, request: Request) -> auth_service.Caller | None:
    """The caller named by the Authorization header, else by the session cookie; None if
    neither names a valid key or live session."""
    authorization = request.headers.get("authorization")
    if authorization:
        try:
            key = auth_service.authenticate_key(session, authorization)
        except UnauthorizedError:
            return None
        return auth_service.Caller(key.project_id, key.name)
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    found = auth_service.ui_session_key(session, token)
    if found is None:
        return None  # an expired or revoked session was deleted; the request commits that
    return auth_service.Caller(found.project_id, found.name)


def cookie_secure(request: Request, settings: Settings) -> bool:
    if settings.cookie_secure is not None:
        return settings.cookie_secure
    return request.url.scheme == "https"


def get_ui_caller(request: Request, session: SessionDep) -> auth_service.Caller | None:
    return _key_caller(session, request)


UiCallerDep = Annotated[auth_service.Caller | None, Depends(get_ui_caller)]


def require_ui_caller(request: Request, session: SessionDep) -> auth_service.Caller:
    caller = _key_caller(session, request)
    if caller is None:
        raise UnauthorizedError("sign in at /ui/ or send 'Authorization: Bearer <key>'")
    return caller
