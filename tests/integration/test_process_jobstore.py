"""The pipeline against the job store: every stage recorded (start, end, outcome, warnings,
detail), the job's state/current stage/progress/error/result kept, failures readable, resume and
retry-from-stage without redoing finished stages and with the same output UIDs.

A small study written by the encode tests' builder (DWI b0+b1000, inversion-recovery FLAIR)
goes into a spool the way the SCP lays it out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from common.config import load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import Instance, Job, JobState, Series, Stage, StageState, Study
from common.jobstore.queries import init_db
from tests.integration.test_process import model_ref  # noqa: F401 - fixture
from tests.unit.test_encode_sources import write_classifiable_study
from worker.pipeline.run import STAGES, DbRecorder, job_context, run_stages

SHAPE = (8, 48, 48)


def spool_study(settings, with_flair: bool = True) -> int:
    """Write a study into the spool, record it like the SCP does, create a job; return its id."""
    tmp = settings.data_dir / "incoming"
    _, dwi, flair = write_classifiable_study(tmp, SHAPE, (4.0, 4.0, 5.0))
    init_db(settings.effective_database_url)
    with session_scope(settings.effective_database_url) as s:
        study = Study(study_uid=dwi[0].StudyInstanceUID)
        s.add(study)
        s.flush()
        for group in (dwi, flair) if with_flair else (dwi,):
            series = Series(study_id=study.id, series_uid=group[0].SeriesInstanceUID, modality="MR")
            s.add(series)
            s.flush()
            for ds in group:
                rel = Path(ds.StudyInstanceUID) / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
                dest = settings.spool_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                (tmp / f"{ds.SOPInstanceUID}.dcm").replace(dest)
                s.add(Instance(series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                               sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                               path=str(rel), size_bytes=dest.stat().st_size, sha256="0" * 64))
        job = Job(study_id=study.id, version=1, state=JobState.QUEUED, trigger="manual")
        s.add(job)
        s.flush()
        return job.id


def run_job(settings, job_id, from_stage=None):
    ctx = job_context(settings, job_id)
    run_stages(ctx, DbRecorder(settings, job_id), STAGES, from_stage)


def job_and_stages(settings, job_id):
    with session_scope(settings.effective_database_url) as s:
        job = s.get(Job, job_id)
        stages = s.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.id)).all()
        return job, stages


def make_settings(data_dir, **kw):
    return load_settings(data_dir=data_dir, ddim_steps=1, samples=1, device="cpu", **kw)


@pytest.mark.slow
def test_missing_model_fails_the_synthesize_stage_with_a_readable_error(data_dir):
    settings = make_settings(data_dir, model_name="no-such-model")
    job_id = spool_study(settings)
    with pytest.raises(Exception, match="no-such-model"):
        run_job(settings, job_id)
    job, stages = job_and_stages(settings, job_id)
    assert job.state == JobState.FAILED
    assert job.current_stage == "synthesize"
    assert job.error.startswith("synthesize: 'no-such-model' is neither a registered model")
    by_name = {st.name: st for st in stages}
    for name in ("classify", "load", "core"):
        st = by_name[name]
        assert st.state == StageState.DONE and st.finished_at and st.duration_s is not None and st.worker
    assert by_name["synthesize"].state == StageState.FAILED and "no-such-model" in by_name["synthesize"].error
    assert "measure" not in by_name
    # evidence kept: the classifier's decisions and the registration quality
    assert by_name["classify"].detail["selection"]["flair"]["rule"]
    assert "registration" in by_name["load"].detail
    assert job.result["series"]["dwi"]["series_instance_uid"]
    assert 0.2 <= job.progress < 0.8
    assert any("ADC is computed" in w for w in job.warnings)


@pytest.mark.slow
def test_missing_flair_stops_as_input_missing(data_dir):
    settings = make_settings(data_dir)
    job_id = spool_study(settings, with_flair=False)
    with pytest.raises(Exception, match="FLAIR"):
        run_job(settings, job_id)
    job, stages = job_and_stages(settings, job_id)
    assert job.state == JobState.INPUT_MISSING
    assert job.error.startswith("classify: no FLAIR")
    assert [st.name for st in stages] == ["classify"]


@pytest.mark.slow
def test_full_run_then_retry_from_encode_keeps_uids(data_dir, model_ref):  # noqa: F811
    settings = make_settings(data_dir, model_name=model_ref)
    job_id = spool_study(settings)
    run_job(settings, job_id)
    job, stages = job_and_stages(settings, job_id)
    assert job.state == JobState.DONE and job.progress == 1.0 and job.error is None
    assert [st.name for st in stages] == list(STAGES)
    assert all(st.state == StageState.DONE for st in stages)
    assert set(job.result["measures"]) >= {"core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "defuse3", "extend"}
    assert job.result["versions"]["model_version"]
    assert job.result["outputs"]["count"] == SHAPE[0] + 6
    dicom = Path(job.output_dir) / "dicom"
    first = {p.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dicom.glob("*.dcm")}
    manifest = json.loads((dicom / "manifest.json").read_text())
    assert {o["sop_instance_uid"] for o in manifest} == set(first.values())

    run_job(settings, job_id, from_stage="encode")
    job, stages = job_and_stages(settings, job_id)
    names = [st.name for st in stages]
    assert names.count("classify") == 1 and names.count("synthesize") == 1  # finished stages not redone
    assert names.count("encode") == 2
    assert [st.attempt for st in stages if st.name == "encode"] == [1, 2]
    again = {p.name: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dicom.glob("*.dcm")}
    assert again == first
    assert job.state == JobState.DONE


@pytest.mark.slow
def test_stage_left_running_by_a_lost_worker_is_closed_on_retry(data_dir):
    settings = make_settings(data_dir)
    job_id = spool_study(settings, with_flair=False)
    with session_scope(settings.effective_database_url) as s:
        s.add(Stage(job_id=job_id, name="classify", state=StageState.RUNNING, attempt=1, worker="gone:1"))
    with pytest.raises(Exception, match="FLAIR"):
        run_job(settings, job_id)
    _, stages = job_and_stages(settings, job_id)
    assert [(st.name, st.attempt, st.state) for st in stages] == [
        ("classify", 1, StageState.FAILED), ("classify", 2, StageState.FAILED)]
    assert "worker lost" in stages[0].error and "FLAIR" in stages[1].error


def test_cancel_requested_stops_before_the_next_stage(data_dir):
    settings = make_settings(data_dir)
    job_id = spool_study(settings)
    with session_scope(settings.effective_database_url) as s:
        s.get(Job, job_id).cancel_requested = True
    with pytest.raises(Exception, match="cancelled"):
        run_job(settings, job_id)
    job, stages = job_and_stages(settings, job_id)
    assert job.state == JobState.CANCELLED and "cancelled" in job.error
    assert stages == []
