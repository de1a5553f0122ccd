"""A job with no PACS configured ends "done, not delivered (no PACS configured)", never "delivered"
(issue 18): the real push stage finishes the job, then the dashboard's pages and API say so."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState
from service.api.app import create_app
from service.api.templating import NOT_DELIVERED_WORDS, STATE_WORDS
from tests.unit.test_api import login
from tests.unit.test_api_fixtures import (
    ADMIN,
    ORTHANC,
    T0,
    add_job,
    add_study,
    cheap_hasher,
    init_schema,
    make_settings,
)
from worker.pipeline.push import push_due


@pytest.fixture
def jobs(data_dir, monkeypatch):
    """One job that reached push with no destination, one with its objects sent to a PACS."""
    import service.api.auth as auth
    from service.api.auth import create_user

    monkeypatch.setattr(auth, "_hasher", cheap_hasher())
    settings = make_settings(data_dir)
    assert settings.destinations == []  # the embedded defaults: no PACS, as in `make run`
    init_schema(settings)
    with session_scope(settings.effective_database_url) as db:
        create_user(db, *ADMIN, role="admin")
        lonely = add_job(db, settings, add_study(db, settings, 1, accession="ACC1"), JobState.RUNNING,
                         upto="encode").id
        sent = add_job(db, settings, add_study(db, settings, 2, accession="ACC2", at=T0 + timedelta(minutes=1)),
                       JobState.DONE, upto="push", deliveries={ORTHANC: DeliveryState.SENT},
                       at=T0 + timedelta(minutes=1)).id
    report = push_due(settings, lonely)  # what the push stage runs
    assert report.total == 0 and report.complete
    with session_scope(settings.effective_database_url) as db:
        assert db.get(Job, lonely).state == JobState.DONE
        assert not db.query(Delivery).filter(Delivery.job_id == lonely).count()
    return settings, lonely, sent


def test_api_says_not_configured_for_a_job_without_destinations(jobs):
    settings, lonely, sent = jobs
    with TestClient(create_app(settings)) as c:
        login(c, ADMIN)
        listed = {j["id"]: j for j in c.get("/api/jobs").json()["jobs"]}
        detail = c.get(f"/api/jobs/{lonely}").json()
    assert listed[lonely]["state"] == "done" and listed[lonely]["delivery"] == "not_configured"
    assert detail["delivery"] == "not_configured" and detail["deliveries"] == []
    assert listed[sent]["delivery"] == "sent"


def test_pages_say_not_delivered_and_never_delivered(jobs):
    settings, lonely, sent = jobs
    with TestClient(create_app(settings)) as c:
        login(c, ADMIN)
        page = c.get(f"/jobs/{lonely}").text
        partial = c.get(f"/partials/jobs/{lonely}").text
        listing = c.get("/").text
        other = c.get(f"/partials/jobs/{sent}").text
        system = c.get("/system").text
    for html in (page, partial):
        assert NOT_DELIVERED_WORDS in html
        assert f'<span class="words">{STATE_WORDS["done"]}' not in html
        assert "Not delivered: no PACS is configured" in html
    row = listing[listing.index(f'data-job="{lonely}"'):]
    row = row[: row.index("</tr>")]
    assert f'title="{NOT_DELIVERED_WORDS}"' in row and "not delivered" in row
    # a job whose objects reached a PACS still reads "delivered"
    assert f'<span class="words">{STATE_WORDS["done"]}' in other and NOT_DELIVERED_WORDS not in other
    assert "no PACS configured" in system
