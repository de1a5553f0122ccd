"""FastAPI dependencies: settings, a job-store session, the current principal, CSRF.

Settings come from ``common.config.get_settings``; ``create_app(settings)`` overrides that
dependency, so tests and processes inject their own settings without environment tricks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from common.config import Settings, get_settings
from common.jobstore.db import session_factory
from service.api.auth import (
    CSRF_HEADER,
    Principal,
    csrf_ok,
    principal_from_headers,
    principal_from_session,
)

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_db(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; commits are explicit in the write paths (actions, login)."""
    session = session_factory(settings.effective_database_url)()
    try:
        yield session
    finally:
        session.close()


DbDep = Annotated[Session, Depends(get_db)]


class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def optional_principal(request: Request, settings: SettingsDep, db: DbDep) -> Principal | None:
    if settings.auth_mode == "proxy":
        return principal_from_headers(settings, request.headers)
    return principal_from_session(db, request.session)


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


def api_principal(principal: OptionalPrincipal) -> Principal:
    if principal is None:
        raise HTTPException(status_code=401, detail="log in first (POST /login, or through the proxy)")
    return principal


def page_principal(principal: OptionalPrincipal, settings: SettingsDep) -> Principal:
    if principal is None:
        if settings.auth_mode == "proxy":  # no login page of ours to send them to
            raise HTTPException(status_code=401, detail="the reverse proxy sent no user; open the dashboard through it")
        raise LoginRequired()
    return principal


ApiUser = Annotated[Principal, Depends(api_principal)]
PageUser = Annotated[Principal, Depends(page_principal)]


def api_admin(principal: ApiUser) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status_code=403, detail="this action needs the admin role")
    return principal


ApiAdmin = Annotated[Principal, Depends(api_admin)]


def page_admin(principal: PageUser) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status_code=403, detail="this action needs the admin role")
    return principal


PageAdmin = Annotated[Principal, Depends(page_admin)]


def require_csrf_header(request: Request, _user: ApiUser) -> None:
    """JSON API writes: the X-CSRF-Token header must equal the session's token (GET /api/me gives it)."""
    if not csrf_ok(request.session, request.headers.get(CSRF_HEADER)):
        raise HTTPException(
            status_code=403,
            detail=f"missing or wrong {CSRF_HEADER} header; read csrf_token from GET /api/me and send it back",
        )


CsrfHeader = Depends(require_csrf_header)
