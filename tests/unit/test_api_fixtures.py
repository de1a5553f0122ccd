"""Realistic job-store rows for the dashboard tests (no tests here; imported by test_api*.py).

The rows look like what the SCP, completion loop and pipeline write for a stroke MRI study: a
study with localizer, DWI, ADC and FLAIR series, instances on disk in the spool, jobs in every
state with stage rows, classifier evidence, registration metrics, measures, deliveries, SCP
events and heartbeats — and PNG previews in the output dir.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from argon2 import PasswordHasher
from PIL import Image
from sqlalchemy.orm import Session

from common.config import Settings, load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import (
    Base,
    Delivery,
    DeliveryState,
    Heartbeat,
    Instance,
    Job,
    JobState,
    ScpEvent,
    Series,
    Stage,
    StageState,
    Study,
)
from service.api.auth import create_user

ADMIN = ("alice", "correct horse battery")
VIEWER = ("victor", "viewer password 1")
ORTHANC = "ORTHANC@127.0.0.1:4242"
PACS2 = "PACS2@10.0.0.9:104"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=45)
PREVIEWS = ("dwi.png", "flair.png", "core.png", "tmax.png", "tmax_sd.png")


def cheap_hasher() -> PasswordHasher:
    """argon2id with test-sized cost: same code paths, milliseconds instead of half a second."""
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return load_settings(data_dir=data_dir, secret_key="test-secret-key-" + "x" * 24, **overrides)


def init_schema(settings: Settings) -> None:
    """Create the tables the way production does when the migrations exist, else from the models."""
    try:
        from common.jobstore.queries import init_db  # written by the gateway helper
    except ImportError:
        init_db = None
    if init_db is not None:
        init_db(settings.effective_database_url)
    else:
        from common.jobstore.db import get_engine

        Base.metadata.create_all(get_engine(settings.effective_database_url))


def _uid(*parts: object) -> str:
    digest = int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:20], 16)
    return f"2.25.{digest}"


@dataclass
class Populated:
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    delivering: int = 0
    job_ids: list[int] = field(default_factory=list)


SERIES_SPEC = (
    # number, description, role, count, the classifier's record (as SeriesClassification.to_dict writes it)
    (1, "localizer", "OTHER", 3, {"rule": "localizer", "confidence": 0.99, "b_values": [],
                                  "evidence": [["localizer", "ImageType", "ORIGINAL\\PRIMARY\\LOCALIZER"]]}),
    (4, "ep2d_diff_3scan_trace_p2", "DWI", 20, {"rule": "dwi_siemens_private", "confidence": 0.98,
                                               "b_values": [0, 1000], "trace": True,
                                               "evidence": [["dwi_siemens_private", "(0019,100C)", "0, 1000"],
                                                            ["dwi_siemens_private", "ImageType", "DIFFUSION\\TRACEW"]]}),
    (5, "ep2d_diff_3scan_trace_p2_ADC", "ADC", 10, {"rule": "adc_image_type", "confidence": 0.97, "b_values": [],
                                                    "evidence": [["adc_image_type", "ImageType", "DERIVED\\ADC"]]}),
    (7, "t2_tirm_tra_dark-fluid", "FLAIR", 10, {"rule": "flair_ir", "confidence": 0.95, "b_values": [],
                                                "evidence": [["flair_ir", "ScanningSequence", "SE\\IR"],
                                                             ["flair_ir", "InversionTime", "2500"]]}),
)


def add_study(db: Session, settings: Settings, n: int, *, accession: str, aet: str = "MR_STROKE_1",
              with_flair: bool = True, at: datetime = T0) -> Study:
    study_uid = _uid("study", n)
    study = Study(study_uid=study_uid, patient_id=f"PID{n:05d}", patient_name=f"DOE^JANE{n}",
                  accession_number=accession, study_date=at.strftime("%Y%m%d"),
                  study_description="MR HEAD STROKE", calling_aet=aet,
                  first_received_at=at, last_received_at=at + timedelta(seconds=40))
    db.add(study)
    db.flush()
    for number, desc, _role, count, _ev in SERIES_SPEC:
        if desc.startswith("t2_tirm") and not with_flair:
            continue
        series_uid = _uid("series", n, number)
        s = Series(study_id=study.id, series_uid=series_uid, modality="MR", series_number=number,
                   series_description=desc, first_received_at=at, last_received_at=at + timedelta(seconds=30))
        db.add(s)
        db.flush()
        for i in range(count):
            rel = f"{study_uid}/{series_uid}/{i:04d}.dcm"
            path = settings.spool_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * 128 + b"DICM")
            db.add(Instance(series_id=s.id, sop_instance_uid=_uid("sop", n, number, i),
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax_uid="1.2.840.10008.1.2.1",
                            instance_number=i + 1, path=rel, size_bytes=132, sha256="0" * 64,
                            calling_aet=aet, received_at=at + timedelta(seconds=i % 30)))
    db.flush()
    return study


def _classify_detail(n: int, with_flair: bool) -> dict:
    records = []
    for number, desc, role, _count, ev in SERIES_SPEC:
        if desc.startswith("t2_tirm") and not with_flair:
            continue
        records.append({"series_instance_uid": _uid("series", n, number), "series_number": number,
                        "series_description": desc, "role": role, **ev})
    selection = {"dwi": {"series_instance_uid": _uid("series", n, 4)}, "b_high": 1000.0,
                 "adc": {"series_instance_uid": _uid("series", n, 5)},
                 "flair": {"series_instance_uid": _uid("series", n, 7)} if with_flair else None}
    return {"series": records, "selection": selection}


def _write_previews(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    head = ((yy - 64) ** 2 / 55**2 + (xx - 64) ** 2 / 45**2) < 1
    for k, name in enumerate(PREVIEWS):
        img = (head * (120 + 40 * k) + rng.normal(0, 8, head.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).convert("RGB").save(folder / name)


def _write_work_arrays(work: Path, core_slice: int = 9) -> None:
    """What the pipeline keeps in <output_dir>/work: volumes, core mask, Tmax mean and SD (z, y, x)."""
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[0:16, 0:64, 0:64]
    head = ((y - 32) ** 2 / 26**2 + (x - 32) ** 2 / 21**2 + (z - 8) ** 2 / 9**2) < 1
    lesion = ((y - 24) ** 2 + (x - 40) ** 2 < 36) & (abs(z - core_slice) <= 1)
    dwi = head * 300.0 + lesion * 500.0 + rng.normal(0, 10, head.shape)
    np.savez(work / "volumes.npz", dwi=dwi.astype(np.float32), flair=(head * 200.0).astype(np.float32),
             brain=head.astype(np.uint8), adc=(head * 800.0 - lesion * 400.0).astype(np.float32))
    np.savez(work / "core.npz", core=lesion.astype(np.uint8))
    tmax = head * (2.0 + 8.0 * (((y - 24) ** 2 + (x - 40) ** 2) < 200))
    np.savez(work / "tmax.npz", mean=tmax.astype(np.float32), sd=(head * 0.8).astype(np.float32))


def add_job(db: Session, settings: Settings, study: Study, state: str, *, upto: str | None = None,
            error: str | None = None, deliveries: dict[str, str] | None = None, version: int = 1,
            at: datetime = T0, with_flair: bool = True, previews: str = "npz") -> Job:
    """A job whose stage rows run up to ``upto`` (the last one in the state the job implies)."""
    stages = ("classify", "load", "core", "synthesize", "measure", "encode", "push")
    job = Job(study_id=study.id, version=version, state=state, trigger="stable_age",
              instance_count=sum(len(s.instances) for s in study.series), created_at=at + timedelta(seconds=50),
              started_at=at + timedelta(seconds=51), warnings=[])
    db.add(job)
    db.flush()
    last = stages.index(upto) if upto else -1
    t = at + timedelta(seconds=51)
    n = int(study.patient_id[3:])
    for i, name in enumerate(stages[: last + 1]):
        dur = {"classify": 0.4, "load": 3.2, "core": 0.6, "synthesize": 18.5, "measure": 0.3,
               "encode": 2.1, "push": 1.4}[name]
        final = i == last
        st_state = StageState.DONE
        if final and state == JobState.RUNNING:
            st_state = StageState.RUNNING
        elif final and state in (JobState.FAILED, JobState.INPUT_MISSING):
            st_state = StageState.FAILED
        detail = None
        if name == "classify":
            detail = _classify_detail(n, with_flair)
        elif name == "load":
            detail = {"registration": {"metric_before": -0.214, "metric_after": -0.587, "iterations": 61}}
        st = Stage(job_id=job.id, name=name, state=st_state, started_at=t,
                   finished_at=None if st_state == StageState.RUNNING else t + timedelta(seconds=dur),
                   duration_s=None if st_state == StageState.RUNNING else dur,
                   error=error if st_state == StageState.FAILED else None, detail=detail,
                   worker=f"worker-{'gpu' if name == 'synthesize' else 'cpu'}@node1:{4000 + i} "
                          f"({'cuda:0' if name == 'synthesize' else 'cpu'})")
        db.add(st)
        t += timedelta(seconds=dur)
    job.current_stage = stages[last] if last >= 0 else None
    job.progress = (last + (1 if state != JobState.RUNNING else 0.5)) / len(stages) if last >= 0 else 0.0
    job.error = error
    if state in JobState.FINAL:
        job.finished_at = t
    if last >= stages.index("measure"):
        job.result = {"measures": {"core_ml": 12.4 + n, "tmax6_ml": 88.0 + n, "tmax10_ml": 31.5,
                                   "mismatch_ml": 75.6, "mismatch_ratio": 7.1, "hir": 0.36,
                                   "defuse3": True, "extend": True},
                      "versions": {"synthperf": "0.1.0", "model": "demo", "model_sha256": "ab12cd34"}}
    if last >= stages.index("encode"):
        out = settings.output_dir / f"job-{job.id}"
        if previews == "npz":
            _write_work_arrays(out / "work")
        else:
            _write_previews(out / "previews")
        job.output_dir = out.name  # relative to settings.output_dir (absolute paths work too)
        for dest, dstate in (deliveries or {}).items():
            for k, sop_class in enumerate(("1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4",
                                           "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33")):
                f = out / f"obj{k}.dcm"
                f.write_bytes(b"DICM")
                db.add(Delivery(job_id=job.id, destination=dest, sop_instance_uid=_uid("out", job.id, dest, k),
                                sop_class_uid=sop_class, path=str(f), state=dstate,
                                attempts=1 if dstate == DeliveryState.SENT else 7,
                                last_status=0 if dstate == DeliveryState.SENT else None,
                                last_error=None if dstate == DeliveryState.SENT else
                                "connection refused: PACS2 at 10.0.0.9:104 did not answer",
                                delivered_at=t if dstate == DeliveryState.SENT else None,
                                next_attempt_at=t + timedelta(minutes=10)))
    db.flush()
    return job


def populate(settings: Settings) -> Populated:
    """Five studies, one job in each interesting state, SCP events, heartbeats, two users."""
    init_schema(settings)
    out = Populated()
    with session_scope(settings.effective_database_url) as db:
        create_user(db, *ADMIN, role="admin")
        create_user(db, *VIEWER, role="viewer")
        s1 = add_study(db, settings, 1, accession="ACC1001")
        out.done = add_job(db, settings, s1, JobState.DONE, upto="push",
                           deliveries={ORTHANC: DeliveryState.SENT}).id
        s2 = add_study(db, settings, 2, accession="ACC1002", with_flair=False, aet="MR_STROKE_2",
                       at=T0 + timedelta(minutes=5))
        out.failed = add_job(db, settings, s2, JobState.INPUT_MISSING, upto="classify",
                             error="no FLAIR: only DWI and ADC arrived. Send the FLAIR series, the job restarts by itself.",
                             at=T0 + timedelta(minutes=5), with_flair=False).id
        s3 = add_study(db, settings, 3, accession="ACC1003", at=T0 + timedelta(minutes=10))
        out.running = add_job(db, settings, s3, JobState.RUNNING, upto="synthesize",
                              at=T0 + timedelta(minutes=10)).id
        s4 = add_study(db, settings, 4, accession="ACC1004", at=T0 + timedelta(minutes=12))
        out.queued = add_job(db, settings, s4, JobState.QUEUED, at=T0 + timedelta(minutes=12)).id
        s5 = add_study(db, settings, 5, accession="XYZ2005", aet="MR_STROKE_2", at=T0 - timedelta(days=1))
        out.delivering = add_job(db, settings, s5, JobState.DELIVERING, upto="push",
                                 deliveries={ORTHANC: DeliveryState.SENT, PACS2: DeliveryState.DEAD},
                                 at=T0 - timedelta(days=1), previews="png").id
        out.job_ids = [out.done, out.failed, out.running, out.queued, out.delivering]
        now = datetime.now(UTC)
        db.add_all([
            ScpEvent(at=now - timedelta(minutes=3), kind="accepted", calling_aet="MR_STROKE_1", peer="10.1.2.3:51234"),
            ScpEvent(at=now - timedelta(minutes=2), kind="rejected", calling_aet="UNKNOWN_CT", peer="10.9.9.9:40000",
                     reason="calling AE title UNKNOWN_CT is not in allowed_aets"),
            ScpEvent(at=now - timedelta(minutes=1), kind="rejected", calling_aet="MR_STROKE_1", peer="192.0.2.7:1234",
                     reason="peer 192.0.2.7 is not in allowed_networks"),
            Heartbeat(component="scp", instance="node1:100", at=now, info={"active_associations": 2, "ae_title": "SYNTHPERF"}),
            Heartbeat(component="worker", instance="node1:200", at=now, info={"device": "cuda:0", "queues": "gpu",
                                                                              "model": "demo", "model_sha256": "ab12cd34"}),
            Heartbeat(component="worker", instance="node1:201", at=now, info={"device": "cpu", "queues": "cpu"}),
            Heartbeat(component="worker", instance="old:300", at=now - timedelta(hours=2), info={"device": "cpu"}),
        ])
    return out


def clone(template: Path, data_dir: Path) -> None:
    """Copy a populated data dir (job store, spool, outputs) and make its heartbeats fresh."""
    import shutil

    from sqlalchemy import update

    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    settings = make_settings(data_dir)
    with session_scope(settings.effective_database_url) as db:
        db.execute(update(Heartbeat).where(Heartbeat.instance != "old:300").values(at=datetime.now(UTC)))


def checkpoint(settings: Settings) -> None:
    """Fold SQLite's WAL into the main file and drop the pooled connections, so a copy is complete."""
    from sqlalchemy import text

    from common.jobstore.db import get_engine

    engine = get_engine(settings.effective_database_url)
    with engine.connect() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()
