"""The worker's side of job leases (common/jobstore/leases.py): renew while running, stop if lost.

A :class:`LeaseKeeper` thread renews the job's lease every ``lease_renew_s`` while a task runs the
job's stages; torch and numpy release the GIL, so renewals keep coming during synthesis. If a
renewal finds the lease gone (another worker took the job over after this one stalled past the
lease), :class:`LeasedRecorder` stops the task before its next stage instead of racing the new
holder.
"""

from __future__ import annotations

import logging
import threading

from common.config import Settings
from common.errors import SynthperfError
from common.jobstore import leases
from common.jobstore.db import session_scope
from worker.pipeline.run import DbRecorder

log = logging.getLogger(__name__)


class LeaseLost(SynthperfError):
    """Another worker holds this job now; this task stops without recording anything."""


class LeaseKeeper:
    """Renews ``owner``'s lease on ``job_id`` every ``renew_s`` until stopped; releases it on stop."""

    def __init__(self, database_url: str, job_id: int, owner: str, lease_s: float, renew_s: float) -> None:
        if not 0 < renew_s < lease_s:
            raise ValueError(f"renew_s ({renew_s}) must be positive and shorter than lease_s ({lease_s})")
        self.url = database_url
        self.job_id = job_id
        self.owner = owner
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                with session_scope(self.url) as s:
                    ok = leases.renew(s, self.job_id, self.owner, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - job store unreachable: try again; expiry decides
                log.warning("lease renewal of job %d failed: %s", self.job_id, exc)
                continue
            if not ok:
                log.error("job %d: lease lost to another worker; stopping after this stage", self.job_id)
                self.lost.set()
                return

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing and give the lease up (after the job was handed on or finished)."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            with session_scope(self.url) as s:
                leases.release(s, self.job_id, self.owner)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("lease release of job %d failed: %s", self.job_id, exc)


class LeasedRecorder(DbRecorder):
    """A DbRecorder that refuses to start another stage once the lease is lost."""

    def __init__(self, settings: Settings, job_id: int, keeper: LeaseKeeper) -> None:
        super().__init__(settings, job_id)
        self.keeper = keeper

    def check_cancel(self) -> None:
        if self.keeper.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker took the job over")
        super().check_cancel()
