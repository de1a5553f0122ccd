"""Property-based fuzzing of the JSON API against its own OpenAPI spec (schemathesis, in-process
ASGI), logged in as an admin with a valid CSRF token, over a job store with realistic rows.

Every generated request — valid or not — must get an answer that is not a server error and that
conforms to the documented schema. Bounded: a few examples per operation, well under a minute.
"""

from __future__ import annotations

import re

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks

from service.api.app import SESSION_COOKIE, create_app
from tests.unit.test_api_fixtures import ADMIN, cheap_hasher, make_settings, populate

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def logged_in(tmp_path_factory):
    import service.api.auth as auth

    original = auth._hasher
    auth._hasher = cheap_hasher()
    try:
        cfg = make_settings(tmp_path_factory.mktemp("fuzz"))
        populate(cfg)
        app = create_app(cfg)
        with TestClient(app) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
            r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token},
                       follow_redirects=False)
            assert r.status_code == 303
            csrf = c.get("/api/me").json()["csrf_token"]
            cookie = c.cookies.get(SESSION_COOKIE)
        yield app, {SESSION_COOKIE: cookie}, {"X-CSRF-Token": csrf}
    finally:
        auth._hasher = original


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_api_has_no_server_errors(logged_in, mode):
    app, cookies, headers = logged_in
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    # the spec covers everything the pages show, and the actions
    for expected in ("GET /api/jobs", "GET /api/jobs/{job_id}", "GET /api/system", "POST /api/jobs/{job_id}/repush",
                     "POST /api/jobs/{job_id}/retry", "POST /api/jobs/{job_id}/cancel",
                     "POST /api/jobs/{job_id}/delete", "GET /api/audit", "GET /metrics", "GET /readyz"):
        assert expected in labels, expected
    calls = 0
    skipped: list[str] = []
    statuses: dict[str, set[int]] = {}
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            nonlocal calls
            calls += 1
            response = case.call_and_validate(
                cookies=cookies,
                headers=headers,
                checks=[checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                        checks.response_schema_conformance],
            )
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            run()
        except Unsatisfiable:
            # nothing to negate (no parameters, no body): only possible when generating invalid data
            assert mode == GenerationMode.NEGATIVE, op.label
            skipped.append(op.label)
    assert calls >= len(operations) - len(skipped)
    assert len(skipped) < len(operations) / 2, skipped
    # the session really was logged in: no operation was answered only with 401
    assert all(codes != {401} for codes in statuses.values()), statuses
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses["GET /api/jobs"] and 200 in statuses["GET /api/system"]
