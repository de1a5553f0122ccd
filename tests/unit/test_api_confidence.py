"""The dashboard on a low-confidence study (issue 15): the jobs list and the job page say "low confidence"
and give no DEFUSE-3/EXTEND call; the volumes stay. The job's result is what the measure stage writes
(worker.pipeline.confidence.apply_confidence)."""

from __future__ import annotations

from common.jobstore.db import session_scope
from common.jobstore.models import Job
from tests.unit.test_api import _client, _fast_argon2, _template, env, login  # noqa: F401 - fixtures
from tests.unit.test_api_fixtures import VIEWER
from worker.pipeline.confidence import apply_confidence


def _set_confidence(settings, job_id: int, low: bool) -> None:
    with session_scope(settings.effective_database_url) as db:
        job = db.get(Job, job_id)
        result = dict(job.result)
        conf = {"score": 0.08 if low else 0.91, "low": low, "threshold": 0.5, "parts": {"support": 0.08},
                "reasons": ["95 mL of Tmax>6 s lies more than 40 mm from any core with no FLAIR vessel sign"]}
        result["measures"] = apply_confidence(result["measures"], conf)
        job.result = result


def test_dashboard_says_low_confidence_and_gives_no_call(env):  # noqa: F811 - the fixture
    settings, rows = env
    _set_confidence(settings, rows.done, low=True)
    with _client(settings) as c:
        login(c, VIEWER)
        api = c.get(f"/api/jobs/{rows.done}").json()
        listing = c.get("/partials/jobs").text
        page = c.get(f"/jobs/{rows.done}").text
    m = api["measures"]
    assert m["defuse3"] is None and m["extend"] is None and m["confidence"]["low"]
    assert m["tmax6_ml"] > 0
    row = listing[listing.index(f'data-job="{rows.done}"'):]
    row = row[: row.index("</tr>")]
    assert "low confidence" in row and "DEFUSE-3 match" not in row and "no match" not in row
    assert page.count("withheld (low confidence)") == 2  # DEFUSE-3 and EXTEND rows
    assert "LOW CONFIDENCE" in page and "no FLAIR vessel sign" in page


def test_dashboard_high_confidence_keeps_the_call(env):  # noqa: F811 - the fixture
    settings, rows = env
    _set_confidence(settings, rows.done, low=False)
    with _client(settings) as c:
        login(c, VIEWER)
        listing = c.get("/partials/jobs").text
        page = c.get(f"/jobs/{rows.done}").text
    row = listing[listing.index(f'data-job="{rows.done}"'):]
    row = row[: row.index("</tr>")]
    assert "DEFUSE-3 match" in row and "low confidence" not in row
    assert "withheld" not in page and 'id="confidence"' in page and "0.91" in page
