"""The JSON API under /api: everything the pages show, and the same actions (CSRF by header)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from common.jobstore import dashboard_queries as dq
from service.api import actions
from service.api.auth import csrf_token
from service.api.deps import ApiAdmin, ApiUser, CsrfHeader, DbDep, SettingsDep, client_ip
from service.api.schemas import (
    ActionOut,
    AuditOut,
    DeleteIn,
    JobDetail,
    JobList,
    Me,
    RepushIn,
    RetryIn,
    StudyOut,
    SystemOut,
)
from service.api.views import list_previews, mask_job, mask_study, preview_path, rendered_preview, system_view


class Problem(BaseModel):
    detail: Any = Field(description="What went wrong, in words; for 422 the invalid fields")


router = APIRouter(
    prefix="/api",
    tags=["api"],
    responses={
        400: {"model": Problem, "description": "the request makes no sense for this job (e.g. wrong confirmation)"},
        401: {"model": Problem, "description": "not logged in"},
        403: {"model": Problem, "description": "admin role or CSRF token needed"},
        404: {"model": Problem, "description": "no such job or file"},
        409: {"model": Problem, "description": "the job's state does not allow this now"},
        503: {"model": Problem, "description": "the broker could not take the task"},
    },
)

StateFilter = Literal[
    "active", "queued", "running", "delivering", "done", "failed", "input_missing", "cancelled", "superseded"
]
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _enqueuer(request: Request) -> actions.Enqueuer:
    return request.app.state.enqueuer


def _fail(exc: actions.ActionError) -> HTTPException:
    return HTTPException(status_code=exc.status, detail=exc.message)


@router.get("/me", response_model=Me, summary="Who am I, my role, and the CSRF token for writes")
def me(request: Request, user: ApiUser) -> Me:
    return Me(username=user.username, role=user.role, via=user.via, sees_identifiers=user.sees_identifiers,
              csrf_token=csrf_token(request.session))


@router.get("/jobs", response_model=JobList, summary="Jobs, newest first, with filters")
def jobs(
    db: DbDep,
    user: ApiUser,
    state: StateFilter | None = None,
    calling_aet: Annotated[str | None, Query(max_length=16)] = None,
    accession: Annotated[str | None, Query(max_length=64, description="substring of the accession number")] = None,
    date_from: date | None = None,
    date_to: date | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobList:
    flt = dq.JobFilter(state=state, calling_aet=calling_aet or None, accession=accession or None,
                       date_from=date_from, date_to=date_to, limit=limit, offset=offset)
    total, rows = dq.list_jobs(db, flt)
    return JobList(total=total, limit=limit, offset=offset, jobs=[mask_job(r, user) for r in rows])


def _detail(db, settings, user, job_id: int) -> dict:  # type: ignore[no-untyped-def]
    d = dq.job_detail(db, job_id)
    if d is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    d["previews"] = list_previews(settings, d["output_dir"])
    d.pop("output_dir", None)  # a server path: not for the API
    return mask_job(d, user)


@router.get("/jobs/{job_id}", response_model=JobDetail, summary="Everything about one job")
def job(job_id: JobId, db: DbDep, settings: SettingsDep, user: ApiUser) -> dict:
    return _detail(db, settings, user, job_id)


@router.get(
    "/jobs/{job_id}/previews/{name:path}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
    summary="A PNG preview the pipeline wrote",
)
def preview(job_id: JobId, name: str, db: DbDep, settings: SettingsDep, user: ApiUser) -> Response:
    d = dq.job_detail(db, job_id)
    if d is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    path = preview_path(settings, d["output_dir"], name)
    if path is not None:
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})
    png = rendered_preview(settings, d["output_dir"], name)
    if png is None:
        raise HTTPException(status_code=404, detail=f"job {job_id} has no preview {name!r}")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.post("/jobs/{job_id}/retry", response_model=ActionOut, dependencies=[CsrfHeader],
             summary="Run the pipeline again from a stage (admin)")
def retry(job_id: JobId, body: RetryIn, request: Request, db: DbDep, user: ApiUser) -> ActionOut:
    try:
        actions.deny_unless_admin(db, user, "retry", f"job:{job_id}", client_ip(request))
        j = actions.retry_from_stage(db, _enqueuer(request), user, job_id, body.stage, client_ip(request))
    except actions.ActionError as exc:
        raise _fail(exc) from exc
    return ActionOut(job_id=job_id, action="retry", state=j.state, detail={"from_stage": body.stage})


@router.post("/jobs/{job_id}/repush", response_model=ActionOut, dependencies=[CsrfHeader],
             summary="Send the job's objects to PACS again (admin)")
def repush(job_id: JobId, request: Request, db: DbDep, user: ApiUser,
           body: RepushIn | None = None) -> ActionOut:
    body = body or RepushIn()
    try:
        actions.deny_unless_admin(db, user, "repush", f"job:{job_id}", client_ip(request))
        n = actions.repush(db, _enqueuer(request), user, job_id, client_ip(request), body.only_unsent)
    except actions.ActionError as exc:
        raise _fail(exc) from exc
    return ActionOut(job_id=job_id, action="repush", state="delivering", detail={"objects": n})


@router.post("/jobs/{job_id}/cancel", response_model=ActionOut, dependencies=[CsrfHeader],
             summary="Cancel a queued or running job (admin)")
def cancel(job_id: JobId, request: Request, db: DbDep, user: ApiUser) -> ActionOut:
    try:
        actions.deny_unless_admin(db, user, "cancel", f"job:{job_id}", client_ip(request))
        j = actions.cancel(db, user, job_id, client_ip(request))
    except actions.ActionError as exc:
        raise _fail(exc) from exc
    return ActionOut(job_id=job_id, action="cancel", state=j.state, detail={"cancel_requested": True})


@router.post("/jobs/{job_id}/delete", response_model=ActionOut, dependencies=[CsrfHeader],
             summary="Delete a job; with purge_study also the study's spool files (admin)")
def delete(job_id: JobId, body: DeleteIn, request: Request, db: DbDep, settings: SettingsDep,
           user: ApiUser) -> ActionOut:
    try:
        actions.deny_unless_admin(db, user, "delete", f"job:{job_id}", client_ip(request))
        detail = actions.delete_job(db, settings, user, job_id, body.confirm, body.purge_study, client_ip(request))
    except actions.ActionError as exc:
        raise _fail(exc) from exc
    return ActionOut(job_id=job_id, action="delete", state=None, detail=detail)


@router.get("/system", response_model=SystemOut, summary="SCP, queues, workers, disk, versions")
def system(request: Request, db: DbDep, settings: SettingsDep, user: ApiUser) -> dict:
    return system_view(db, settings, request.app.state.enqueuer.celery())


@router.get("/audit", response_model=list[AuditOut], summary="The audit log, newest first (admin)")
def audit(db: DbDep, user: ApiAdmin, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
          offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> list[dict]:
    return dq.audit_log(db, limit=limit, offset=offset)


class Receiving(BaseModel):
    study: StudyOut
    instances: int
    series: int
    quiet_s: float | None


@router.get("/receiving", response_model=list[Receiving], summary="Studies arriving now, not yet covered by a job")
def receiving(db: DbDep, settings: SettingsDep, user: ApiUser) -> list[dict]:
    window = settings.completion_ceiling_s + settings.stable_age_s
    return [{**r, "study": mask_study(r["study"], user)} for r in dq.receiving_studies(db, window)]


@router.get("/calling-aets", response_model=list[str], summary="Calling AE titles seen, for filters")
def aets(db: DbDep, user: ApiUser) -> list[str]:
    return dq.calling_aets(db)
