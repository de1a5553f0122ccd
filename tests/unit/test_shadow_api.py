"""The shadow-validation page, JSON API and CSV on a real job store: records written by the worker's
own store() (upsert by job), filters by date and model version, figures equal to common.shadow_stats
on the same rows, login required."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from common.jobstore.db import session_scope
from common.jobstore.models import JobState, ShadowRecord
from common.shadow_stats import summarise
from service.api.app import create_app
from tests.unit.test_api import login
from tests.unit.test_api_fixtures import (
    ADMIN,
    VIEWER,
    add_job,
    add_study,
    cheap_hasher,
    init_schema,
    make_settings,
)
from worker.pipeline.shadow import store

# (synthetic Tmax>6 mL, DSC Tmax>6 mL, synthetic DEFUSE-3, DSC DEFUSE-3, model version, days ago)
CASES = [(120.0, 100.0, True, True, "v1", 0), (30.0, 65.0, False, True, "v1", 0), (0.0, 5.0, False, False, "v1", 0),
         (80.0, 82.0, True, True, "v2", 0), (200.0, 150.0, True, True, "v2", 10)]


@pytest.fixture(autouse=True)
def _fast_argon2(monkeypatch):
    import service.api.auth as auth

    monkeypatch.setattr(auth, "_hasher", cheap_hasher())


@pytest.fixture
def settings(data_dir):
    from service.api.auth import create_user

    s = make_settings(data_dir)
    init_schema(s)
    url = s.effective_database_url
    with session_scope(url) as db:
        create_user(db, *ADMIN, role="admin")
        create_user(db, *VIEWER, role="viewer")
        jobs = [add_job(db, s, add_study(db, s, 100 + i, accession=f"SH{i}"), JobState.DONE).id
                for i in range(len(CASES))]
    for job_id, (s6, r6, sd, rd, version, _ago) in zip(jobs, CASES, strict=True):
        comparison = {"dice_t6": 0.7, "dice_t10": 0.5, "synthetic_t6_ml": s6, "real_t6_ml": r6,
                      "synthetic_t10_ml": s6 / 3, "real_t10_ml": r6 / 3, "core_ml": 10.0,
                      "synthetic_defuse3": sd, "real_defuse3": rd}
        store(url, job_id, f"1.2.3.{job_id}", "demo", version, {**comparison, "synthetic_t6_ml": 999.0})
        store(url, job_id, f"1.2.3.{job_id}", "demo", version, comparison)  # a retried job replaces its row
    with session_scope(url) as db:
        for job_id, case in zip(jobs, CASES, strict=True):
            db.execute(update(ShadowRecord).where(ShadowRecord.job_id == job_id)
                       .values(at=datetime.now(UTC) - timedelta(days=case[5])))
    return s


def _client(settings) -> TestClient:
    return TestClient(create_app(settings))


def test_api_aggregates_every_record_and_filters(settings):
    with _client(settings) as c:
        assert c.get("/api/shadow").status_code == 401
        assert c.get("/shadow", follow_redirects=False).status_code == 303
        login(c, VIEWER)
        body = c.get("/api/shadow").json()
        assert len(body["rows"]) == 5, "one row per job although each was stored twice"
        assert body["summary"] == summarise(body["rows"])
        assert body["summary"]["bland_altman_t6"]["bias"] == pytest.approx((20 - 35 - 5 - 2 + 50) / 5)
        assert body["summary"]["defuse3"]["real_only"] == 1 and body["summary"]["defuse3"]["both"] == 3
        v1 = c.get("/api/shadow", params={"model_version": "v1"}).json()
        assert [r["model_version"] for r in v1["rows"]] == ["v1"] * 3
        today = datetime.now(UTC).date()
        recent = c.get("/api/shadow", params={"date_from": (today - timedelta(days=2)).isoformat()}).json()
        assert len(recent["rows"]) == 4 and recent["filters"]["date_from"] == (today - timedelta(days=2)).isoformat()
        old = c.get("/api/shadow", params={"date_to": (today - timedelta(days=5)).isoformat()}).json()
        assert [r["synthetic_t6_ml"] for r in old["rows"]] == [200.0]
        assert c.get("/api/shadow", params={"date_from": "yesterday"}).status_code == 422


def test_csv_export_has_every_record(settings):
    with _client(settings) as c:
        login(c, VIEWER)
        r = c.get("/api/shadow.csv", params={"model_version": "v2"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert sorted(float(x["diff_t6_ml"]) for x in rows) == [-2.0, 50.0]
        assert {x["defuse3_agree"] for x in rows} == {"True"}


def test_page_shows_the_figures_the_plot_and_the_reference(settings):
    with _client(settings) as c:
        login(c, ADMIN)
        html = c.get("/shadow").text
        summary = c.get("/api/shadow").json()["summary"]
        assert 'id="shadow-n">5<' in html
        assert f'{summary["bland_altman_t6"]["bias"]:+.1f} mL' in html
        assert f'{summary["defuse3"]["discordant_pct"]:.1f} %' in html
        assert "7.4 %" in html and "20.5 mL" in html and "Deutschmann" in html
        assert html.count('class="study"') == 5 and 'class="bias"' in html and 'class="upper"' in html
        filtered = c.get("/shadow", params={"model_version": "v2"}).text
        assert filtered.count('class="study"') == 2 and "model_version=v2" in filtered
        assert 'href="/shadow"' in html  # in the navigation
