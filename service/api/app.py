"""The dashboard application factory: ``create_app(settings) -> FastAPI``.

Run it with ``uvicorn --factory`` through :func:`serve` (or ``synthperf serve``); tests call
``create_app`` with their own settings. The app reads the job store, enqueues work by task name,
and never imports the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError, ProgrammingError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from common.config import Settings, get_settings
from common.jobstore.db import session_scope
from common.jobstore.models import User
from service.api import routes_api, routes_ops, routes_pages, routes_shadow  # issue 17: routes_shadow
from service.api.actions import Enqueuer
from service.api.auth import LoginLimiter, ensure_first_admin, session_secret
from service.api.deps import LoginRequired
from service.api.metrics import make_registry
from service.api.templating import templates

log = logging.getLogger("synthperf.api")
HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "synthperf_session"


def _bootstrap(settings: Settings) -> None:
    """Create the first admin from SYNTHPERF_ADMIN_PASSWORD (local mode), if the schema exists."""
    try:
        with session_scope(settings.effective_database_url) as db:
            created = ensure_first_admin(db, settings)
            no_users = settings.auth_mode == "local" and not db.scalar(select(func.count(User.id)))
        if created:
            log.info("created first admin user %r from SYNTHPERF_ADMIN_PASSWORD", created)
        elif no_users:
            log.warning("no dashboard account exists: create one with 'synthperf users add NAME --role admin' "
                        "(password on stdin) or set SYNTHPERF_ADMIN_PASSWORD and restart")
    except (OperationalError, ProgrammingError) as exc:
        log.error("job store not initialised (run the migrations: synthperf serve does): %s", exc)


def create_app(settings: Settings) -> FastAPI:
    """The dashboard and JSON API over the job store described by ``settings``."""
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a common.config.Settings, not {type(settings).__name__}")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        _bootstrap(settings)
        yield

    app = FastAPI(
        title="synthperf dashboard API",
        version="1",
        description="Jobs, studies, deliveries and system status of synthperf. Research software: "
        "every output is SYNTHETIC and NOT FOR DIAGNOSTIC USE. Log in with POST /login (form) or "
        "through the trusted proxy; writes need the X-CSRF-Token header from GET /api/me.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI would load scripts from a CDN: not on a hospital network
        redoc_url=None,
    )
    app.dependency_overrides[get_settings] = lambda: settings
    app.state.settings = settings
    app.state.enqueuer = Enqueuer(settings)
    app.state.login_limiter = LoginLimiter(settings.login_max_failures, settings.login_window_s,
                                           settings.login_max_failures_per_ip)
    app.state.metrics_registry = make_registry(settings)

    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.cookie_secure,
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        )
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginRequired)
    async def _login_redirect(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return templates.TemplateResponse(
            request, "error.html", {"status": exc.status_code, "message": exc.detail, "user": None},
            status_code=exc.status_code, headers=exc.headers,
        )

    app.include_router(routes_ops.router)
    app.include_router(routes_api.router)
    app.include_router(routes_pages.router)
    app.include_router(routes_shadow.router)  # issue 17: shadow validation page and API
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def _wants_json(request: Request) -> bool:
    path = request.url.path
    if path.startswith("/api/") or path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        return True
    return "application/json" in request.headers.get("accept", "") and "text/html" not in request.headers.get("accept", "")


def serve(settings: Settings) -> None:
    """Run the dashboard with uvicorn on settings.api_host:api_port (blocking)."""
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_level=settings.log_level.lower(), proxy_headers=settings.auth_mode == "proxy")
