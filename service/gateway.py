"""The DICOM gateway as one object: job store, spool, receiver, SCP, completion loop, heartbeats.

``synthperf serve`` builds one; tests build one in-process on a free port. Start-up order
matters: the schema is migrated, leftovers of interrupted writes are removed and unrecorded
complete files are recorded *before* the SCP listens, so a restart after a crash resumes from a
consistent spool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from common.config import Settings
from common.heartbeat import Heartbeat
from common.jobstore.leases import LeaseReaper
from common.jobstore.queries import init_db
from common.jobstore.replicas import ReplicaRegistration
from service.ingest.completion import CompletionLoop, Enqueue, celery_enqueuer
from service.ingest.dataset import MalformedDatasetError
from service.ingest.receiver import Receiver
from service.ingest.spool import Spool
from service.scp.contexts import STORAGE_SOP_CLASSES
from service.scp.server import ScpServer

log = logging.getLogger("synthperf.gateway")

SHARED_TEMP_AGE_S = 3600.0  # a temp file in a shared spool untouched this long is a dead replica's leftover


def _celery_sender(settings: Settings) -> Callable[[str, tuple[object, ...]], object]:
    """Send a task by name through the configured broker (created on first use, not at start-up)."""
    app: list[Any] = []

    def send(name: str, args: tuple[object, ...]) -> object:
        if not app:
            from common.queue import make_celery

            app.append(make_celery(settings))
        return app[0].send_task(name, args=args)

    return send


class Gateway:
    def __init__(
        self,
        settings: Settings,
        enqueue: Enqueue | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        heartbeat_s: float = 5.0,
        ssl_context: Any = None,
    ) -> None:
        self.settings = settings
        self.url = settings.effective_database_url
        init_db(self.url)
        self.spool = Spool(settings.spool_dir, fsync=settings.spool_fsync)
        # Who this gateway is among several (issue 19); register() refuses a second one on SQLite.
        self.registration = ReplicaRegistration(self.url, settings.replica_id, str(settings.data_dir.resolve()),
                                                lease_s=settings.replica_lease_s)
        self.completion = CompletionLoop.from_settings(settings, enqueue or celery_enqueuer(settings))
        self.receiver = Receiver(
            self.url, self.spool, frozenset(STORAGE_SOP_CLASSES), on_series_complete=self.completion.kick
        )
        self.scp = ScpServer(settings, self.receiver, host=host, port=port, ssl_context=ssl_context)
        replica = {"replica_id": settings.replica_id}  # which gateway replica beats (issue 19; "" = the only one)
        self.heartbeat = Heartbeat(
            self.url, {"scp": lambda: {**self.scp.info(), **replica},
                       "completion": lambda: {**self.completion.info(), **replica}}, period_s=heartbeat_s
        )
        # Re-queues jobs whose worker died (issue 16); workers run one too, the job store decides who acts.
        self.reaper = LeaseReaper(self.url, _celery_sender(settings), lease_s=settings.lease_s,
                                  max_attempts=settings.max_stage_attempts, period_s=settings.lease_reap_s)

    def recover(self) -> dict[str, int]:
        """Remove temp files and record complete files that have no row (crash leftovers).

        A named replica may share its spool with others (one ReadWriteMany volume): their temp
        files are writes in flight, so only those abandoned for an hour are removed.
        """
        removed = self.spool.remove_temp_files(older_than_s=SHARED_TEMP_AGE_S if self.settings.replica_id else 0.0)
        recorded = 0
        for path in self.spool.final_files():
            sop = path.name[: -len(".dcm")]
            if self.receiver._writer.find(sop) is not None:
                continue
            try:
                outcome = self.receiver.receive_file_bytes(path.read_bytes(), calling_aet=None)
            except (MalformedDatasetError, OSError) as exc:
                # Never acknowledged (no row) and not a complete data set: the sender will resend.
                log.warning("recovery: removing incomplete unrecorded file %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            recorded += int(outcome.status == 0 and not outcome.duplicate)
        if removed or recorded:
            log.warning("recovery: removed %d partial temp files, recorded %d unrecorded files", removed, recorded)
        return {"temp_removed": removed, "recorded": recorded}

    def start(self) -> int:
        """Register, recover the spool, then listen; raises ReplicaConflictError before any of it
        when this gateway may not run beside a live one (a second gateway on SQLite)."""
        others = self.registration.register()
        if others:
            log.info("gateway replica %r starts beside %d live replica(s): %s", self.settings.replica_id, len(others),
                     ", ".join(o.replica_id or "(unnamed)" for o in others))
        self.registration.start()
        try:
            self.recover()
            port = self.scp.start()
        except BaseException:
            self.registration.stop()  # not running after all: let another gateway start at once
            self.registration.unregister()
            raise
        self.completion.start()
        self.heartbeat.start()
        self.reaper.start()
        return port

    def stop(self) -> None:
        self.scp.stop()
        self.completion.stop()
        self.heartbeat.stop()
        self.reaper.stop()
        self.registration.stop()
        try:
            self.heartbeat.beat()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.registration.unregister()
        except Exception:  # noqa: BLE001 - the row expires by itself
            log.warning("could not remove this gateway's replica row; it expires after %.0f s",
                        self.settings.replica_lease_s)
