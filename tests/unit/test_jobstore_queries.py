"""Job-store queries the gateway relies on: the raw hot-path writer agrees with the ORM, duplicate
UIDs are refused, heartbeats upsert, job versions chain. The job-store tests run on SQLite and on
PostgreSQL (``jobstore_url`` in tests/conftest.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.config import load_settings
from common.jobstore import queries
from common.jobstore.db import session_scope
from common.jobstore.models import Heartbeat, Instance, Job, JobState, Series, Study


@pytest.fixture
def url(jobstore_url: str) -> str:
    queries.init_db(jobstore_url)
    return jobstore_url


def _series(url: str) -> tuple[int, int]:
    with session_scope(url) as s:
        study_id = queries.get_or_create_study(s, "1.2.3", patient_id="P")
        series_id = queries.get_or_create_series(s, study_id, "1.2.3.4", modality="MR")
        assert queries.get_or_create_study(s, "1.2.3") == study_id
    return study_id, series_id


def _values(series_id: int, sop: str, frames: int | None = None) -> dict:
    return {
        "series_id": series_id, "sop_instance_uid": sop, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "instance_number": 1, "number_of_frames": frames,
        "path": f"1.2.3/1.2.3.4/{sop}.dcm", "size_bytes": 10, "sha256": "ab" * 32, "calling_aet": "X",
        "received_at": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    }


def test_writer_rows_read_back_through_the_orm_and_duplicates_raise(url: str) -> None:
    study_id, series_id = _series(url)
    w = queries.InstanceWriter(url)
    w.add(_values(series_id, "1.2.3.4.5"), study_id, touch=True)
    w.add(_values(series_id, "1.2.3.4.6", frames=39), study_id, touch=False)
    with pytest.raises(queries.DuplicateInstanceError):
        w.add(_values(series_id, "1.2.3.4.5"), study_id, touch=True)
    assert w.find("1.2.3.4.5") is not None and w.find("9.9") is None
    with session_scope(url) as s:
        inst = s.query(Instance).filter_by(sop_instance_uid="1.2.3.4.5").one()
        # SQLite gives naive UTC back, PostgreSQL an aware time in the session's zone (not UTC in tests)
        at = inst.received_at if inst.received_at.tzinfo else inst.received_at.replace(tzinfo=UTC)
        assert at == datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        assert s.get(Study, study_id).last_received_at.year == 2030
        assert s.get(Series, series_id).last_received_at.year == 2030
        assert queries.series_counts(s, series_id) == (None, 40)
        queries.raise_expected(s, series_id, 40)
        queries.raise_expected(s, series_id, 12)  # smaller declarations never lower it
    with session_scope(url) as s:
        assert s.get(Series, series_id).expected_instances == 40


def test_heartbeat_upsert_and_jobs_listing(url: str) -> None:
    with session_scope(url) as s:
        queries.upsert_heartbeat(s, "scp", "host:1:scp", {"active_associations": 0})
    with session_scope(url) as s:
        queries.upsert_heartbeat(s, "scp", "host:1:scp", {"active_associations": 2})
    with session_scope(url) as s:
        [hb] = s.query(Heartbeat).all()
        assert hb.info == {"active_associations": 2}
    study_id, series_id = _series(url)
    queries.InstanceWriter(url).add(_values(series_id, "1.2.3.4.7"), study_id, touch=True)
    with session_scope(url) as s:
        j1 = queries.create_job(s, study_id, "stable_age", 1)
        j1.state = JobState.DONE
        j2 = queries.create_job(s, study_id, "stable_age", 2)
        assert (j2.version, j2.supersedes_job_id) == (2, j1.id)
    with session_scope(url) as s:
        assert s.get(Job, j1.id).state == JobState.SUPERSEDED  # finished or not: the newer job replaces it
        assert [j.id for j, _st in queries.list_jobs(s)] == [j2.id, j1.id]


def test_celery_enqueuer_sends_the_job_id_by_task_name(tmp_path: Path) -> None:
    from common.queue import TASK_PIPELINE
    from service.ingest.completion import celery_enqueuer

    settings = load_settings(data_dir=tmp_path)  # embedded filesystem broker, no server
    celery_enqueuer(settings)(42)
    messages = list((settings.broker_dir / "in").iterdir())
    assert len(messages) == 1
    body = json.loads(messages[0].read_text())
    assert body["headers"]["task"] == TASK_PIPELINE
    assert "[42]" in body["headers"]["argsrepr"] and body["properties"]["delivery_info"]["routing_key"] == "cpu"


def test_jobs_command_lists_jobs_as_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    data = tmp_path / "data"
    url = load_settings(data_dir=data).effective_database_url
    assert main(["jobs", "--data-dir", str(data)]) == 1  # no job store yet: says so
    queries.init_db(url)
    study_id, series_id = _series(url)
    queries.InstanceWriter(url).add(_values(series_id, "1.2.3.4.8"), study_id, touch=True)
    with session_scope(url) as s:
        queries.create_job(s, study_id, "expected_count", 1)
    capsys.readouterr()
    assert main(["jobs", "--data-dir", str(data), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["study_uid"] == "1.2.3" and row["state"] == "queued" and row["trigger"] == "expected_count"
    assert main(["jobs", "--data-dir", str(data)]) == 0
    assert "expected_count" in capsys.readouterr().out
