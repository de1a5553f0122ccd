"""Studies that arrive in pieces, sent with DCMTK storescu through the real SCP and completion loop.

An enhanced multi-frame phantom study holds one multi-frame object per series, and each object
declares (NumberOfFrames) exactly what it holds, so every series is complete the moment its one
file lands. When the first complete series completed the whole study, the DWI alone made a job
and the rest a second one. Each study must now become exactly one job, whether it comes in one
association or in several; and when an early job did fail on part of a study ("no FLAIR") and a
later job of the study succeeded, the early one is superseded and the dashboard counts the study
once, as done.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.jobstore import dashboard_queries as dq
from common.jobstore.db import session_scope
from common.jobstore.models import Job, JobState
from tests.integration.test_process import model_ref  # noqa: F401 - fixture
from tests.integration.test_scp_realdata import gateway_settings, running_gateway, storescu, wait_for

pytestmark = pytest.mark.integration

STABLE_AGE_S = 3.0  # longer than the pause between two storescu runs below, even on a loaded machine
PAUSE_S = 1.0  # between associations: much longer than one completion pass


@pytest.fixture(scope="module")
def enhanced_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """A Siemens-style enhanced phantom study: series folder name -> its files."""
    api = pytest.importorskip("phantom.api")
    case = api.make_case(11, matrix=64)
    study_dir = Path(api.write_dicom_study(case, tmp_path_factory.mktemp("enhanced"), "siemens", enhanced=True))
    series = {d.name: sorted(d.glob("*.dcm")) for d in sorted(study_dir.iterdir()) if d.is_dir()}
    multiframe = [name for name, files in series.items() if [f.name for f in files] == ["EN_0001.dcm"]]
    assert len(multiframe) >= 4, series  # DWI (b0 and trace), ADC, FLAIR: one object each
    return series


def _pick(series: dict[str, list[Path]], *words: str) -> list[Path]:
    return [f for name, files in series.items() if any(w in name for w in words) for f in files]


def _jobs(url: str) -> list[tuple[int, str, int, str]]:
    with session_scope(url) as s:
        return [(j.id, j.trigger, j.instance_count, j.state) for j in s.query(Job).order_by(Job.id)]


def _one_job_for(settings, enqueued: list[int], n_files: int) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Wait for the study's job, then for anything else that could still fire; exactly one job."""
    url = settings.effective_database_url
    assert wait_for(lambda: len(enqueued) >= 1, timeout=STABLE_AGE_S + 60)
    time.sleep(STABLE_AGE_S + 1.0)  # a second job for a late part would have fired by now
    jobs = _jobs(url)
    assert len(jobs) == 1, jobs
    [(job_id, trigger, count, _state)] = jobs
    assert enqueued == [job_id] and count == n_files
    return job_id, trigger


def test_enhanced_multiframe_study_in_one_association_is_one_job(enhanced_study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    multiframe_first = sorted((f for files in enhanced_study.values() for f in files), key=lambda f: f.name[:2] != "EN")
    settings = gateway_settings(tmp_path / "gw", stable_age_s=STABLE_AGE_S)
    enqueued: list[int] = []
    with running_gateway(settings, enqueued) as gw:
        res = storescu(gw.scp.port, multiframe_first)
        assert res.returncode == 0, res.stderr[-2000:]
        _job_id, trigger = _one_job_for(settings, enqueued, len(multiframe_first))
    assert trigger == "stable_age"  # the localizer declares nothing: the quiet time decided


def test_study_split_across_associations_is_one_job(enhanced_study, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dwi = _pick(enhanced_study, "diff")
    rest = [f for files in enhanced_study.values() for f in files if f not in dwi]
    assert dwi and rest
    settings = gateway_settings(tmp_path / "gw", stable_age_s=STABLE_AGE_S)
    enqueued: list[int] = []
    with running_gateway(settings, enqueued) as gw:
        for part in (dwi, rest):  # the scanner sends the diffusion series first, the rest later
            res = storescu(gw.scp.port, part)
            assert res.returncode == 0, res.stderr[-2000:]
            time.sleep(PAUSE_S)
        _one_job_for(settings, enqueued, len(dwi) + len(rest))


@pytest.mark.slow
def test_early_job_that_failed_is_superseded_by_the_one_that_succeeded(enhanced_study, tmp_path: Path, model_ref) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from worker.pipeline.run import STAGES, DbRecorder, job_context, run_stages

    first_part = _pick(enhanced_study, "diff")  # DWI and ADC; FLAIR comes minutes later
    second_part = [f for files in enhanced_study.values() for f in files if f not in first_part]
    settings = gateway_settings(tmp_path / "gw", stable_age_s=STABLE_AGE_S, ddim_steps=1, samples=1,
                                device="cpu", model_name=model_ref)
    url = settings.effective_database_url
    enqueued: list[int] = []

    def run(job_id: int) -> None:  # what the worker does with the enqueued id
        run_stages(job_context(settings, job_id), DbRecorder(settings, job_id), STAGES)

    with running_gateway(settings, enqueued) as gw:
        assert storescu(gw.scp.port, first_part).returncode == 0
        assert wait_for(lambda: len(enqueued) == 1, timeout=STABLE_AGE_S + 60)
        with pytest.raises(Exception, match="FLAIR"):
            run(enqueued[0])
        assert _jobs(url)[0][3] == JobState.INPUT_MISSING
        with session_scope(url) as s:
            assert dq.studies_by_state(s)[JobState.INPUT_MISSING] == 1
        assert storescu(gw.scp.port, second_part).returncode == 0
        assert wait_for(lambda: len(enqueued) == 2, timeout=STABLE_AGE_S + 60)
    run(enqueued[1])
    (early, _t1, _n1, early_state), (late, _t2, count, late_state) = _jobs(url)
    assert [early, late] == enqueued and count == len(first_part) + len(second_part)
    assert (early_state, late_state) == (JobState.SUPERSEDED, JobState.DONE)
    with session_scope(url) as s:
        studies, jobs = dq.studies_by_state(s), dq.jobs_by_state(s)
        detail = dq.job_detail(s, early)
    assert studies[JobState.DONE] == 1 and sum(studies.values()) == 1  # one study, counted as done
    assert jobs[JobState.INPUT_MISSING] == jobs[JobState.FAILED] == 0 and jobs[JobState.SUPERSEDED] == 1
    assert detail is not None and "FLAIR" in detail["error"]  # the early job still says what happened
