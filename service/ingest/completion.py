"""When a received study becomes a job.

Completion is decided per study, never per series: a study arrives in pieces (one series or one
multi-frame object per association, series minutes apart) and nothing in an instance says which
series are still to come. A series that declares its size (``receiver.declared_images``) is
complete when it has that many images; a declaration completes only that series. A study with
instances no job covers yet fires:

* ``expected_count`` - nothing arrived for ``stable_age_s`` (default 10) and every series that has
  arrived declares its size and has it;
* ``stable_age``     - nothing arrived for ``stable_age_s`` and no declared series is short (the
  others declare nothing, so the quiet time is all there is to go by);
* ``incomplete``     - a declared series is still short after ``incomplete_series_wait_s``
  (default 30) of quiet: declarations can be too large (a router that forwards a subset, a
  vendor that counts the whole acquisition), and a stroke study must not wait for the ceiling;
* ``ceiling``        - the first uncovered instance arrived ``completion_ceiling_s`` ago, even if
  instances still trickle in.

Instances that arrive after a job was created make the study pending again; the next firing
creates a follow-up job that supersedes the earlier ones, whatever their state
(``queries.create_job``; each pass also marks jobs that finished after being superseded,
``queries.supersede_finished``). Nothing is dropped. The job is handed to the broker by task
name with its id only, by whichever replica's pass finds it unsent (``jobs.enqueued_at`` NULL), so a
gateway that dies between making a job and sending it loses nothing.
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


def _short_series(p: queries.StudyProgress) -> bool:
    """Whether a series that declared its size has fewer images than it declared."""
    return any(exp is not None and got < exp for _sid, exp, got in p.series)


def quiet_needed_s(p: queries.StudyProgress, stable_age_s: float, incomplete_wait_s: float) -> float:
    """How long the study must have been quiet to fire: longer while a declared series is short."""
    return max(stable_age_s, incomplete_wait_s) if _short_series(p) else stable_age_s


def decide(
    p: queries.StudyProgress, now: datetime, stable_age_s: float, ceiling_s: float, incomplete_wait_s: float
) -> str | None:
    """The completion rule that fires for a study now, or None (pure; unit-tested)."""
    quiet_s = (now - p.last_received_at).total_seconds()
    if quiet_s >= quiet_needed_s(p, stable_age_s, incomplete_wait_s):
        if _short_series(p):
            return "incomplete"
        if p.series and all(exp is not None for _sid, exp, _got in p.series):
            return "expected_count"
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
        incomplete_wait_s: float = 30.0,
    ) -> None:
        for name, value in (("stable_age_s", stable_age_s), ("ceiling_s", ceiling_s), ("poll_s", poll_s),
                            ("incomplete_wait_s", incomplete_wait_s)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.database_url = database_url
        self.enqueue = enqueue
        self.stable_age_s = stable_age_s
        self.ceiling_s = ceiling_s
        self.poll_s = poll_s
        self.incomplete_wait_s = incomplete_wait_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.unsent = 0  # jobs left unsent by the last pass (broker down); the job store keeps them
        self.jobs_created = 0
        self.claims_skipped = 0  # due studies left to another replica (claimed there, or already done there)
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
            incomplete_wait_s=settings.incomplete_series_wait_s,
        )

    def kick(self) -> None:
        """Wake the loop now (the receiver calls this when a declared series is complete, which
        shortens the quiet time its study needs from ``incomplete_wait_s`` to ``stable_age_s``)."""
        self._wake.set()

    def run_once(self, now: datetime | None = None) -> list[int]:
        """One pass: create and enqueue the jobs that are due; return their ids.

        Every gateway replica runs this loop (issue 19). The due studies are found without locks;
        each is then claimed in its own short transaction (``queries.claim_study``: ``FOR UPDATE SKIP
        LOCKED`` on PostgreSQL) and looked at again under the claim, so a study another replica is
        making a job for is skipped, and one whose job another replica has just committed is no
        longer pending. One study's job per firing, whichever replica fires it.
        """
        now = now or datetime.now(UTC)
        created: list[tuple[int, str, str, int]] = []
        next_due: float | None = None
        due_ids: list[int] = []
        with session_scope(self.database_url) as s:
            for p in queries.studies_with_pending_instances(s):
                trigger = decide(p, now, self.stable_age_s, self.ceiling_s, self.incomplete_wait_s)
                if trigger is None:
                    due = min(
                        quiet_needed_s(p, self.stable_age_s, self.incomplete_wait_s)
                        - (now - p.last_received_at).total_seconds(),
                        self.ceiling_s - (now - p.first_pending_at).total_seconds(),
                    )
                    next_due = due if next_due is None else min(next_due, due)
                    continue
                due_ids.append(p.study_id)
        for study_id in due_ids:
            with session_scope(self.database_url) as s:
                if not queries.claim_study(s, study_id):
                    self.claims_skipped += 1  # another replica holds it right now
                    continue
                fresh = queries.studies_with_pending_instances(s, study_id)
                trigger = decide(fresh[0], now, self.stable_age_s, self.ceiling_s, self.incomplete_wait_s) \
                    if fresh else None
                if trigger is None:
                    self.claims_skipped += 1  # another replica made the job between our look and our claim
                    continue
                p = fresh[0]
                job = queries.create_job(s, p.study_id, trigger, p.instance_count)
                created.append((job.id, p.study_uid, trigger, p.instance_count))
        with session_scope(self.database_url) as s:
            for job_id in queries.supersede_finished(s):
                log.info("job %d superseded by a newer job of its study", job_id, extra={"job_id": job_id})
        self.next_due_s = next_due
        ids = []
        for job_id, study_uid, trigger, count in created:
            self.jobs_created += 1
            log.info(
                "job %d created for study %s by %s (%d instances)",
                job_id, study_uid[-12:], trigger, count, extra={"job_id": job_id},
            )
            ids.append(job_id)
        self._send_unsent()
        return ids

    def _send_unsent(self) -> None:
        """Hand every job not yet sent to the broker, whichever replica made it (the job store is the
        outbox); stop at the first failure (the broker is down) and leave the rest for the next pass."""
        with session_scope(self.database_url) as s:
            pending = queries.claim_unsent_jobs(s)
            sent = 0
            for job_id in pending:
                try:
                    self.enqueue(job_id)
                except Exception as exc:  # noqa: BLE001 - broker down: the job stays unsent, retried next pass
                    log.error("could not enqueue job %d (will retry): %s", job_id, exc, extra={"job_id": job_id})
                    break
                queries.mark_enqueued(s, job_id)
                sent += 1
        self.unsent = len(pending) - sent

    def _sleep_s(self) -> float:
        """Until the earliest study can fire, but at least ``poll_s`` and at most ``idle_s``.

        Arrivals only push a study's stable_age further out, so waking at the computed time is
        never late for known studies; the ``idle_s`` cap bounds the delay for studies first seen
        after this pass (and for instances recorded by other processes). A declared series that
        completes wakes the loop through ``kick()``, since it brings its study's due time forward.
        """
        idle_s = max(self.poll_s, min(1.0, self.stable_age_s))
        if self.unsent:
            return self.poll_s
        if self.next_due_s is None:
            return idle_s
        return min(idle_s, max(self.poll_s / 4, self.next_due_s))

    def info(self) -> dict[str, object]:
        return {"jobs_created": self.jobs_created, "claims_skipped": self.claims_skipped, "unsent": self.unsent,
                "last_pass_at": self.last_pass_at}

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
