"""Dashboard and JSON API: every route, authentication and authorisation, CSRF, masking, actions
with their audit entries, previews without traversal, system status, metrics and probes.

The job store is a real SQLite file migrated by init_db and filled with realistic rows
(tests/unit/test_api_fixtures.py); tasks go to the real filesystem broker (Redis in one test).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from common.jobstore.db import session_scope
from common.jobstore.models import AuditEntry, Delivery, DeliveryState, Job, JobState, Study, User
from service.api.app import SESSION_COOKIE, create_app
from tests.unit.test_api_fixtures import (
    ADMIN,
    SERIES_SPEC,
    VIEWER,
    Populated,
    cheap_hasher,
    checkpoint,
    clone,
    make_settings,
    populate,
)

API_GETS = ["/api/me", "/api/jobs", "/api/receiving", "/api/jobs/{done}", "/api/jobs/{done}/previews/previews/dwi.png",
            "/api/system", "/api/audit", "/api/calling-aets"]
API_POSTS = ["/api/jobs/{done}/retry", "/api/jobs/{done}/repush", "/api/jobs/{queued}/cancel",
             "/api/jobs/{done}/delete"]
PAGES = ["/", "/partials/jobs", "/jobs/{done}", "/partials/jobs/{done}", "/jobs/{done}/delete", "/system", "/audit"]


@pytest.fixture(autouse=True)
def _fast_argon2(monkeypatch):
    import service.api.auth as auth

    monkeypatch.setattr(auth, "_hasher", cheap_hasher())


@pytest.fixture(scope="module")
def _template(tmp_path_factory):
    """One populated job store per module, copied for each test (populating costs seconds)."""
    import service.api.auth as auth

    original, auth._hasher = auth._hasher, cheap_hasher()
    try:
        folder = tmp_path_factory.mktemp("template") / "data"
        folder.mkdir()
        settings = make_settings(folder)
        rows = populate(settings)
        checkpoint(settings)
    finally:
        auth._hasher = original
    return folder, rows


@pytest.fixture
def env(data_dir: Path, _template):
    folder, rows = _template
    clone(folder, data_dir)
    return make_settings(data_dir), rows


def _client(settings) -> TestClient:
    return TestClient(create_app(settings))


def _csrf_from(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def login(client: TestClient, who: tuple[str, str]) -> str:
    """Log in through the form; returns the session's CSRF token."""
    token = _csrf_from(client.get("/login").text)
    r = client.post("/login", data={"username": who[0], "password": who[1], "csrf_token": token, "next": "/"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return client.get("/api/me").json()["csrf_token"]


def audit_rows(settings, action: str | None = None) -> list[AuditEntry]:
    with session_scope(settings.effective_database_url) as db:
        q = select(AuditEntry).order_by(AuditEntry.id)
        if action:
            q = q.where(AuditEntry.action == action)
        return list(db.scalars(q))


def _fmt(path: str, rows: Populated) -> str:
    return path.format(done=rows.done, queued=rows.queued)


def broker_messages(settings, queue: str) -> list[Path]:
    folder = settings.broker_dir / "in"
    return sorted(p for p in folder.iterdir() if p.name.endswith(f".{queue}.msg")) if folder.is_dir() else []


# --------------------------------------------------------------------------- authentication


def test_everything_needs_login_except_probes(env):
    settings, rows = env
    with _client(settings) as c:
        for path in API_GETS:
            assert c.get(_fmt(path, rows)).status_code == 401, path
        for path in API_POSTS:
            assert c.post(_fmt(path, rows), json={}).status_code == 401, path
        for path in PAGES:
            r = c.get(_fmt(path, rows), follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
        assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def test_login_sets_a_hardened_cookie_and_is_audited(env):
    settings, _ = env
    with _client(settings) as c:
        login(c, ADMIN)
        me = c.get("/api/me").json()
    assert me["username"] == ADMIN[0] and me["role"] == "admin" and me["sees_identifiers"] is True
    logins = audit_rows(settings, "login")
    assert [a.user for a in logins] == [ADMIN[0]] and logins[0].ip


def test_cookie_flags(data_dir):
    settings = make_settings(data_dir, cookie_secure=True)
    populate(settings)
    with TestClient(create_app(settings), base_url="https://testserver") as c:
        r = c.get("/login")
        cookie = r.headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE + "=")
    low = cookie.lower()
    assert "httponly" in low and "samesite=lax" in low and "secure" in low


def test_wrong_password_is_refused_and_audited(env):
    settings, _ = env
    with _client(settings) as c:
        token = _csrf_from(c.get("/login").text)
        r = c.post("/login", data={"username": ADMIN[0], "password": "wrong", "csrf_token": token})
        assert r.status_code == 401 and "Wrong username or password" in r.text
        assert c.get("/api/me").status_code == 401
        r = c.post("/login", data={"username": "nobody", "password": "x", "csrf_token": token})
        assert r.status_code == 401
    failed = audit_rows(settings, "login_failed")
    assert [a.target for a in failed] == [f"user:{ADMIN[0]}", "user:nobody"]


def test_login_form_needs_csrf(env):
    settings, _ = env
    with _client(settings) as c:
        c.get("/login")
        r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]})
        assert r.status_code == 403
        assert c.get("/api/me").status_code == 401


def test_login_rate_limit_blocks_even_the_right_password(data_dir):
    settings = make_settings(data_dir, login_max_failures=3)
    populate(settings)
    with _client(settings) as c:
        token = _csrf_from(c.get("/login").text)
        for _ in range(3):
            r = c.post("/login", data={"username": ADMIN[0], "password": "nope", "csrf_token": token})
            assert r.status_code == 401
        r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert c.get("/api/me").status_code == 401
    assert len(audit_rows(settings, "login_blocked")) == 1


def test_login_limits_are_per_account_and_per_ip(data_dir):
    """One account's failures lock out only that account; the same IP is refused for every account
    only at the larger per-IP threshold."""
    settings = make_settings(data_dir, login_max_failures=3, login_max_failures_per_ip=6)
    populate(settings)
    with _client(settings) as c:
        token = _csrf_from(c.get("/login").text)

        def attempt(username: str, password: str) -> int:
            return c.post("/login", data={"username": username, "password": password, "csrf_token": token},
                          follow_redirects=False).status_code

        assert [attempt(ADMIN[0], "nope") for _ in range(3)] == [401, 401, 401]
        assert attempt(ADMIN[0], ADMIN[1]) == 429  # the admin's account is locked ...
        assert attempt(VIEWER[0], VIEWER[1]) == 303  # ... the viewer at the same workstation is not
        token = c.get("/api/me").json()["csrf_token"]
        # Three more failures, each for a different account, bring this IP to its limit of six.
        assert [attempt(f"ghost{i}", "nope") for i in range(3)] == [401, 401, 401]
        assert attempt(VIEWER[0], VIEWER[1]) == 429
    blocked = audit_rows(settings, "login_blocked")
    assert [a.target for a in blocked] == [f"user:{ADMIN[0]}", f"user:{VIEWER[0]}"]


def test_login_limit_per_ip_must_not_be_below_per_account(data_dir):
    from common.config import SettingsError

    with pytest.raises(SettingsError, match="login_max_failures_per_ip"):
        make_settings(data_dir, login_max_failures=10, login_max_failures_per_ip=5)


def test_disabled_user_loses_access_at_once(env):
    settings, _ = env
    with _client(settings) as c:
        login(c, VIEWER)
        assert c.get("/api/jobs").status_code == 200
        with session_scope(settings.effective_database_url) as db:
            db.scalar(select(User).where(User.username == VIEWER[0])).disabled = True
        assert c.get("/api/jobs").status_code == 401


def test_logout_needs_csrf_and_ends_the_session(env):
    settings, _ = env
    with _client(settings) as c:
        token = login(c, VIEWER)
        assert c.post("/logout", data={}).status_code == 403
        r = c.post("/logout", data={"csrf_token": token}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert c.get("/api/me").status_code == 401
    assert [a.user for a in audit_rows(settings, "logout")] == [VIEWER[0]]


def test_open_redirect_is_refused(env):
    settings, _ = env
    with _client(settings) as c:
        token = _csrf_from(c.get("/login").text)
        r = c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token,
                                   "next": "//evil.example/"}, follow_redirects=False)
        assert r.headers["location"] == "/"


def test_login_page_tells_how_to_make_the_first_admin(data_dir):
    settings = make_settings(data_dir)
    from tests.unit.test_api_fixtures import init_schema

    init_schema(settings)
    with _client(settings) as c:
        assert "synthperf users add admin --role admin" in c.get("/login").text
    populate(settings)
    with _client(settings) as c:
        assert "synthperf users add admin" not in c.get("/login").text


def test_first_admin_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SYNTHPERF_ADMIN_PASSWORD", "bootstrap password 1")
    from common.config import load_settings

    settings = load_settings(data_dir=data_dir, secret_key="k" * 32)
    from tests.unit.test_api_fixtures import init_schema

    init_schema(settings)
    with _client(settings) as c:  # start-up creates it
        login(c, ("admin", "bootstrap password 1"))
        assert c.get("/api/me").json()["role"] == "admin"
    # a second start does not overwrite a changed password
    monkeypatch.setenv("SYNTHPERF_ADMIN_PASSWORD", "another password 2")
    settings2 = load_settings(data_dir=data_dir, secret_key="k" * 32)
    with _client(settings2) as c:
        login(c, ("admin", "bootstrap password 1"))
    assert [a.action for a in audit_rows(settings, "bootstrap_admin")] == ["bootstrap_admin"]


def test_session_secret_is_generated_once_and_private(data_dir):
    settings = load_settings_no_secret(data_dir)
    populate(settings)
    with _client(settings) as c:
        login(c, VIEWER)
    key = (data_dir / "secret_key")
    assert key.stat().st_mode & 0o077 == 0 and len(key.read_text()) >= 40
    with _client(settings) as c:  # a restarted API accepts nothing from before without the same key
        login(c, VIEWER)
    assert len(key.read_text()) >= 40


def load_settings_no_secret(data_dir):
    from common.config import load_settings

    return load_settings(data_dir=data_dir)


# --------------------------------------------------------------------------- proxy mode


def test_proxy_mode_trusts_headers_only(data_dir):
    settings = make_settings(data_dir, auth_mode="proxy")
    rows = populate(settings)
    with _client(settings) as c:
        assert c.get("/api/jobs").status_code == 401
        assert c.get("/", follow_redirects=False).status_code == 401
        assert c.post("/login", data={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 404
        viewer = {"X-Remote-User": "dr.who", "X-Remote-Role": "radiology"}
        body = c.get("/api/jobs", headers=viewer).json()
        assert body["total"] == 5 and all(j["study"]["patient_name"] == "•••" for j in body["jobs"])
        me = c.get("/api/me", headers=viewer).json()
        assert me["role"] == "viewer" and me["via"] == "proxy"
        r = c.post(f"/api/jobs/{rows.queued}/cancel", headers={**viewer, "X-CSRF-Token": me["csrf_token"]})
        assert r.status_code == 403
        admin = {"X-Remote-User": "it.oncall", "X-Remote-Role": "staff, admin"}
        token = c.get("/api/me", headers=admin).json()["csrf_token"]
        r = c.post(f"/api/jobs/{rows.queued}/cancel", headers={**admin, "X-CSRF-Token": token})
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert c.get("/", headers=admin).status_code == 200
    assert [(a.user, a.action) for a in audit_rows(settings) if a.action in ("cancel", "denied")] == [
        ("dr.who", "denied"), ("it.oncall", "cancel")]


# --------------------------------------------------------------------------- reading


def test_jobs_list_masks_identifiers_for_viewers_only(env):
    settings, _ = env
    with _client(settings) as c:
        login(c, VIEWER)
        body = c.get("/api/jobs").json()
        page = c.get("/").text
    assert body["total"] == 5
    assert {j["study"]["patient_name"] for j in body["jobs"]} == {"•••"}
    assert {j["study"]["patient_id"] for j in body["jobs"]} == {"•••"}
    assert "DOE" not in page and "PID0000" not in page and "ACC1001" in page
    with _client(settings) as c:
        login(c, ADMIN)
        body = c.get("/api/jobs").json()
        page = c.get("/").text
    assert {j["study"]["patient_name"] for j in body["jobs"]} == {f"DOE^JANE{i}" for i in range(1, 6)}
    assert "DOE, JANE1" in page and "PID00001" in page


def test_jobs_list_filters_and_search(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)

        def ids(**params):
            return [j["id"] for j in c.get("/api/jobs", params=params).json()["jobs"]]

        assert ids(state="running") == [rows.running]
        assert sorted(ids(state="active")) == sorted([rows.running, rows.queued, rows.delivering])
        assert sorted(ids(calling_aet="MR_STROKE_2")) == sorted([rows.failed, rows.delivering])
        assert ids(accession="xyz") == [rows.delivering]
        assert ids(accession="%") == []  # LIKE wildcards are literal
        today = c.get(f"/api/jobs/{rows.done}").json()["created_at"][:10]
        assert rows.delivering not in ids(date_from=today)
        assert ids(date_to=today, date_from=today, state="done") == [rows.done]
        assert ids(limit=2) == ids()[:2] and ids(limit=2, offset=2) == ids()[2:4]
        assert c.get("/api/jobs", params={"state": "bogus"}).status_code == 422
        assert c.get("/api/jobs", params={"limit": 0}).status_code == 422
        assert c.get("/api/calling-aets").json() == ["MR_STROKE_1", "MR_STROKE_2"]
        # the page and its live fragment apply the same filters
        frag = c.get("/partials/jobs", params={"accession": "ACC1003"}).text
        assert f"/jobs/{rows.running}" in frag and f"/jobs/{rows.done}\"" not in frag
        page = c.get("/", params={"state": "nonsense", "date_from": "tomorrow"})
        assert page.status_code == 200 and "Ignored" in page.text


def test_receiving_studies_show_until_a_job_covers_them(env):
    from datetime import UTC, datetime

    from tests.unit.test_api_fixtures import add_job, add_study

    settings, _ = env
    with session_scope(settings.effective_database_url) as db:
        study = add_study(db, settings, 9, accession="ACC9009", at=datetime.now(UTC))
        study_id = study.id
    with _client(settings) as c:
        login(c, VIEWER)
        (r,) = c.get("/api/receiving").json()
        assert r["study"]["accession_number"] == "ACC9009" and r["study"]["patient_name"] == "•••"
        assert r["instances"] == sum(spec[3] for spec in SERIES_SPEC) and r["series"] == len(SERIES_SPEC)
        frag = c.get("/partials/jobs").text
        assert "Receiving now" in frag and "ACC9009" in frag and "DOE" not in frag
        with session_scope(settings.effective_database_url) as db:
            add_job(db, settings, db.get(Study, study_id), JobState.QUEUED)
        assert c.get("/api/receiving").json() == []
        assert "Receiving now" not in c.get("/partials/jobs").text


def test_job_summary_has_stages_timings_volumes_and_deliveries(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)
        jobs = {j["id"]: j for j in c.get("/api/jobs").json()["jobs"]}
    done, running, dlv = jobs[rows.done], jobs[rows.running], jobs[rows.delivering]
    assert [s["state"] for s in done["stages"]] == ["done"] * 7
    assert [s["state"] for s in running["stages"]][:5] == ["done", "done", "done", "running", "waiting"]
    assert running["current_stage"] == "synthesize" and 0 < running["progress"] < 1
    assert done["stages"][3]["duration_s"] == pytest.approx(18.5)
    assert done["measures"]["core_ml"] == pytest.approx(13.4) and done["measures"]["defuse3"] is True
    assert {d["destination"]: (d["state"], d["sent"], d["total"]) for d in dlv["deliveries"]} == {
        "ORTHANC@127.0.0.1:4242": ("sent", 4, 4), "PACS2@10.0.0.9:104": ("dead", 0, 4)}


def test_job_detail_series_roles_registration_log_objects(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, ADMIN)
        d = c.get(f"/api/jobs/{rows.done}").json()
        page = c.get(f"/jobs/{rows.done}").text
        missing = c.get(f"/jobs/{rows.failed}").text
        assert c.get("/api/jobs/999999").status_code == 404
        assert c.get("/jobs/999999").status_code == 404
    assert [(s["series_number"], s["role"], s["instances"]) for s in d["series"]] == [
        (spec[0], spec[2], spec[3]) for spec in SERIES_SPEC]
    assert d["series"][1]["used_as"] == ["dwi"] and d["series"][3]["used_as"] == ["flair"]
    assert d["series"][1]["classification"]["b_values"] == [0, 1000]
    assert d["registration"] == {"metric_before": -0.214, "metric_after": -0.587, "iterations": 61}
    assert [s["name"] for s in d["stage_log"]] == ["classify", "load", "core", "synthesize", "measure", "encode", "push"]
    assert len(d["objects"]) == 4 and {o["state"] for o in d["objects"]} == {"sent"}
    assert d["previews"] == ["dwi.png", "flair.png", "core.png", "tmax.png", "tmax_sd.png"]  # rendered from work/
    assert "output_dir" not in d
    # the page says it in words
    for text in ("(0019,100C) = 0, 1000", "used as DWI", "metric after", "Parametric Map", "Segmentation",
                 "Comprehensive SR", "Re-push to PACS", "Hypoperfusion Tmax &gt; 6 s"):
        assert text in page, text
    assert "no FLAIR: only DWI and ADC arrived" in missing and "input missing" in missing


def test_viewer_sees_no_action_buttons(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)
        page = c.get(f"/jobs/{rows.done}").text
        assert "Re-push to PACS" not in page and "Delete" not in page
        assert c.get(f"/jobs/{rows.done}/delete").status_code == 403
        assert c.get("/audit").status_code == 403
        assert c.get("/api/audit").status_code == 403


def test_previews_rendered_from_the_pipeline_arrays(env):
    from io import BytesIO

    from PIL import Image

    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)
        images = {}
        for name in ("dwi.png", "flair.png", "core.png", "tmax.png", "tmax_sd.png"):
            r = c.get(f"/api/jobs/{rows.done}/previews/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", name
            images[name] = np.asarray(Image.open(BytesIO(r.content)).convert("RGB")).astype(int)
        assert c.get(f"/api/jobs/{rows.done}/previews/adc.png").status_code == 404
    # the key slice is the one with the core; the core overlay is red where the lesion is
    core, dwi = images["core.png"], images["dwi.png"]
    assert core.shape == dwi.shape
    red = (core[..., 0] > core[..., 1] + 60)
    assert red.sum() > 100 and (dwi[..., 0] > dwi[..., 1] + 60).sum() == 0
    # the synthetic map is colour, the DWI grey
    assert np.abs(images["tmax.png"][..., 0] - images["tmax.png"][..., 2]).max() > 100


def test_previews_are_served_without_traversal(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)
        listed = c.get(f"/api/jobs/{rows.delivering}").json()["previews"]
        assert listed == ["previews/dwi.png", "previews/flair.png", "previews/core.png", "previews/tmax.png",
                          "previews/tmax_sd.png"]
        r = c.get(f"/api/jobs/{rows.delivering}/previews/previews/tmax.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
        out = settings.output_dir / f"job-{rows.delivering}"
        (out / "evil.png").symlink_to(settings.effective_database_url.removeprefix("sqlite:///"))
        (out / "notes.txt").write_text("not an image")
        assert "evil.png" not in c.get(f"/api/jobs/{rows.delivering}").json()["previews"]
        for name in ("../../synthperf.db", "..%2F..%2Fsynthperf.db", "previews/../../../synthperf.db",
                     "evil.png", "notes.txt", "/etc/passwd", "previews/nothere.png", "work/tmax.npz"):
            r = c.get(f"/api/jobs/{rows.delivering}/previews/{name}")
            # 404, or 422 when the client's URL normalisation turned it into another route
            assert r.status_code in (404, 422) and b"SQLite" not in r.content, name
        assert c.get(f"/api/jobs/{rows.queued}/previews/previews/dwi.png").status_code == 404


def test_system_status(env):
    settings, _ = env
    with _client(settings) as c:
        login(c, VIEWER)
        s = c.get("/api/system").json()
        page = c.get("/system").text
    assert s["active_associations"] == 2
    assert sorted(w["info"]["device"] for w in s["workers"] if w["alive"]) == ["cpu", "cuda:0"]
    assert [w["alive"] for w in s["workers"] if w["instance"] == "old:300"] == [False]
    assert [e["reason"] for e in s["recent_rejections"]][0] == "peer 192.0.2.7 is not in allowed_networks"
    assert s["queues"] == {"broker": "filesystem", "queues": {"cpu": 0, "gpu": 0}, "error": None}
    assert s["disk"]["free_mb"] > 0 and s["disk"]["watermark_mb"] == settings.disk_watermark_mb
    assert s["jobs_by_state"]["input_missing"] == 1 and s["deliveries_by_state"]["dead"] == 4
    assert s["studies_by_state"]["input_missing"] == 1 and sum(s["studies_by_state"].values()) == 5
    assert s["software"]["synthperf"] and s["model"]["configured"] == "demo"
    assert s["model"]["last_job_versions"]["model_sha256"] == "ab12cd34"
    assert "not in allowed_aets" in page and "cuda:0" in page and "stale" in page


def test_system_page_shows_the_measured_inference_path(env):
    """What a worker's model wrote (models.tmax_ddpm.runtime) is what the admin sees, via plain JSON."""
    from models.tmax_ddpm.runtime import PathTrial, RuntimeChoice

    settings, _ = env
    settings = settings.model_copy(update={"inference_cache_dir": settings.data_dir / "runtime"})
    choice = RuntimeChoice(
        path="openvino", how="measured", device="cpu", capability="AVX2", native_bf16=False, cpu="AMD EPYC",
        threads=2, torch="2.13.0", host="worker-7", measured_at="2026-12-02T15:00:00+00:00", speedup_vs_fp32=1.3,
        trials=[PathTrial("fp32", True, probe_s=1.3, study_s_estimate=16.2, max_abs_tmax_s=0.0, within_tolerance=True),
                PathTrial("openvino", True, probe_s=1.0, study_s_estimate=12.5, max_abs_tmax_s=0.00002,
                          within_tolerance=True),
                PathTrial("onnxruntime", False, error="ImportError: no onnxruntime")],
        skipped={"bf16": "no native bf16 on this CPU (capability AVX2)"})
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    older = {**choice.to_dict(), "path": "fp32", "threads": 1, "trials": []}  # the same machine, measured before
    (settings.runtime_dir / "runtime-fedcba9876543210.json").write_text(json.dumps(older))
    os.utime(settings.runtime_dir / "runtime-fedcba9876543210.json", (1_000_000_000, 1_000_000_000))
    (settings.runtime_dir / "runtime-0123456789abcdef.json").write_text(json.dumps(choice.to_dict()))
    with _client(settings) as c:
        login(c, VIEWER)
        s = c.get("/api/system").json()
        page = c.get("/system").text
    (r,) = s["inference_runtimes"]
    assert (r["host"], r["path"], r["capability"], r["native_bf16"]) == ("worker-7", "openvino", "AVX2", False)
    assert [t["path"] for t in r["trials"]] == ["fp32", "openvino", "onnxruntime"] and not r["trials"][2]["ok"]
    assert "Inference path" in page and "worker-7" in page and "1.30x fp32 eager" in page
    assert "no native bf16 on this CPU" in page and "ImportError: no onnxruntime" in page


def test_readyz_fails_below_the_disk_watermark(data_dir):
    settings = make_settings(data_dir, disk_watermark_mb=10**9)
    populate(settings)
    with _client(settings) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["disk"].startswith("below watermark")


def test_readyz_fails_without_a_database(data_dir):
    settings = make_settings(data_dir, database_url=f"sqlite:///{data_dir}/nodir/x/../../nodir2/db.sqlite",
                             )
    (data_dir / "nodir2").mkdir()
    (data_dir / "nodir2" / "db.sqlite").mkdir()  # a directory where the DB file should be
    with _client(settings) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"].startswith("unreachable")


def test_metrics_from_the_job_store(env):
    settings, _ = env
    with _client(settings) as c:
        text = c.get("/metrics").text
    values = dict(re.findall(r"^(synthperf_[^ ]+) ([0-9.e+]+)$", text, flags=re.M))
    per_study = sum(spec[3] for spec in SERIES_SPEC)
    flair = [spec[3] for spec in SERIES_SPEC if spec[2] == "FLAIR"][0]
    assert float(values["synthperf_instances_received_total"]) == 5 * per_study - flair  # study 2 lacks FLAIR
    assert float(values["synthperf_associations_rejected_total"]) == 2
    assert float(values['synthperf_jobs{state="running"}']) == 1
    assert float(values['synthperf_jobs{state="input_missing"}']) == 1
    assert float(values['synthperf_studies{state="input_missing"}']) == 1
    assert float(values["synthperf_push_failures_total"]) == 4 * 7  # dead rows: 7 attempts each
    # synthesize took 18.5 s in the two finished jobs that ran it: not under 10 s, under 20 s
    assert float(values['synthperf_stage_duration_seconds_bucket{le="10.0",stage="synthesize"}']) == 0
    assert float(values['synthperf_stage_duration_seconds_bucket{le="20.0",stage="synthesize"}']) == 2
    assert float(values['synthperf_stage_duration_seconds_count{stage="classify"}']) == 4


# --------------------------------------------------------------------------- actions (JSON API)


def test_api_writes_need_csrf_and_admin(env):
    settings, rows = env
    with _client(settings) as c:
        token = login(c, VIEWER)
        for path in API_POSTS:
            assert c.post(_fmt(path, rows), json={"confirm": "x"}).status_code == 403, path  # no CSRF header
        for path in API_POSTS:
            r = c.post(_fmt(path, rows), json={"confirm": str(rows.done)}, headers={"X-CSRF-Token": token})
            assert r.status_code == 403 and "admin" in r.json()["detail"], path
        with session_scope(settings.effective_database_url) as db:
            assert db.get(Job, rows.done) is not None
    denied = audit_rows(settings, "denied")
    assert [(a.user, a.detail["action"]) for a in denied] == [
        (VIEWER[0], "retry"), (VIEWER[0], "repush"), (VIEWER[0], "cancel"), (VIEWER[0], "delete")]


def test_retry_from_stage_queues_the_pipeline(env):
    settings, rows = env
    with _client(settings) as c:
        token = login(c, ADMIN)
        h = {"X-CSRF-Token": token}
        r = c.post(f"/api/jobs/{rows.failed}/retry", json={"stage": "load"}, headers=h)
        assert r.status_code == 200 and r.json()["state"] == "queued"
        assert c.post(f"/api/jobs/{rows.running}/retry", json={"stage": "load"}, headers=h).status_code == 409
        assert c.post(f"/api/jobs/{rows.failed}/retry", json={"stage": "nope"}, headers=h).status_code == 422
        assert c.get("/api/system").json()["queues"]["queues"]["cpu"] == 1
    msgs = broker_messages(settings, "cpu")
    assert len(msgs) == 1
    body = msgs[0].read_text()
    assert "pipeline.run" in body
    with session_scope(settings.effective_database_url) as db:
        job = db.get(Job, rows.failed)
        assert job.state == JobState.QUEUED and job.error is None
    (entry,) = audit_rows(settings, "retry")
    assert entry.user == ADMIN[0] and entry.target == f"job:{rows.failed}"
    assert entry.detail == {"from_stage": "load", "previous_state": "input_missing"}


def test_retry_message_carries_job_id_and_stage(env):
    """Decode the real Celery message: args [job_id], kwargs {"from_stage": ...}."""
    import base64
    import json

    settings, rows = env
    with _client(settings) as c:
        token = login(c, ADMIN)
        c.post(f"/api/jobs/{rows.done}/retry", json={"stage": "synthesize"}, headers={"X-CSRF-Token": token})
    msg = json.loads(broker_messages(settings, "cpu")[0].read_text())
    assert msg["headers"]["task"] == "pipeline.run"
    args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
    assert args == [rows.done] and kwargs == {"from_stage": "synthesize"}


def test_repush_marks_deliveries_pending_and_queues_push(env):
    settings, rows = env
    with _client(settings) as c:
        token = login(c, ADMIN)
        h = {"X-CSRF-Token": token}
        r = c.post(f"/api/jobs/{rows.delivering}/repush", json={"only_unsent": True}, headers=h)
        assert r.status_code == 200 and r.json()["detail"] == {"objects": 4}
        assert c.post(f"/api/jobs/{rows.running}/repush", headers=h).status_code == 409
        assert c.post(f"/api/jobs/{rows.failed}/repush", headers=h).status_code == 409  # nothing encoded
        r = c.post(f"/api/jobs/{rows.done}/repush", headers=h)  # no body: everything again
        assert r.status_code == 200 and r.json()["detail"] == {"objects": 4}
    with session_scope(settings.effective_database_url) as db:
        states = {(d.destination.split("@")[0], d.state) for d in db.scalars(
            select(Delivery).where(Delivery.job_id == rows.delivering))}
        assert states == {("ORTHANC", DeliveryState.SENT), ("PACS2", DeliveryState.PENDING)}
        assert {d.state for d in db.scalars(select(Delivery).where(Delivery.job_id == rows.done))} == {"pending"}
        assert db.get(Job, rows.done).state == JobState.DELIVERING
    assert len(broker_messages(settings, "cpu")) == 2
    assert [a.detail["objects"] for a in audit_rows(settings, "repush")] == [4, 4]


def test_cancel(env):
    settings, rows = env
    with _client(settings) as c:
        h = {"X-CSRF-Token": login(c, ADMIN)}
        assert c.post(f"/api/jobs/{rows.queued}/cancel", headers=h).json()["state"] == "cancelled"
        assert c.post(f"/api/jobs/{rows.running}/cancel", headers=h).json()["state"] == "running"
        assert c.post(f"/api/jobs/{rows.done}/cancel", headers=h).status_code == 409
        assert c.post("/api/jobs/424242/cancel", headers=h).status_code == 404
    with session_scope(settings.effective_database_url) as db:
        assert db.get(Job, rows.running).cancel_requested is True
    assert len(audit_rows(settings, "cancel")) == 2


def test_delete_needs_confirmation_and_removes_outputs(env):
    settings, rows = env
    out = settings.output_dir / f"job-{rows.done}"
    assert out.is_dir()
    with _client(settings) as c:
        h = {"X-CSRF-Token": login(c, ADMIN)}
        r = c.post(f"/api/jobs/{rows.done}/delete", json={"confirm": "yes"}, headers=h)
        assert r.status_code == 400 and "type the job number" in r.json()["detail"]
        assert c.post(f"/api/jobs/{rows.running}/delete", json={"confirm": str(rows.running)}, headers=h).status_code == 409
        r = c.post(f"/api/jobs/{rows.done}/delete", json={"confirm": str(rows.done)}, headers=h)
        assert r.status_code == 200
        assert c.get(f"/api/jobs/{rows.done}").status_code == 404
    assert not out.exists()
    with session_scope(settings.effective_database_url) as db:
        study = db.scalar(select(Study).where(Study.accession_number == "ACC1001"))
        assert study is not None and len(study.series) == 4  # the study and its files stay
    (entry,) = audit_rows(settings, "delete")
    assert entry.detail["purge_study"] is False and entry.detail["outputs_removed"] == 1
    assert "DOE" not in str(entry.detail) and "2.25." not in str(entry.detail)


def test_delete_with_purge_removes_the_study_spool(env):
    settings, rows = env
    with session_scope(settings.effective_database_url) as db:
        uid = db.get(Job, rows.failed).study.study_uid
    spool = settings.spool_dir / uid
    other = [p for p in settings.spool_dir.iterdir() if p.name != uid]
    assert spool.is_dir() and len(other) == 4
    with _client(settings) as c:
        h = {"X-CSRF-Token": login(c, ADMIN)}
        r = c.post(f"/api/jobs/{rows.failed}/delete", json={"confirm": str(rows.failed), "purge_study": True}, headers=h)
        assert r.status_code == 200 and r.json()["detail"]["spool_dirs_removed"] == 1
    assert not spool.exists() and all(p.is_dir() for p in other)
    with session_scope(settings.effective_database_url) as db:
        assert db.scalar(select(Study).where(Study.study_uid == uid)) is None


# --------------------------------------------------------------------------- actions (forms)


def test_form_actions_with_csrf_flash_and_audit(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, ADMIN)
        page = c.get(f"/jobs/{rows.delivering}").text
        token = _csrf_from(page)
        assert c.post(f"/jobs/{rows.delivering}/repush", data={}).status_code == 403
        r = c.post(f"/jobs/{rows.delivering}/repush", data={"csrf_token": token})
        assert r.status_code == 200 and "8 object(s) queued" in r.text
        r = c.post(f"/jobs/{rows.running}/retry", data={"csrf_token": token, "stage": "core"})
        assert "cancel it first" in r.text  # 409 shown as a message on the job page
        r = c.post(f"/jobs/{rows.queued}/cancel", data={"csrf_token": token})
        assert "cancel requested" in r.text.lower()
        r = c.post(f"/jobs/{rows.done}/delete", data={"csrf_token": token, "confirm": "0"})
        assert "type the job number" in r.text
        r = c.post(f"/jobs/{rows.done}/delete", data={"csrf_token": token, "confirm": str(rows.done)})
        assert r.status_code == 200 and f"Job {rows.done} deleted" in r.text
        r = c.post(f"/jobs/{rows.failed}/retry", data={"csrf_token": token, "stage": "classify"})
        assert "queued again from stage classify" in r.text
        audit_page = c.get("/audit").text
    assert [a.action for a in audit_rows(settings) if a.action not in ("login",)] == [
        "repush", "cancel", "delete", "retry"]
    for action in ("repush", "cancel", "delete", "retry"):
        assert f"<td>{action}</td>" in audit_page


def test_form_actions_forbidden_for_viewers(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, VIEWER)
        token = _csrf_from(c.get(f"/jobs/{rows.done}").text)
        for action in ("repush", "retry", "cancel", "delete"):
            r = c.post(f"/jobs/{rows.done}/{action}", data={"csrf_token": token, "confirm": str(rows.done)})
            assert r.status_code == 403, action
    assert len(audit_rows(settings, "denied")) == 4


def test_redis_broker_queue_depth_and_enqueue(data_dir, redis_url):
    import redis

    settings = make_settings(data_dir, broker_url=redis_url)
    rows = populate(settings)
    client = redis.Redis.from_url(redis_url)
    client.delete("cpu", "gpu")
    try:
        with _client(settings) as c:
            h = {"X-CSRF-Token": login(c, ADMIN)}
            assert c.get("/api/system").json()["queues"] == {"broker": "redis", "queues": {"cpu": 0, "gpu": 0},
                                                             "error": None}
            assert c.post(f"/api/jobs/{rows.done}/repush", headers=h).status_code == 200
            assert client.llen("cpu") == 1
            assert c.get("/api/system").json()["queues"]["queues"]["cpu"] == 1
    finally:
        client.delete("cpu", "gpu")


def test_unreachable_broker_is_reported_not_crashed(data_dir):
    from tests.conftest import free_port

    settings = make_settings(data_dir, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    rows = populate(settings)
    with _client(settings) as c:
        login(c, ADMIN)
        q = c.get("/api/system").json()["queues"]
        assert q["error"].startswith("broker unreachable")
        assert "Queues" in c.get("/system").text
        # an action whose task cannot be queued changes nothing, and says what to check
        r = c.post(f"/api/jobs/{rows.done}/repush", headers={"X-CSRF-Token": c.get("/api/me").json()["csrf_token"]})
        assert r.status_code == 503 and "broker" in r.json()["detail"]
    with session_scope(settings.effective_database_url) as db:
        assert db.get(Job, rows.done).state == JobState.DONE
        assert {d.state for d in db.get(Job, rows.done).deliveries} == {DeliveryState.SENT}
    assert audit_rows(settings, "repush") == []


def test_production_hasher_is_argon2id_with_strong_parameters():
    from argon2 import PasswordHasher, extract_parameters

    import service.api.auth as auth

    h = PasswordHasher().hash("x" * 12)  # what the module uses outside tests
    assert h.startswith("$argon2id$")
    p = extract_parameters(h)
    assert p.memory_cost >= 19 * 1024 and p.time_cost >= 2
    assert auth.validate_password("long enough pw") and pytest.raises(ValueError, auth.validate_password, "short")


def test_admin_reads_audit_status_fragment_and_delete_confirmation(env):
    settings, rows = env
    with _client(settings) as c:
        login(c, ADMIN)
        entries = c.get("/api/audit").json()
        assert entries[0]["action"] == "login" and entries[0]["user"] == ADMIN[0]
        assert c.get("/api/audit", params={"limit": 0}).status_code == 422
        frag = c.get(f"/partials/jobs/{rows.failed}").text
        assert "input missing" in frag and "no FLAIR" in frag and "<html" not in frag
        page = c.get(f"/jobs/{rows.done}/delete").text
        assert f"Type the job number <b>{rows.done}</b>" in page and 'name="purge_study"' in page
        assert c.get("/jobs/999999/delete").status_code == 404


def test_task_is_queued_only_after_the_change_is_committed(env):
    """A worker may run the task the instant it is queued: what it reads then must be the new rows."""
    from service.api.actions import Enqueuer

    settings, rows = env
    seen: list[tuple[str, set[str]]] = []

    class Observing(Enqueuer):
        def send(self, task, args, kwargs=None):
            with session_scope(settings.effective_database_url) as db:  # another connection, like a worker
                job = db.get(Job, args[0])
                seen.append((job.state, {d.state for d in job.deliveries}))
            super().send(task, args, kwargs)

    with _client(settings) as c:
        c.app.state.enqueuer = Observing(settings)
        h = {"X-CSRF-Token": login(c, ADMIN)}
        assert c.post(f"/api/jobs/{rows.done}/repush", headers=h).status_code == 200
        assert c.post(f"/api/jobs/{rows.failed}/retry", json={"stage": "classify"}, headers=h).status_code == 200
    assert seen == [("delivering", {"pending"}), ("queued", set())]
