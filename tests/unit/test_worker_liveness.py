"""The system page and metrics count a worker as alive only when it beat recently *and* its pool
can run tasks (issue 16: a main Celery process kept beating while every pool process died)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.jobstore import dashboard_queries as dq
from common.jobstore.db import session_scope
from common.jobstore.models import Heartbeat
from common.jobstore.queries import init_db


def test_worker_whose_pool_is_down_is_not_alive(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    init_db(url)
    now = datetime.now(UTC)
    with session_scope(url) as s:
        s.add_all([
            Heartbeat(component="worker", instance="h:1:worker", at=now, info={"pool_ready": True, "pool_up": 1}),
            Heartbeat(component="worker", instance="h:2:worker", at=now, info={"pool_ready": False, "pool_up": 0}),
            Heartbeat(component="worker", instance="h:3:worker", at=now - timedelta(seconds=30),
                      info={"pool_ready": True}),
            Heartbeat(component="scp", instance="h:4:scp", at=now - timedelta(seconds=30), info={}),
        ])
    with session_scope(url) as s:
        beats = {b["instance"]: b for b in dq.heartbeats(s, now=now)}
    assert beats["h:1:worker"]["alive"]
    assert not beats["h:2:worker"]["alive"] and "pool cannot run tasks" in beats["h:2:worker"]["not_alive_because"]
    assert not beats["h:3:worker"]["alive"] and "no heartbeat for 30 s" == beats["h:3:worker"]["not_alive_because"]
    assert beats["h:4:scp"]["alive"]  # other components keep the longer limit


def test_metrics_count_only_workers_that_can_run_tasks(tmp_path) -> None:
    from common.config import Settings
    from service.api.metrics import make_registry

    settings = Settings(data_dir=tmp_path)
    init_db(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as s:
        s.add_all([Heartbeat(component="worker", instance="h:1:worker", info={"pool_ready": True}),
                   Heartbeat(component="worker", instance="h:2:worker", info={"pool_ready": False})])
    values = {m.name: m.samples[0].value for m in make_registry(settings).collect() if m.samples}
    assert values["synthperf_workers_alive"] == 1
    assert values["synthperf_stage_workers_lost"] == 0
