"""Server-rendered pages: login, jobs list, job detail, system, audit; form actions with CSRF.

Live status: the pages poll small HTML fragments (/partials/...) every few seconds with a few
lines of our own JavaScript (static/app.js); without JavaScript they still work, just not live.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select

from common.jobstore import dashboard_queries as dq
from common.jobstore.models import User
from service.api import actions
from service.api.auth import (
    CSRF_FORM_FIELD,
    Principal,
    authenticate,
    csrf_ok,
    csrf_token,
)
from service.api.deps import DbDep, OptionalPrincipal, PageAdmin, PageUser, SettingsDep, client_ip
from service.api.templating import templates
from service.api.views import list_previews, mask_job, mask_study, system_view

router = APIRouter(include_in_schema=False)

JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
FLASH_KEY = "flash"


def _render(request: Request, name: str, user: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
    flash = request.session.pop(FLASH_KEY, None) if "partials" not in name else None
    ctx.update(user=user, csrf=csrf_token(request.session), flash=flash, request_path=request.url.path)
    return templates.TemplateResponse(request, name, ctx, status_code=status)


def _flash(request: Request, kind: str, text: str) -> None:
    request.session[FLASH_KEY] = {"kind": kind, "text": text}


def _check_form_csrf(request: Request, token: str | None) -> None:
    if not csrf_ok(request.session, token):
        raise HTTPException(status_code=403, detail="This form has expired (security token missing or wrong). "
                            "Go back, reload the page and try again.")


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


# --------------------------------------------------------------------------- login / logout


@router.get("/login")
def login_form(request: Request, settings: SettingsDep, db: DbDep, user: OptionalPrincipal,
               next: Annotated[str | None, Query(max_length=500)] = None) -> Response:
    if settings.auth_mode == "proxy" or user is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _render(request, "login.html", None, next=_safe_next(next), error=None, no_users=_no_users(db))


def _no_users(db: Any) -> bool:
    return not db.scalar(select(func.count(User.id)))


@router.post("/login")
def login(
    request: Request,
    settings: SettingsDep,
    db: DbDep,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf_token_: Annotated[str | None, Form(alias=CSRF_FORM_FIELD)] = None,
    next: Annotated[str | None, Form(max_length=500)] = None,
) -> Response:
    if settings.auth_mode == "proxy":
        raise HTTPException(status_code=404, detail="login is handled by the reverse proxy")
    _check_form_csrf(request, csrf_token_)
    ip = client_ip(request)
    limiter = request.app.state.login_limiter
    wait = limiter.retry_after(ip, username)
    if wait > 0:
        actions.audit(db, None, "login_blocked", f"user:{username[:64]}", {"retry_after_s": round(wait)}, ip)
        db.commit()
        resp = _render(request, "login.html", None, status=429, next=_safe_next(next),
                       error=f"Too many failed logins. Wait {int(wait) + 1} s and try again, or ask an admin.")
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    user = authenticate(db, username, password)
    if user is None:
        limiter.failed(ip, username)
        actions.audit(db, None, "login_failed", f"user:{username[:64]}", None, ip)
        db.commit()
        return _render(request, "login.html", None, status=401, next=_safe_next(next),
                       error="Wrong username or password (or the account is disabled).")
    limiter.succeeded(username)
    request.session.clear()  # fresh session: no fixation, new CSRF token
    request.session["user"] = user.username
    csrf_token(request.session)
    actions.audit(db, Principal(user.username, user.role, "local"), "login", f"user:{user.username}", None, ip)
    db.commit()
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, db: DbDep, user: OptionalPrincipal,
           csrf_token_: Annotated[str | None, Form(alias=CSRF_FORM_FIELD)] = None) -> Response:
    _check_form_csrf(request, csrf_token_)
    if user is not None:
        actions.audit(db, user, "logout", f"user:{user.username}", None, client_ip(request))
        db.commit()
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --------------------------------------------------------------------------- jobs list


def _filters(state: str | None, calling_aet: str | None, accession: str | None, date_from: str | None,
             date_to: str | None, page: int) -> tuple[dq.JobFilter, dict[str, str], str | None]:
    """A JobFilter from query strings; bad values are dropped with a message instead of a 422 page."""
    problems = []
    if state and state != "active" and state not in dq.ALL_JOB_STATES:
        problems.append(f"unknown state {state!r}")
        state = None

    def _date(text: str | None, label: str) -> date | None:
        if not text:
            return None
        try:
            return date.fromisoformat(text)
        except ValueError:
            problems.append(f"{label} {text!r} is not a date (YYYY-MM-DD)")
            return None

    d_from, d_to = _date(date_from, "from"), _date(date_to, "to")
    limit = 50
    flt = dq.JobFilter(state=state or None, calling_aet=(calling_aet or None), accession=(accession or None),
                       date_from=d_from, date_to=d_to, limit=limit, offset=max(0, page - 1) * limit)
    raw = {k: v for k, v in {"state": state, "calling_aet": calling_aet, "accession": accession,
                              "date_from": date_from if d_from else None,
                              "date_to": date_to if d_to else None}.items() if v}
    return flt, raw, ("; ".join(problems) or None)


FilterQ = Annotated[str | None, Query(max_length=64)]


def _jobs_context(db: Any, settings: Any, user: Principal, state: str | None, calling_aet: str | None,
                  accession: str | None, date_from: str | None, date_to: str | None, page: int) -> dict[str, Any]:
    flt, raw, problem = _filters(state, calling_aet, accession, date_from, date_to, page)
    total, rows = dq.list_jobs(db, flt)
    return dict(
        jobs=[mask_job(r, user) for r in rows], total=total, page=page, pages=max(1, -(-total // flt.limit)),
        filters=raw, query=urlencode(raw), problem=problem, states=("active", *dq.ALL_JOB_STATES),
        aets=dq.calling_aets(db), counts=dq.studies_by_state(db),
        receiving=_receiving(db, settings, user) if page == 1 else [],
    )


@router.get("/")
def jobs_page(request: Request, db: DbDep, settings: SettingsDep, user: PageUser, state: FilterQ = None,
              calling_aet: FilterQ = None, accession: FilterQ = None, date_from: FilterQ = None,
              date_to: FilterQ = None, page: Annotated[int, Query(ge=1, le=10000)] = 1) -> Response:
    ctx = _jobs_context(db, settings, user, state, calling_aet, accession, date_from, date_to, page)
    return _render(request, "jobs.html", user, **ctx)


@router.get("/partials/jobs")
def jobs_partial(request: Request, db: DbDep, settings: SettingsDep, user: PageUser, state: FilterQ = None,
                 calling_aet: FilterQ = None, accession: FilterQ = None, date_from: FilterQ = None,
                 date_to: FilterQ = None, page: Annotated[int, Query(ge=1, le=10000)] = 1) -> Response:
    ctx = _jobs_context(db, settings, user, state, calling_aet, accession, date_from, date_to, page)
    return _render(request, "partials/jobs_live.html", user, **ctx)


def _receiving(db: Any, settings: Any, user: Principal) -> list[dict[str, Any]]:
    window = settings.completion_ceiling_s + settings.stable_age_s
    return [{**r, "study": mask_study(r["study"], user)} for r in dq.receiving_studies(db, window)]


# --------------------------------------------------------------------------- job detail


def _detail_or_404(db: Any, settings: Any, user: Principal, job_id: int) -> dict[str, Any]:
    d = dq.job_detail(db, job_id)
    if d is None:
        raise HTTPException(status_code=404, detail=f"There is no job {job_id} (it may have been deleted).")
    d["previews"] = list_previews(settings, d["output_dir"])
    return mask_job(d, user)


@router.get("/jobs/{job_id}")
def job_page(job_id: JobId, request: Request, db: DbDep, settings: SettingsDep, user: PageUser) -> Response:
    job = _detail_or_404(db, settings, user, job_id)
    return _render(request, "job.html", user, job=job, stages=dq.PIPELINE_STAGES)


@router.get("/partials/jobs/{job_id}")
def job_partial(job_id: JobId, request: Request, db: DbDep, settings: SettingsDep, user: PageUser) -> Response:
    job = _detail_or_404(db, settings, user, job_id)
    return _render(request, "partials/job_status.html", user, job=job)


@router.get("/jobs/{job_id}/delete")
def delete_confirm(job_id: JobId, request: Request, db: DbDep, settings: SettingsDep, user: PageAdmin) -> Response:
    job = _detail_or_404(db, settings, user, job_id)
    return _render(request, "delete.html", user, job=job)


def _run_action(request: Request, db: Any, user: Principal, job_id: int, name: str, fn: Any,
                ok_text: str, back: str | None = None) -> Response:
    ip = client_ip(request)
    try:
        actions.deny_unless_admin(db, user, name, f"job:{job_id}", ip)
        fn()
    except actions.ActionError as exc:
        if exc.status in (403, 404):
            raise HTTPException(status_code=exc.status, detail=exc.message) from exc
        _flash(request, "error", exc.message)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)
    _flash(request, "ok", ok_text)
    return RedirectResponse(back or f"/jobs/{job_id}", status_code=303)


CsrfForm = Annotated[str | None, Form(alias=CSRF_FORM_FIELD)]


@router.post("/jobs/{job_id}/retry")
def retry_form(job_id: JobId, request: Request, db: DbDep, user: PageUser, csrf_token_: CsrfForm = None,
               stage: Annotated[str, Form(max_length=32)] = "classify") -> Response:
    _check_form_csrf(request, csrf_token_)
    enq = request.app.state.enqueuer
    return _run_action(request, db, user, job_id, "retry",
                       lambda: actions.retry_from_stage(db, enq, user, job_id, stage, client_ip(request)),
                       f"Job {job_id} queued again from stage {stage}.")


@router.post("/jobs/{job_id}/repush")
def repush_form(job_id: JobId, request: Request, db: DbDep, user: PageUser, csrf_token_: CsrfForm = None,
                only_unsent: Annotated[bool, Form()] = False) -> Response:
    _check_form_csrf(request, csrf_token_)
    enq = request.app.state.enqueuer
    counted: list[int] = []
    resp = _run_action(request, db, user, job_id, "repush",
                       lambda: counted.append(actions.repush(db, enq, user, job_id, client_ip(request), only_unsent)),
                       f"Job {job_id}: objects queued to be sent to PACS again.")
    if counted:
        _flash(request, "ok", f"Job {job_id}: {counted[0]} object(s) queued to be sent to PACS again.")
    return resp


@router.post("/jobs/{job_id}/cancel")
def cancel_form(job_id: JobId, request: Request, db: DbDep, user: PageUser, csrf_token_: CsrfForm = None) -> Response:
    _check_form_csrf(request, csrf_token_)
    return _run_action(request, db, user, job_id, "cancel",
                       lambda: actions.cancel(db, user, job_id, client_ip(request)),
                       f"Job {job_id}: cancel requested.")


@router.post("/jobs/{job_id}/delete")
def delete_form(job_id: JobId, request: Request, db: DbDep, settings: SettingsDep, user: PageUser,
                csrf_token_: CsrfForm = None, confirm: Annotated[str, Form(max_length=32)] = "",
                purge_study: Annotated[bool, Form()] = False) -> Response:
    _check_form_csrf(request, csrf_token_)
    ip = client_ip(request)
    try:
        actions.deny_unless_admin(db, user, "delete", f"job:{job_id}", ip)
        actions.delete_job(db, settings, user, job_id, confirm, purge_study, ip)
    except actions.ActionError as exc:
        if exc.status in (403, 404):
            raise HTTPException(status_code=exc.status, detail=exc.message) from exc
        _flash(request, "error", exc.message)
        return RedirectResponse(f"/jobs/{job_id}/delete", status_code=303)
    _flash(request, "ok", f"Job {job_id} deleted" + (" with the study's received files." if purge_study else "."))
    return RedirectResponse("/", status_code=303)


# --------------------------------------------------------------------------- system, audit


@router.get("/system")
def system_page(request: Request, db: DbDep, settings: SettingsDep, user: PageUser) -> Response:
    return _render(request, "system.html", user, sys=system_view(db, settings, request.app.state.enqueuer.celery()))


@router.get("/audit")
def audit_page(request: Request, db: DbDep, user: PageAdmin,
               page: Annotated[int, Query(ge=1, le=10000)] = 1) -> Response:
    return _render(request, "audit.html", user, entries=dq.audit_log(db, limit=100, offset=(page - 1) * 100),
                   page=page)
