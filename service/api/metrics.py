"""Prometheus metrics computed from the job store at scrape time.

The job store is the single source of truth, and several processes (SCP, workers) write it; a
collector that reads it on each scrape gives the same numbers whichever API replica is scraped,
with no per-process counters to lose on restart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from common.config import Settings
from common.jobstore import dashboard_queries as dq
from common.jobstore.db import session_scope

STAGE_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))


class JobStoreCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self._url = settings.effective_database_url

    def collect(self) -> Iterator[Metric]:
        with session_scope(self._url) as db:
            instances = dq.instance_count(db)
            events = dq.scp_event_counts(db)
            states = dq.jobs_by_state(db)
            study_states = dq.studies_by_state(db)
            deliveries = dq.deliveries_by_state(db)
            failed_attempts = dq.failed_delivery_attempts(db)
            durations = dq.stage_durations(db)
            beats = dq.heartbeats(db)
            lost = dq.workers_lost(db)

        g = GaugeMetricFamily("synthperf_workers_alive",
                              "Workers that beat recently and whose pool can run tasks (issue 16)")
        g.add_metric([], sum(1 for b in beats if b["component"] == "worker" and b["alive"]))
        yield g
        c = CounterMetricFamily("synthperf_stage_workers_lost", "Stage attempts whose worker died (lease lost)")
        c.add_metric([], lost)
        yield c
        c = CounterMetricFamily("synthperf_instances_received", "DICOM instances stored by the SCP")
        c.add_metric([], instances)
        yield c
        c = CounterMetricFamily("synthperf_associations_rejected", "Associations the SCP rejected")
        c.add_metric([], events.get("rejected", 0))
        yield c
        c = CounterMetricFamily("synthperf_scp_events", "SCP events by kind", labels=["kind"])
        for kind, n in sorted(events.items()):
            c.add_metric([kind], n)
        yield c
        g = GaugeMetricFamily("synthperf_jobs", "Jobs by state", labels=["state"])
        for state, n in states.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("synthperf_studies", "Studies by the state of their latest job", labels=["state"])
        for state, n in study_states.items():
            g.add_metric([state], n)
        yield g
        g = GaugeMetricFamily("synthperf_deliveries", "Output objects by delivery state", labels=["state"])
        for state, n in deliveries.items():
            g.add_metric([state], n)
        yield g
        c = CounterMetricFamily("synthperf_push_failures", "C-STORE attempts to a destination that failed")
        c.add_metric([], failed_attempts)
        yield c

        by_stage: dict[str, list[float]] = defaultdict(list)
        for name, seconds in durations:
            by_stage[name].append(seconds)
        h = HistogramMetricFamily("synthperf_stage_duration_seconds", "Pipeline stage durations", labels=["stage"])
        for name in sorted(by_stage):
            values = by_stage[name]
            buckets = [(("+Inf" if b == float("inf") else repr(b)), sum(1 for v in values if v <= b)) for b in STAGE_BUCKETS]
            h.add_metric([name], buckets, sum(values))
        yield h


def make_registry(settings: Settings) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobStoreCollector(settings))
    return registry
