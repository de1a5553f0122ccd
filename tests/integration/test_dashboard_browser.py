"""The dashboard in a real headless Chromium over the real service.

``synthperf serve`` (SCP + completion + dashboard API) and a Celery worker run as processes on
the real Redis; a real Orthanc is the PACS. The test logs in as the admin created from
SYNTHPERF_ADMIN_PASSWORD, sends a phantom stroke study with storescu, and watches the live jobs
page go from "receiving" to "done" (delivered); it opens the job page, presses Re-push and sees
the objects delivered again. A screenshot of each page is taken; with SYNTHPERF_SCREENSHOTS=1 they
replace docs/screenshots/ (for a person to judge), otherwise they stay in the test's temp folder so
that `make test` leaves the work tree clean.

Chromium is Debian's /usr/bin/chromium driven by Playwright (never ``playwright install``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, free_port, require_tool
from tests.integration.harness import OrthancServer, ServiceProcesses, service_config, storescu
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = REPO_ROOT / "docs" / "screenshots"  # replaced by a temp folder unless SYNTHPERF_SCREENSHOTS=1
ADMIN_PASSWORD = "browser test admin pw"
VIEWPORT = {"width": 1440, "height": 900}


class DashboardService(ServiceProcesses):
    """``synthperf serve`` with the dashboard, plus a Celery worker, as process groups."""

    def __init__(self, folder: Path, redis_url: str, orthanc: OrthancServer, model: str) -> None:
        self.scp_port = free_port()
        self.api_port = free_port()
        self.redis_url = redis_url
        cfg = service_config(folder, redis_url, orthanc, model, self.scp_port,
                             api_host="127.0.0.1", api_port=self.api_port,
                             # long enough that the page sees the study "receiving" before its job starts
                             stable_age_s=8.0, completion_poll_s=0.2)
        super().__init__(folder, cfg, SYNTHPERF_ADMIN_PASSWORD=ADMIN_PASSWORD)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        import redis

        redis.Redis.from_url(self.redis_url).flushdb()
        self.spawn("serve", [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config), "--no-worker"])
        self.start_worker()
        echoscu = require_tool("echoscu")
        deadline = time.monotonic() + 90
        api_up = scp_up = False
        while time.monotonic() < deadline and not (api_up and scp_up):
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"service process exited:\n{self.logs()}")
            try:
                api_up = api_up or httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            scp_up = scp_up or subprocess.run([echoscu, "-aec", "SYNTHPERF", "127.0.0.1", str(self.scp_port)],
                                              capture_output=True, timeout=10).returncode == 0
            time.sleep(0.3)
        if not (api_up and scp_up):
            raise RuntimeError(f"service did not come up (api {api_up}, scp {scp_up}):\n{self.logs()}")


def _launch(playwright):
    if not Path(CHROMIUM).is_file():
        require_tool("chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.fixture(autouse=True)
def _screenshot_folder(tmp_path, monkeypatch):
    if os.environ.get("SYNTHPERF_SCREENSHOTS") != "1":
        monkeypatch.setattr(sys.modules[__name__], "SHOTS", tmp_path / "screenshots")


def _shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _watch_states(page, job_seen: dict, stop_when: str, timeout_s: float, service: DashboardService) -> list[str]:
    """Read the live jobs page (never reloaded: the page's own polling updates it) until the first
    job row shows ``stop_when``; return the distinct states seen, in order, "receiving" included."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = page.eval_on_selector_all(
            "#live .badge.state-receiving, #job-rows tr[data-job] .badge[class*='state-']",
            "els => els.map(e => e.textContent.trim())")
        for s in states[:1]:
            if not seen or seen[-1] != s:
                seen.append(s)
        row = page.query_selector("#job-rows tr[data-job]")
        if row is not None:
            job_seen["id"] = int(row.get_attribute("data-job"))
            if stop_when in (seen[-1:] or [""]):
                return seen
            if seen and seen[-1] in ("failed", "input missing", "cancelled"):
                raise AssertionError(f"job ended {seen[-1]}: {row.inner_text()}\n{service.logs()}")
        if "running" in seen and "running" not in job_seen:
            job_seen["running"] = True
            _shot(page, "jobs_running")
        time.sleep(0.4)
    raise AssertionError(f"timed out; states seen {seen}\n{service.logs()}")


@pytest.mark.slow
@pytest.mark.integration
def test_dashboard_watches_a_study_to_pacs_and_repushes(tmp_path, redis_url, model_ref):  # noqa: F811
    playwright_api = pytest.importorskip("playwright.sync_api")
    from sqlalchemy import select

    from common.jobstore.db import session_scope
    from common.jobstore.models import AuditEntry, Delivery, DeliveryState

    _case, study_dir = write_phantom(tmp_path / "phantom", seed=7, vendor="siemens", matrix=64)
    orthanc = OrthancServer(tmp_path / "orthanc")
    service = DashboardService(tmp_path / "svc", redis_url, orthanc, model_ref)
    try:
        orthanc.start()
        service.start()
        with playwright_api.sync_playwright() as pw:
            browser = _launch(pw)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(service.url + "/")
            assert "/login" in page.url  # login required
            _shot(page, "login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", ADMIN_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(service.url + "/")
            assert page.inner_text(".who").strip().lower().startswith("admin")

            sender = threading.Thread(target=storescu, args=(study_dir, service.scp_port), daemon=True)
            sender.start()
            job: dict = {}
            # receiving: the live page shows the study arriving before any job exists
            page.wait_for_selector("#live .badge.state-receiving", timeout=120_000)
            _shot(page, "jobs_receiving")
            seen = _watch_states(page, job, "done", 900, service)
            sender.join(60)
            _shot(page, "jobs")
            assert seen[0] == "receiving" and seen[-1] == "done", seen
            assert seen.index("receiving") < seen.index("done")

            # the job page: series with roles, measures, previews, every object sent
            page.click(f"#job-rows tr[data-job='{job['id']}'] a.joblink")
            page.wait_for_url(f"{service.url}/jobs/{job['id']}")
            text = page.inner_text("main")
            for words in ("used as DWI", "used as FLAIR", "Infarct core", "Objects sent to PACS", "Stage log"):
                assert words in text, words
            n_sent = page.eval_on_selector_all("#all-objects .badge.state-sent", "els => els.length")
            assert n_sent > 0 and page.query_selector("#all-objects .badge.state-pending") is None
            images = page.eval_on_selector_all(".previews img", "els => els.map(e => e.naturalWidth)")
            assert images and all(w > 0 for w in images), images
            _shot(page, "job")

            # re-push: every object goes to PACS again, the page says so and shows them sent again
            page.click("#btn-repush")
            page.wait_for_selector(".flash-ok")
            assert "queued to be sent to PACS again" in page.inner_text(".flash-ok")
            _shot(page, "job_repush")
            settings = service.settings
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with session_scope(settings.effective_database_url) as s:
                    rows = s.scalars(select(Delivery).where(Delivery.job_id == job["id"])).all()
                    if rows and all(r.state == DeliveryState.SENT and r.attempts >= 2 for r in rows):
                        break
                time.sleep(0.5)
            else:
                raise AssertionError(f"re-push did not complete: {[(r.state, r.attempts) for r in rows]}\n"
                                     f"{service.logs()}")
            assert len(rows) == n_sent
            page.wait_for_selector("#job-status .badge.state-done", timeout=60_000)
            with session_scope(settings.effective_database_url) as s:
                audit = [(a.user, a.action) for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
            assert ("admin", "login") in audit and ("admin", "repush") in audit

            page.goto(service.url + "/system")
            assert "up" in page.inner_text(".tiles")
            _shot(page, "system")
            page.goto(service.url + "/audit")
            _shot(page, "audit")
            page.goto(f"{service.url}/jobs/{job['id']}/delete")
            _shot(page, "delete_confirm")

            # a viewer made with the CLI sees the same job with patient identifiers masked, no actions
            r = subprocess.run([sys.executable, "-m", "cli.main", "users", "add", "nightnurse", "--role", "viewer"],
                               input="viewer password 1\n", text=True, capture_output=True, env=service.env,
                               cwd=REPO_ROOT, timeout=120)
            assert r.returncode == 0, r.stderr
            viewer = browser.new_context(viewport=VIEWPORT).new_page()
            viewer.goto(service.url + "/login")
            viewer.fill("input[name=username]", "nightnurse")
            viewer.fill("input[name=password]", "viewer password 1")
            viewer.click("button[type=submit]")
            viewer.wait_for_url(service.url + "/")
            row = viewer.inner_text(f"#job-rows tr[data-job='{job['id']}']")
            assert "•••" in row and "PHANTOM" not in row, row
            _shot(viewer, "jobs_viewer")
            viewer.goto(f"{service.url}/jobs/{job['id']}")
            assert viewer.query_selector("#btn-repush") is None
            browser.close()
    finally:
        service.stop()
        orthanc.stop()
