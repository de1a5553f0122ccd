"""Unauthenticated operational endpoints: liveness, readiness, Prometheus metrics.

They reveal no patient data (counts and states only); restrict them at the network level if
even that is too much.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from common.jobstore.db import get_engine
from service.api.deps import SettingsDep
from service.api.schemas import Health
from service.api.system import disk_status

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="Ready: job store reachable and disk above the watermark")
def readyz(settings: SettingsDep) -> JSONResponse:
    checks: dict[str, object] = {}
    ok = True
    try:
        with get_engine(settings.effective_database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, do not crash the probe
        ok = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    disk = disk_status(settings)
    checks["disk_free_mb"] = disk["free_mb"]
    checks["disk_watermark_mb"] = disk["watermark_mb"]
    if not disk["above_watermark"]:
        ok = False
        checks["disk"] = "below watermark: free space in the data volume"
    else:
        checks["disk"] = "ok"
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}},
            summary="Prometheus metrics, computed from the job store at scrape time")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
