"""Dashboard latency with a busy job store: what a 3 a.m. page load and each 3 s poll cost.

``python -m bench.dashboard [N_JOBS]`` fills a fresh SQLite job store with N jobs (default 2000),
each with 7 stages and 33 deliveries (the object count of one real phantom run), then times the
pages and API calls in-process (FastAPI TestClient, logged in as an admin), side by side with
the reference ``GET /healthz`` (the framework's round trip with no job-store work). Prints the
median and the ratio to the reference; writes them into docs/benchmarks.md under its heading.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Dashboard (issue 9)"
STAGES = ("classify", "load", "core", "synthesize", "measure", "encode", "push")


def fill(url: str, n_jobs: int) -> int:
    from sqlalchemy import insert

    from common.jobstore.db import get_engine
    from common.jobstore.models import Delivery, Instance, Job, Series, Stage, Study

    t0 = datetime.now(UTC) - timedelta(days=30)
    studies, series, instances, jobs, stages, deliveries = [], [], [], [], [], []
    for i in range(1, n_jobs + 1):
        at = t0 + timedelta(minutes=20 * i)
        studies.append(dict(id=i, study_uid=f"2.25.{i}", patient_id=f"P{i}", patient_name=f"DOE^J{i}",
                            accession_number=f"ACC{i:06d}", calling_aet=f"MR{i % 4}", first_received_at=at,
                            last_received_at=at))
        series.append(dict(id=i, study_id=i, series_uid=f"2.25.{i}.1", modality="MR", series_number=1,
                           first_received_at=at, last_received_at=at))
        instances.append(dict(series_id=i, sop_instance_uid=f"2.25.{i}.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                              transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"{i}/1/1.dcm", size_bytes=1,
                              sha256="0" * 64, received_at=at))
        jobs.append(dict(id=i, study_id=i, version=1, state="done", trigger="stable_age", instance_count=1,
                         progress=1.0, warnings=[], created_at=at, started_at=at, finished_at=at + timedelta(seconds=40),
                         result={"measures": {"core_ml": 10.0, "tmax6_ml": 80.0, "mismatch_ml": 70.0,
                                              "mismatch_ratio": 8.0, "defuse3": True}}))
        for k, name in enumerate(STAGES):
            stages.append(dict(job_id=i, name=name, state="done", attempt=1, started_at=at + timedelta(seconds=k),
                               finished_at=at + timedelta(seconds=k + 1), duration_s=1.0 + k, warnings=[]))
        for k in range(33):
            deliveries.append(dict(job_id=i, destination="PACS@10.0.0.1:104", sop_instance_uid=f"2.25.{i}.9.{k}",
                                   sop_class_uid="1.2.840.10008.5.1.4.1.1.7", path=f"/out/{i}/{k}.dcm", state="sent",
                                   attempts=1, created_at=at, next_attempt_at=at, delivered_at=at))
    engine = get_engine(url)
    with engine.begin() as conn:
        for table, rows in ((Study, studies), (Series, series), (Instance, instances), (Job, jobs),
                            (Stage, stages), (Delivery, deliveries)):
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start:start + 5000])
    return n_jobs


def timed(client, path: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get(path)
        samples.append(time.perf_counter() - t)
        assert r.status_code == 200, (path, r.status_code)
    return statistics.median(samples) * 1000


def main() -> int:
    from fastapi.testclient import TestClient

    from common.config import load_settings
    from common.jobstore.db import session_scope
    from common.jobstore.queries import init_db
    from service.api.app import create_app
    from service.api.auth import create_user

    n_jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    repeat = 15
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(data_dir=Path(tmp), secret_key="b" * 32)
        init_db(settings.effective_database_url)
        t = time.perf_counter()
        fill(settings.effective_database_url, n_jobs)
        fill_s = time.perf_counter() - t
        with session_scope(settings.effective_database_url) as db:
            create_user(db, "bench", "bench password", "admin")
        with TestClient(create_app(settings)) as c:
            token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
            c.post("/login", data={"username": "bench", "password": "bench password", "csrf_token": token})
            ref = timed(c, "/healthz", repeat)
            rows = [("GET /healthz (reference)", ref)]
            for label, path in (("GET /api/jobs (50 newest)", "/api/jobs"),
                                ("GET / (jobs page)", "/"),
                                ("GET /partials/jobs (3 s poll)", "/partials/jobs"),
                                ("GET /api/jobs?accession=ACC0012", "/api/jobs?accession=ACC0012"),
                                ("GET /jobs/{id} (job page)", f"/jobs/{n_jobs // 2}"),
                                ("GET /partials/jobs/{id} (3 s poll)", f"/partials/jobs/{n_jobs // 2}"),
                                ("GET /api/system", "/api/system"),
                                ("GET /metrics", "/metrics")):
                rows.append((label, timed(c, path, repeat)))
    lines = [f"Job store: SQLite, {n_jobs} jobs x (7 stages, 33 deliveries) = {n_jobs * 40} rows besides "
             f"studies (filled in {fill_s:.1f} s); median of {repeat} in-process requests, admin session; "
             f"2 shared cores, load average {os.getloadavg()[0]:.1f} (other helpers' work: absolute ms are noisy, "
             f"compare within one run).", "", "| request | median ms | x reference |", "|---|---:|---:|"]
    for label, ms in rows:
        lines.append(f"| {label} | {ms:.1f} | {ms / ref:.1f} |")
    text = "\n".join(lines)
    print(text)
    _write_section(text)
    return 0


def _write_section(body: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{HEADING}\n\n`python -m bench.dashboard` ({datetime.now(UTC):%Y-%m-%d}).\n\n{body}\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        new = old[:start] + section + (old[nxt:] if nxt != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
