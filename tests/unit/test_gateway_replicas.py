"""Several gateway replicas on one job store (issue 19).

* The completion claim: several completion loops (one per replica) that find the same studies due
  make exactly one job per study, on PostgreSQL with ``FOR UPDATE SKIP LOCKED``; a study whose row
  another replica holds is skipped without waiting and fired by a later pass; a follow-up job for
  late instances is made once too.
* The replica registry: a second gateway on SQLite is refused with a message that says why and
  what to do; PostgreSQL takes several named replicas but not two under one name; a dead holder's
  row (SIGKILLed process on this host) or an expired row does not block a restart.
* The shared spool: a replica's start-up removes only temp files abandoned for an hour.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from common.jobstore.db import get_engine, session_scope
from common.jobstore.models import GatewayReplica, Instance, Job, JobState, Study
from common.jobstore.queries import init_db
from common.jobstore.replicas import ReplicaConflictError, ReplicaRegistration, live_replicas
from service.ingest.completion import CompletionLoop
from service.ingest.receiver import Receiver
from service.ingest.spool import TEMP_PREFIX, Spool
from tests.unit.test_ingest_receiver import _send, encode, make_ds


def _loop(url: str, sent: list[int]) -> CompletionLoop:
    return CompletionLoop(url, sent.append, stable_age_s=10, ceiling_s=60, poll_s=0.1, incomplete_wait_s=30)


def _studies(rx: Receiver, n: int, images: int = 3) -> list[str]:
    uids = []
    for _ in range(n):
        study, series = generate_uid(), generate_uid()
        for i in range(images):
            _send(rx, make_ds(study, series, InstanceNumber=i + 1))
        uids.append(study)
    return uids


def _jobs(url: str) -> list[tuple[str, int, int, str]]:
    with session_scope(url) as s:
        return [(j.study.study_uid, j.version, j.instance_count, j.state) for j in s.query(Job).order_by(Job.id)]


def test_replicas_completion_loops_make_one_job_per_study(tmp_path: Path, postgres_url: str) -> None:
    """Four loops, each on its own thread and connection, run their passes at the same moment."""
    init_db(postgres_url)
    rx = Receiver(postgres_url, Spool(tmp_path / "spool", fsync=False))
    uids = _studies(rx, 12)
    now = datetime.now(UTC) + timedelta(seconds=11)
    sent: list[list[int]] = [[] for _ in range(4)]
    loops = [_loop(postgres_url, sent[k]) for k in range(4)]
    start = threading.Barrier(len(loops))
    errors: list[BaseException] = []

    def one(loop: CompletionLoop) -> None:
        try:
            start.wait(timeout=30)
            loop.run_once(now)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(lp,)) for lp in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    jobs = _jobs(postgres_url)
    assert sorted(j[0] for j in jobs) == sorted(uids)  # one job per study, no unique-key failure
    assert all(j[1] == 1 and j[2] == 3 for j in jobs)
    enqueued = [i for s in sent for i in s]
    assert sorted(enqueued) == sorted(set(enqueued)) and len(enqueued) == 12  # each job sent once
    assert sum(lp.jobs_created for lp in loops) == 12
    assert sum(lp.claims_skipped for lp in loops) <= 3 * 12  # the other looks at a study were skips
    for lp in loops:  # later passes in any replica find nothing more to do
        assert lp.run_once(now + timedelta(seconds=5)) == []


def test_a_study_held_by_another_replica_is_skipped_then_fired(tmp_path: Path, postgres_url: str) -> None:
    init_db(postgres_url)
    rx = Receiver(postgres_url, Spool(tmp_path / "spool", fsync=False))
    held_uid, free_uid = _studies(rx, 2)
    sent: list[int] = []
    loop = _loop(postgres_url, sent)
    now = datetime.now(UTC) + timedelta(seconds=11)
    with get_engine(postgres_url).connect() as other:  # another replica, mid-claim on one study
        other.execute(select(Study.id).where(Study.study_uid == held_uid).with_for_update())
        result: list[list[int]] = []
        t = threading.Thread(target=lambda: result.append(loop.run_once(now)))
        t.start()
        t.join(timeout=30)  # a pass that waited for the lock would wait for as long as it is held
        blocked = t.is_alive()
        other.rollback()
        t.join(timeout=30)
        assert not blocked, "the completion pass waited for the other replica's lock instead of skipping"
        assert [j[0] for j in _jobs(postgres_url)] == [free_uid] and len(result[0]) == 1
        assert loop.claims_skipped == 1
    created = loop.run_once(now)
    assert len(created) == 1 and {j[0] for j in _jobs(postgres_url)} == {held_uid, free_uid}


def test_a_follow_up_for_late_instances_is_made_once_across_replicas(tmp_path: Path, postgres_url: str) -> None:
    init_db(postgres_url)
    rx_a = Receiver(postgres_url, Spool(tmp_path / "spool", fsync=False))
    rx_b = Receiver(postgres_url, Spool(tmp_path / "spool", fsync=False))  # a second gateway, same shared spool
    study, series = generate_uid(), generate_uid()
    for i in range(3):
        _send(rx_a if i % 2 else rx_b, make_ds(study, series, InstanceNumber=i + 1))
    loops = [_loop(postgres_url, []), _loop(postgres_url, [])]
    t = datetime.now(UTC) + timedelta(seconds=11)
    assert len(loops[0].run_once(t)) == 1 and loops[1].run_once(t) == []
    late_series = generate_uid()
    for i in range(2):  # late instances, one to each gateway
        _send(rx_b if i % 2 else rx_a, make_ds(study, late_series, InstanceNumber=i + 1))
    t = datetime.now(UTC) + timedelta(seconds=11)
    made = [loops[1].run_once(t), loops[0].run_once(t)]
    assert sorted(len(m) for m in made) == [0, 1]
    jobs = _jobs(postgres_url)
    assert [(j[1], j[2], j[3]) for j in jobs] == [(1, 3, JobState.SUPERSEDED), (2, 5, JobState.QUEUED)]


def test_a_job_whose_gateway_died_before_sending_it_is_sent_by_another(tmp_path: Path, jobstore_url: str) -> None:
    """Gateway A commits the job, then dies (here: its broker send fails and it is never called
    again); the job store is the outbox, so gateway B's next pass sends it, once."""
    init_db(jobstore_url)
    rx = Receiver(jobstore_url, Spool(tmp_path / "spool", fsync=False))
    (uid,) = _studies(rx, 1)

    def dead(_job_id: int) -> None:
        raise ConnectionError("gateway A died before its send")

    a = CompletionLoop(jobstore_url, dead, stable_age_s=10, ceiling_s=60, poll_s=0.1, incomplete_wait_s=30)
    t = datetime.now(UTC) + timedelta(seconds=11)
    [job_id] = a.run_once(t)
    assert a.info()["unsent"] == 1
    sent_b: list[int] = []
    b = _loop(jobstore_url, sent_b)
    assert b.run_once(t) == [] and sent_b == [job_id] and b.info()["unsent"] == 0
    assert b.run_once(t + timedelta(seconds=1)) == [] and sent_b == [job_id]  # sent once, not every pass
    with session_scope(jobstore_url) as s:
        assert s.get(Job, job_id).enqueued_at is not None


# --------------------------------------------------------------------------- registry


def test_sqlite_refuses_a_second_gateway_with_a_clear_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'js.db'}"
    init_db(url)
    first = ReplicaRegistration(url, "", str(tmp_path / "a"))
    assert first.register() == []
    for name in ("", "gw-2"):  # the same (unnamed) gateway again, or a named second one
        with pytest.raises(ReplicaConflictError) as exc:
            ReplicaRegistration(url, name, str(tmp_path / "b")).register()
        text = str(exc.value)
        assert str(tmp_path / "a") in text and first.owner in text
        if name:
            assert "SQLite serves one gateway on one node" in text and "PostgreSQL" in text
    first.unregister()
    again = ReplicaRegistration(url, "gw-2", str(tmp_path / "b"))
    assert again.register() == []  # the first one stopped: a single gateway may start
    again.unregister()


def test_postgresql_takes_named_replicas_but_not_two_under_one_name(tmp_path: Path, postgres_url: str) -> None:
    init_db(postgres_url)
    a = ReplicaRegistration(postgres_url, "gw-a", "/data")
    b = ReplicaRegistration(postgres_url, "gw-b", "/data")
    assert a.register() == []
    assert [o.replica_id for o in b.register()] == ["gw-a"]
    assert {r.replica_id for r in live_replicas(postgres_url, 30)} == {"gw-a", "gw-b"}
    with pytest.raises(ReplicaConflictError, match="give each replica its own replica_id"):
        ReplicaRegistration(postgres_url, "gw-a", "/data").register()
    assert a.renew() and b.renew()
    b.unregister()
    assert [r.replica_id for r in live_replicas(postgres_url, 30)] == ["gw-a"]
    a.unregister()


def test_a_dead_or_expired_holder_does_not_block_a_restart(tmp_path: Path, jobstore_url: str) -> None:
    init_db(jobstore_url)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_owner = f"{os.uname().nodename}:{int(dead.stdout)} gw-dead"  # a SIGKILLed gateway on this host
    now = datetime.now(UTC)
    with session_scope(jobstore_url) as s:
        s.add(GatewayReplica(replica_id="", owner=dead_owner, data_dir="/old", started_at=now, seen_at=now))
        s.add(GatewayReplica(replica_id="gone", owner="other-node:1 gw-x", data_dir="/x",
                             started_at=now - timedelta(minutes=5), seen_at=now - timedelta(minutes=5)))
    reg = ReplicaRegistration(jobstore_url, "", str(tmp_path))
    assert reg.register() == []  # neither the dead holder nor the expired row counts
    with session_scope(jobstore_url) as s:
        assert s.get(GatewayReplica, "").owner == reg.owner
        s.execute(update(GatewayReplica).where(GatewayReplica.replica_id == "gone")
                  .values(seen_at=datetime.now(UTC)))
    if jobstore_url.startswith("sqlite"):  # a live row on another node: SQLite refuses it
        with pytest.raises(ReplicaConflictError):
            ReplicaRegistration(jobstore_url, "", str(tmp_path)).register()
    reg.unregister()


def test_renew_fails_loudly_when_another_process_took_the_id(tmp_path: Path, postgres_url: str) -> None:
    init_db(postgres_url)
    reg = ReplicaRegistration(postgres_url, "gw-a", "/data", lease_s=30)
    reg.register()
    with session_scope(postgres_url) as s:
        s.execute(update(GatewayReplica).values(owner="elsewhere:1 gw-z"))
    assert reg.renew() is False
    with session_scope(postgres_url) as s:
        s.query(GatewayReplica).delete()
    assert reg.renew() is True  # removed behind its back: taken again
    reg.unregister()


def test_registration_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        ReplicaRegistration("sqlite://", "a", None, lease_s=0)
    with pytest.raises(ValueError, match="renew_s"):
        ReplicaRegistration("sqlite://", "a", None, lease_s=10, renew_s=6)
    with pytest.raises(ValueError, match="replica_id"):
        ReplicaRegistration("sqlite://", "x" * 65, None)


def test_a_shared_spool_keeps_young_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    d = spool.root / "1.2" / "1.2.3"
    d.mkdir(parents=True)
    young, old = d / f"{TEMP_PREFIX}a.dcm.1", d / f"{TEMP_PREFIX}b.dcm.2"
    young.write_bytes(b"in flight on another gateway")
    old.write_bytes(b"left by a gateway that died an hour ago")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert spool.remove_temp_files(older_than_s=3600) == 1
    assert young.exists() and not old.exists()
    assert spool.remove_temp_files() == 1 and not young.exists()  # the single gateway removes them all
    with pytest.raises(ValueError, match="older_than_s"):
        spool.remove_temp_files(older_than_s=-1)


def test_two_gateways_storing_one_instance_on_a_shared_spool_keep_the_recorded_file(
        tmp_path: Path, jobstore_url: str) -> None:
    """Gateway B receives the same SOP Instance between gateway A's link and A's row (a scanner's
    retry routed to the other replica). B waits for the row, then takes the file over and records
    it; A's insert then meets B's row naming the very same file, which must stay (it used to be
    unlinked, leaving a row without its file)."""
    init_db(jobstore_url)
    a = Receiver(jobstore_url, Spool(tmp_path / "spool", fsync=False))
    b = Receiver(jobstore_url, Spool(tmp_path / "spool", fsync=False))
    ds = make_ds(generate_uid(), generate_uid(), InstanceNumber=1)
    add = a._writer.add
    seen: list[object] = []

    def add_after_b(values, study_id, touch):  # type: ignore[no-untyped-def]
        seen.append(_send(b, ds))
        return add(values, study_id, touch)

    a._writer.add = add_after_b  # type: ignore[method-assign]
    out_a = _send(a, ds)
    (out_b,) = seen
    assert out_b.status == 0 and not out_b.duplicate
    assert out_a.status == 0 and out_a.duplicate and not out_a.conflict
    path = a.spool.root / out_a.relpath
    assert path.is_file() and path.read_bytes().endswith(encode(ds))
    with session_scope(jobstore_url) as s:
        assert s.query(Instance).count() == 1


def test_in_process_gateways_on_sqlite_one_at_a_time(tmp_path: Path) -> None:
    """A gateway that cannot listen leaves no registration behind; a second gateway on the same
    SQLite job store is refused while the first runs and starts once it stopped."""
    import socket

    from common.config import load_settings
    from service.gateway import Gateway

    settings = load_settings(data_dir=tmp_path / "d", disk_watermark_mb=0)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            Gateway(settings, lambda _job: None, host="127.0.0.1", port=taken.getsockname()[1]).start()
    finally:
        taken.close()
    first = Gateway(settings, lambda _job: None, host="127.0.0.1", port=0)
    first.start()
    try:
        second = Gateway(settings.model_copy(update={"replica_id": "other"}), lambda _job: None, host="127.0.0.1",
                         port=0)
        with pytest.raises(ReplicaConflictError, match="SQLite serves one gateway"):
            second.start()
    finally:
        first.stop()
    second.start()
    second.stop()
    assert live_replicas(first.url, 30) == []
