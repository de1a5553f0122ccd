"""The shadow-validation page (issue 17): how the synthetic Tmax agrees with the DSC-derived Tmax on
every study that had both, aggregated (Bland-Altman of the Tmax>6 s volume, concordance, DEFUSE-3
2x2 table with kappa), filterable by date and model version; the same figures as JSON and the
records as CSV. Any logged-in user may read it (no patient identifiers: job ids and study UIDs)."""

from __future__ import annotations

import csv
import io
from datetime import date
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from common.jobstore import shadow_queries as sq
from common.shadow_stats import REFERENCE_BAND, summarise
from service.api.deps import ApiUser, DbDep, PageUser
from service.api.routes_pages import _render
from service.api.shadow_plot import bland_altman_svg

router = APIRouter()

Since = Annotated[date | None, Query(description="first day (UTC), included")]
Until = Annotated[date | None, Query(description="last day (UTC), included")]
Version = Annotated[str | None, Query(max_length=64, description="one model version only")]


def _view(db: Any, since: date | None, until: date | None, model_version: str | None) -> dict[str, Any]:
    rows = sq.shadow_rows(db, since, until, model_version or None)
    filters = {"date_from": since.isoformat() if since else None, "date_to": until.isoformat() if until else None,
               "model_version": model_version or None}
    return {"filters": filters, "summary": summarise(rows), "rows": rows}


@router.get("/shadow", include_in_schema=False)
def shadow_page(request: Request, db: DbDep, user: PageUser, date_from: Since = None, date_to: Until = None,
                model_version: Version = None) -> Response:
    view = _view(db, date_from, date_to, model_version)
    svg = bland_altman_svg(view["rows"], view["summary"]["bland_altman_t6"], REFERENCE_BAND["mean_abs_t6_diff_ml"])
    query = urlencode({k: v for k, v in (("date_from", date_from), ("date_to", date_to),
                                         ("model_version", model_version)) if v})
    return _render(request, "shadow.html", user, view=view, svg=svg, versions=sq.model_versions(db), query=query)


@router.get("/api/shadow", tags=["api"])
def shadow_api(db: DbDep, user: ApiUser, date_from: Since = None, date_to: Until = None,
               model_version: Version = None) -> dict[str, Any]:
    """Shadow validation: the aggregate figures, the reference band and every record."""
    return _view(db, date_from, date_to, model_version)


@router.get("/api/shadow.csv", tags=["api"], response_class=Response)
def shadow_csv(db: DbDep, user: ApiUser, date_from: Since = None, date_to: Until = None,
               model_version: Version = None) -> Response:
    """The records as CSV, one row per study (columns: common.jobstore.shadow_queries.COLUMNS)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=sq.COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(sq.shadow_rows(db, date_from, date_to, model_version or None))
    return Response(buf.getvalue(), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="shadow-validation.csv"'})
