"""When a received study becomes a job.

A study with instances no job covers yet fires, in this order of precedence:

* ``expected_count`` - every series of the study declares its size in its headers (see
  ``receiver.declared_images``) and has at least that many images;
* ``stable_age``     - nothing arrived for ``stable_age_s`` seconds (default 10);
* ``ceiling``        - the first uncovered instance arrived ``completion_ceiling_s`` ago, even if
  instances still trickle in.

Instances that arrive after a job was created make the study pending again; the next firing
creates a follow-up job that supersedes the previous one (``queries.create_job``). Nothing is
dropped. The job is handed to the broker by task name with its id only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from common.config import Settings
from common.jobstore import queries
from common.jobstore.db import session_scope

log = logging.getLogger("synthperf.completion")

Enqueue = Callable[[int], None]


def decide(p: queries.StudyProgress, now: datetime, stable_age_s: float, ceiling_s: float) -> str | None:
    """The completion rule that fires for a study now, or None (pure; unit-tested)."""
    if p.series and all(exp is not None and got >= exp for _sid, exp, got in p.series):
        return "expected_count"
    if (now - p.last_received_at).total_seconds() >= stable_age_s:
        return "stable_age"
    if (now - p.first_pending_at).total_seconds() >= ceiling_s:
        return "ceiling"
    return None


def celery_enqueuer(settings: Settings) -> Enqueue:
    """Enqueue ``pipeline.run`` on queue ``cpu`` through the configured broker."""
    from common.queue import QUEUE_CPU, TASK_PIPELINE, make_celery

    app = make_celery(settings)

    def enqueue(job_id: int) -> None:
        app.send_task(TASK_PIPELINE, args=[job_id], queue=QUEUE_CPU)

    return enqueue


class CompletionLoop:
    """Polls the job store every ``poll_s`` (or at once when ``kick()``ed) and creates jobs."""

    def __init__(
        self,
        database_url: str,
        enqueue: Enqueue,
        *,
        stable_age_s: float = 10.0,
        ceiling_s: float = 600.0,
        poll_s: float = 0.2,
    ) -> None:
        for name, value in (("stable_age_s", stable_age_s), ("ceiling_s", ceiling_s), ("poll_s", poll_s)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.database_url = database_url
        self.enqueue = enqueue
        self.stable_age_s = stable_age_s
        self.ceiling_s = ceiling_s
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsent: list[int] = []  # job ids whose enqueue failed; retried every pass
        self.jobs_created = 0
        self.last_pass_at: float | None = None
        self.next_due_s: float | None = None  # seconds until the earliest pending study can fire

    @classmethod
    def from_settings(cls, settings: Settings, enqueue: Enqueue) -> CompletionLoop:
        return cls(
            settings.effective_database_url,
            enqueue,
            stable_age_s=settings.stable_age_s,
            ceiling_s=settings.completion_ceiling_s,
            poll_s=settings.completion_poll_s,
        )

    def kick(self) -> None:
        """Wake the loop now (the receiver calls this when a declared series is complete)."""
        self._wake.set()

    def run_once(self, now: datetime | None = None) -> list[int]:
        """One pass: create and enqueue the jobs that are due; return their ids."""
        now = now or datetime.now(UTC)
        created: list[tuple[int, str, str, int]] = []
        next_due: float | None = None
        with session_scope(self.database_url) as s:
            for p in queries.studies_with_pending_instances(s):
                trigger = decide(p, now, self.stable_age_s, self.ceiling_s)
                if trigger is None:
                    due = min(
                        self.stable_age_s - (now - p.last_received_at).total_seconds(),
                        self.ceiling_s - (now - p.first_pending_at).total_seconds(),
                    )
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                job = queries.create_job(s, p.study_id, trigger, p.instance_count)
                created.append((job.id, p.study_uid, trigger, p.instance_count))
        self.next_due_s = next_due
        ids = []
        for job_id, study_uid, trigger, count in created:
            self.jobs_created += 1
            log.info(
                "job %d created for study %s by %s (%d instances)",
                job_id, study_uid[-12:], trigger, count, extra={"job_id": job_id},
            )
            self._unsent.append(job_id)
            ids.append(job_id)
        self._send_pending()
        return ids

    def _send_pending(self) -> None:
        still: list[int] = []
        for job_id in self._unsent:
            try:
                self.enqueue(job_id)
            except Exception as exc:  # noqa: BLE001 - broker down: keep the job, retry next pass
                log.error("could not enqueue job %d (will retry): %s", job_id, exc, extra={"job_id": job_id})
                still.append(job_id)
        self._unsent = still

    def _sleep_s(self) -> float:
        """Until the earliest study can fire, but at least ``poll_s`` and at most ``idle_s``.

        Arrivals only push a study's stable_age further out, so waking at the computed time is
        never late for known studies; the ``idle_s`` cap bounds the delay for studies first seen
        after this pass (and for instances recorded by other processes). A declared series that
        completes wakes the loop at once through ``kick()``.
        """
        idle_s = max(self.poll_s, min(1.0, self.stable_age_s))
        if self._unsent:
            return self.poll_s
        if self.next_due_s is None:
            return idle_s
        return min(idle_s, max(self.poll_s / 4, self.next_due_s))

    def info(self) -> dict[str, object]:
        return {"jobs_created": self.jobs_created, "unsent": len(self._unsent), "last_pass_at": self.last_pass_at}

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            try:
                self.run_once()
                self.last_pass_at = time.time()
            except Exception:  # noqa: BLE001
                log.exception("completion pass failed")
            self._wake.wait(self._sleep_s())
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
