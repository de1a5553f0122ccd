"""Beyond one machine (issue 19), as real processes on loopback: PostgreSQL as the job store, a
private Redis as the broker, a real Orthanc as the PACS, DCMTK storescu as the scanners.

1. Two gateway replicas (``synthperf serve --no-api --no-worker`` under replica ids ``gw-a`` and
   ``gw-b``, one data dir, each with its SCP and its completion loop) receive one study split over
   four associations, two to each: one job, one set of results in Orthanc. The identical study sent
   again (the halves swapped between replicas) adds no instance, so no job and no object; a late
   series (a repeated localizer, new UIDs) sent to both makes one follow-up job that supersedes the
   first, and Orthanc holds each object of both jobs once.
2. A second gateway on a SQLite job store is refused at start-up with a message that says why.
3. Two workers, each in its own mount and UTS namespace (``unshare``: a private bind mount of the
   shared volume at the data dir, its own host name, as two pods on two nodes mounting one
   ReadWriteMany volume), one gateway on the volume's own path, one Redis: ten small studies (four in
   make test's small form) complete, every object is delivered exactly once; one worker is SIGKILLed (both processes, as a
   node that dies) while a job synthesizes, and that job finishes on the other worker after its
   lease expired (the holder is on "another host", so only expiry can free it).

The waits are bounds, not timing assertions; the figures (run with ``-s``) are in docs/operations.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from tests.conftest import free_port, require_tool, small_scale
from tests.integration import harness
from tests.integration.harness import OrthancServer, PrivateRedis, ServiceProcesses, service_config
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export
from tests.integration.test_worker_faults import _delivered_once

BOUND_S = 300.0  # the most any one wait may take on a loaded 2-core machine


def send_files(files: list[Path], port: int, aet: str = "SCANNER") -> None:
    """One storescu association carrying ``files``; fails on any error."""
    exe = require_tool("storescu")
    r = subprocess.run([exe, "-aec", "SYNTHPERF", "-aet", aet, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def send_parallel(parts: list[tuple[list[Path], int]]) -> None:
    """Each (files, port) on its own association, all at once (a router fanning a study out)."""
    errors: list[BaseException] = []

    def one(files: list[Path], port: int) -> None:
        try:
            send_files(files, port)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=p) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=BOUND_S)
    assert not errors, errors[0]


def study_files(study_dir: Path) -> list[Path]:
    return sorted(f for f in study_dir.rglob("*.dcm") if f.is_file())


def quarters(files: list[Path]) -> list[list[Path]]:
    """Four parts of a study, dealt out in turn so that every series is split between parts."""
    return [files[k::4] for k in range(4)]


def copy_as_new_series(files: list[Path], out: Path) -> list[Path]:
    """The same images as a new series (new Series and SOP Instance UIDs): a repeated acquisition."""
    out.mkdir(parents=True)
    series_uid = generate_uid()
    written = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = 99
        path = out / f"late_{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def copy_as_new_study(study_dir: Path, out: Path) -> Path:
    """The same images as another study (new Study, Series and SOP Instance UIDs): ten studies for the
    price of one phantom."""
    study_uid, series_uids = generate_uid(), {}
    for f in study_files(study_dir):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / f.relative_to(study_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
    return out


class World(ServiceProcesses):
    """Our processes on one PostgreSQL job store; ``spawn_env`` adds per-process environment."""

    def spawn_env(self, name: str, argv: list[str], **env: str) -> subprocess.Popen:
        from tests.conftest import REPO_ROOT

        proc = subprocess.Popen(argv, env={**self.env, **env}, cwd=REPO_ROOT,
                                stdout=(self.folder / f"{name}.log").open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def serve_argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "cli.main", "serve", "--config", str(self.config), "--no-api", "--no-worker",
                "--port", str(port)]

    def worker_argv(self) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", "cpu,gpu",
                "--concurrency", "1", "--disable-prefetch", "--loglevel", "INFO", "--without-gossip",
                "--without-mingle"]

    def wait_ready(self, ports: list[int], workers: int) -> None:
        """Every SCP answers C-ECHO and ``workers`` workers report a pool process ready."""
        from common.jobstore.db import session_scope
        from common.jobstore.models import Heartbeat

        echoscu = require_tool("echoscu")
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead, f"exited: {dead}\n{self.logs()}"
            up = all(subprocess.run([echoscu, "-aec", "SYNTHPERF", "127.0.0.1", str(p)], capture_output=True,
                                    timeout=10).returncode == 0 for p in ports)
            try:
                with session_scope(self.settings.effective_database_url) as s:
                    ready = sum(1 for h in s.scalars(select(Heartbeat).where(Heartbeat.component == "worker"))
                                if (h.info or {}).get("pool_ready"))
            except Exception:  # noqa: BLE001 - the schema may not exist yet
                ready = 0
            if up and ready >= workers:
                return
            time.sleep(0.5)
        raise AssertionError(f"not ready\n{self.logs()}")


def jobs(url: str) -> list:
    """The jobs as ORM rows (these tests read their version, instance count and lease too)."""
    from common.jobstore.db import session_scope
    from common.jobstore.models import Job

    with session_scope(url) as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def wait_jobs(url: str, predicate, world: World, poll_s: float = 0.3):  # type: ignore[no-untyped-def]
    return harness.wait_jobs(url, predicate, BOUND_S, world.logs, poll_s=poll_s, read=jobs)


def instance_count(url: str) -> int:
    from common.jobstore.db import session_scope
    from common.jobstore.models import Instance

    with session_scope(url) as s:
        return int(s.scalar(select(func.count(Instance.id))))


def created_lines(world: World, names: list[str]) -> dict[str, int]:
    return {n: (world.folder / f"{n}.log").read_text(errors="replace").count(" created for study ") for n in names}


@pytest.mark.slow
@pytest.mark.integration
def test_two_gateway_replicas_one_study_one_job(tmp_path, redis_url, postgres_url, model_ref):  # noqa: F811
    from common.jobstore.db import session_scope
    from common.jobstore.models import Heartbeat, JobState
    from common.jobstore.queries import studies_with_pending_instances
    from common.jobstore.replicas import live_replicas

    _case, study = write_phantom(tmp_path / "phantom", seed=21, vendor="siemens", matrix=32)
    files = study_files(study)
    orthanc = OrthancServer(tmp_path / "orthanc")
    broker = PrivateRedis(tmp_path / "redis", redis_url)
    ports = [free_port(), free_port()]
    world = World(tmp_path / "svc", service_config(tmp_path / "svc", broker.start(), orthanc, model_ref, ports[0],
                                                   database_url=postgres_url, samples=1, ddim_steps=1))
    url = postgres_url
    try:
        orthanc.start()
        world.spawn_env("gw-a", world.serve_argv(ports[0]), SYNTHPERF_REPLICA_ID="gw-a")
        world.spawn_env("gw-b", world.serve_argv(ports[1]), SYNTHPERF_REPLICA_ID="gw-b")
        world.spawn_env("worker", world.worker_argv())
        world.wait_ready(ports, workers=1)
        assert {r.replica_id for r in live_replicas(url, 30)} == {"gw-a", "gw-b"}

        # 1. one study, four associations, two replicas
        t0 = time.monotonic()
        send_parallel([(part, ports[k % 2]) for k, part in enumerate(quarters(files))])
        (job,) = wait_jobs(url, lambda rows: rows if rows and all(j.state in JobState.FINAL for j in rows) else None,
                           world)
        first_s = time.monotonic() - t0
        assert job.state == JobState.DONE and job.version == 1 and job.instance_count == len(files), job.error
        logs = created_lines(world, ["gw-a", "gw-b"])
        assert sorted(logs.values()) == [0, 1], logs  # both loops ran, one made the job
        with session_scope(url) as s:
            beats = s.scalars(select(Heartbeat).where(Heartbeat.component == "completion")).all()
            assert len({b.instance.split(":")[1] for b in beats}) == 2  # two completion loops (two pids)
            received = {(b.info or {}).get("replica_id"): (b.info or {}).get("instances_stored", 0)
                        for b in s.scalars(select(Heartbeat).where(Heartbeat.component == "scp"))}
        assert set(received) == {"gw-a", "gw-b"}  # the system page can tell the replicas apart
        _delivered_once(orthanc, world.settings, [job.id])
        objects_v1 = len(orthanc.instances())

        # 2. the identical study again, halves swapped: duplicates, nothing new to do
        send_parallel([(part, ports[(k + 1) % 2]) for k, part in enumerate(quarters(files))])
        assert instance_count(url) == len(files)
        with session_scope(url) as s:
            assert studies_with_pending_instances(s) == []  # so no replica can ever fire a job for it
        assert [j.id for j in jobs(url)] == [job.id]
        assert len(orthanc.instances()) == objects_v1

        # 3. late instances through both replicas: one follow-up job, superseding the first
        localizer = sorted({f.parent for f in files if "localizer" in f.parent.name.lower()})
        late = copy_as_new_series(study_files(localizer[0]), tmp_path / "late")
        t1 = time.monotonic()
        send_parallel([(late[0::2], ports[0]), (late[1::2], ports[1])])
        rows = wait_jobs(url, lambda rows: rows if len(rows) == 2 and rows[1].state in JobState.FINAL else None, world)
        follow_s = time.monotonic() - t1
        v1, v2 = rows
        assert v2.state == JobState.DONE, v2.error
        assert (v2.version, v2.instance_count, v2.supersedes_job_id) == (2, len(files) + len(late), v1.id)
        assert v1.state == JobState.SUPERSEDED
        assert sum(created_lines(world, ["gw-a", "gw-b"]).values()) == 2
        _delivered_once(orthanc, world.settings, [v1.id, v2.id])
        print(f"\ntwo replicas: {len(files)} instances over 4 associations -> 1 job, done and in Orthanc "
              f"{first_s:.1f} s after the first byte ({objects_v1} objects); scp heartbeats {received}; "
              f"re-send: 0 new instances, 0 jobs; {len(late)} late instances -> job v2 done in {follow_s:.1f} s, "
              f"Orthanc {len(orthanc.instances())} objects, each stored once")
    finally:
        world.stop()
        orthanc.stop()
        broker.stop()


@pytest.mark.integration
def test_a_second_gateway_on_sqlite_is_refused(tmp_path):
    cfg = {"data_dir": str(tmp_path / "data"), "scp_host": "127.0.0.1", "scp_port": free_port()}
    world = ServiceProcesses(tmp_path / "svc", cfg)
    argv = [sys.executable, "-m", "cli.main", "serve", "--config", str(world.config), "--no-api", "--no-worker"]
    first = world.spawn("first", argv)
    try:
        deadline = time.monotonic() + 120
        log = world.folder / "first.log"
        while "listening on" not in log.read_text(errors="replace"):
            assert first.poll() is None and time.monotonic() < deadline, world.logs()
            time.sleep(0.2)
        env = {**world.env, "SYNTHPERF_REPLICA_ID": "second", "SYNTHPERF_DATA_DIR": str(tmp_path / "data")}
        second = subprocess.run([*argv, "--port", str(free_port())], env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert "SQLite serves one gateway on one node" in second.stderr and "PostgreSQL" in second.stderr
        assert str(first.pid) in second.stderr  # names the gateway already running
    finally:
        world.stop()


# --------------------------------------------------------------------------- shared volume, two workers


def _unshare() -> str:
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) is needed to give each worker its own mount and host name")
    probe = subprocess.run([exe, "-m", "-u", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"mount/UTS namespaces not available here: {probe.stderr.decode(errors='replace')[-300:]}")
    return exe


@pytest.mark.slow
@pytest.mark.integration
def test_two_workers_on_one_shared_volume_deliver_ten_studies_once(tmp_path, redis_url, postgres_url,
                                                                   model_ref):  # noqa: F811
    from common.jobstore.db import session_scope
    from common.jobstore.models import JobState, Stage

    unshare = _unshare()
    # the ten studies in the full form (115-118 s on 2 loaded cores); four in make test, where the
    # kill comes once one is done: both workers are at work by then and three are still to run
    n_studies, done_before_kill = (4, 1) if small_scale() else (10, 3)
    first = write_phantom(tmp_path / "p0", seed=40, vendor="siemens", matrix=32)[1]
    studies = [first] + [copy_as_new_study(first, tmp_path / f"p{i}") for i in range(1, n_studies)]
    volume, mount = tmp_path / "volume", tmp_path / "mnt"  # the volume; the path each worker mounts it at
    volume.mkdir()
    mount.mkdir()
    orthanc = OrthancServer(tmp_path / "orthanc")
    broker = PrivateRedis(tmp_path / "redis", redis_url)
    port = free_port()
    world = World(tmp_path / "svc", service_config(
        tmp_path / "svc", broker.start(), orthanc, model_ref, port, database_url=postgres_url, data_dir=str(volume),
        samples=1, ddim_steps=1, lease_s=10.0, lease_renew_s=2.0, lease_reap_s=1.0))
    url = postgres_url
    workers: dict[str, subprocess.Popen] = {}
    try:
        orthanc.start()
        world.spawn_env("gateway", world.serve_argv(port))
        for name in ("worker-a", "worker-b"):
            script = (f'mount --bind "{volume}" "{mount}" && hostname {name} && exec "$@"')
            workers[name] = world.spawn_env(name, [unshare, "-m", "-u", "sh", "-c", script, "sh",
                                                   *world.worker_argv()], SYNTHPERF_DATA_DIR=str(mount))
        world.wait_ready([port], workers=2)
        assert not any(mount.iterdir()), "the bind mounts must be private to the workers"

        t0 = time.monotonic()
        send_parallel([(study_files(st), port) for st in studies])

        def synthesizing(rows):  # type: ignore[no-untyped-def]
            """A job in synthesis once some are done: both workers have been at work by then."""
            if sum(j.state == JobState.DONE for j in rows) < done_before_kill:
                return None
            for j in rows:
                if j.current_stage == "synthesize" and j.state == JobState.RUNNING and j.lease_owner:
                    return j
            return None

        victim_job = wait_jobs(url, synthesizing, world, poll_s=0.05)
        victim_host = victim_job.lease_owner.split(":")[0]
        assert victim_host in workers, victim_job.lease_owner
        os.killpg(workers[victim_host].pid, signal.SIGKILL)  # the node dies: main and pool process at once
        killed_at = datetime.now(UTC)
        workers[victim_host].wait(10)
        survivor = ({"worker-a", "worker-b"} - {victim_host}).pop()

        rows = wait_jobs(url, lambda rows: rows if len(rows) == n_studies and all(j.state in JobState.FINAL for j in rows)
                         else None, world, poll_s=0.5)
        total_s = time.monotonic() - t0
        assert [j.state for j in rows] == [JobState.DONE] * n_studies, [(j.id, j.state, j.error) for j in rows]
        with session_scope(url) as s:
            stages = s.scalars(select(Stage).where(Stage.job_id == victim_job.id).order_by(Stage.id)).all()
            synth = [st for st in stages if st.name == "synthesize"]
            by_host = {w: s.scalar(select(func.count(Stage.id)).where(Stage.worker.like(f"{w}:%"))) for w in workers}
        assert [st.state for st in synth] == ["failed", "done"], [(st.state, st.error) for st in synth]
        assert "lease of" in synth[0].error and "expired" in synth[0].error  # freed by expiry, not by a pid check
        assert synth[1].worker.startswith(f"{survivor}:")
        requeued_after_s = (synth[0].finished_at.replace(tzinfo=UTC) if synth[0].finished_at.tzinfo is None
                            else synth[0].finished_at) - killed_at
        _delivered_once(orthanc, world.settings, [j.id for j in rows])
        outputs = {p.name for p in (volume / "outputs").iterdir()}
        assert outputs == {f"job_{j.id}" for j in rows}  # every job's outputs on the one volume
        print(f"\nshared volume: {n_studies} studies (matrix 32) on 2 workers, {victim_host} SIGKILLed in synthesize of job "
              f"{victim_job.id}: lost stage closed {requeued_after_s.total_seconds():.1f} s after the kill (lease_s 10, "
              f"reap every 1 s), finished on {survivor}; all {n_studies} done and delivered once in {total_s:.1f} s; "
              f"stages per worker {by_host}; {len(orthanc.instances())} objects in Orthanc")
    finally:
        world.stop()
        orthanc.stop()
        broker.stop()
