"""STOW-RS delivery into a real Orthanc through Debian's DICOMweb plugin, with the PACS going
down in the middle of a push: every object lands once, the system page's destination state says
what happened, and a re-push of everything adds nothing new."""

from __future__ import annotations

from datetime import timedelta

import httpx
import numpy as np
import pydicom
import pytest

from common.jobstore.db import session_scope
from service.api.views import destination_states
from tests.integration.harness import OrthancServer
from tests.unit.test_push import encoded_files  # noqa: F401 - module fixture: our real objects
from tests.unit.test_stow import _job_with_deliveries, _rows
from worker.pipeline import stow
from worker.pipeline.push import push_due, repush, utcnow

pytestmark = pytest.mark.integration


def _orthanc_sop_uids(orthanc: OrthancServer) -> list[str]:
    found = httpx.get(f"{orthanc.url}/instances", params={"expand": ""}, timeout=30).json()
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]


@pytest.fixture
def orthanc(tmp_path):
    server = OrthancServer(tmp_path / "orthanc", aet="STOWPACS", verbose=False)
    yield server
    server.stop()


def test_every_object_lands_once_through_an_outage(data_dir, encoded_files, orthanc):  # noqa: F811
    url = orthanc.dicomweb_url
    orthanc.start()
    uids = [u for u, _, _ in encoded_files]
    settings, job_id = _job_with_deliveries(data_dir, encoded_files, url=url, max_objects_per_request=4,
                                            timeout_s=10)
    requests = 0

    def sender_with_outage(paths, dest, calling_aet, **kw):  # the PACS stops before the third request
        client = stow.make_client(dest)
        store = client.store_instances

        def counted(datasets):
            nonlocal requests
            requests += 1
            if requests == 3:
                orthanc.stop()
            return store(datasets)

        client.store_instances = counted
        return stow.send_files(paths, dest, calling_aet, client=client, **kw)

    t0 = utcnow()
    first = push_due(settings, job_id, now=t0, stow_sender=sender_with_outage)
    assert first.sent == 8 and first.pending == len(uids) - 8
    with session_scope(settings.effective_database_url) as db:
        (state,) = destination_states(db, settings)
    assert state["kind"] == "STOW-RS" and state["state"] == "pending"
    assert (state["sent"], state["pending"]) == (8, len(uids) - 8) and "cannot store to STOW-RS" in state["last_error"]

    orthanc.start()
    now = t0
    for _ in range(4):  # bounded: the backoff is 5 s, then 10 s
        now += timedelta(seconds=61)
        if push_due(settings, job_id, now=now).complete:
            break
    assert all(r.state == "sent" for r in _rows(settings, job_id))
    assert sorted(_orthanc_sop_uids(orthanc)) == sorted(uids)
    assert orthanc.changes_new_instances() == len(uids)  # none stored twice
    with session_scope(settings.effective_database_url) as db:
        (state,) = destination_states(db, settings)
    assert state["state"] == "sent" and state["sent"] == len(uids) and state["last_error"] is None

    # what Orthanc serves back over WADO-RS is our object
    tmax_uid, _, tmax_path = next(f for f in encoded_files if pydicom.dcmread(f[2], stop_before_pixels=True)
                                  .SeriesNumber == 901)
    theirs = stow.make_client(settings.destinations[0]).retrieve_instance(
        pydicom.dcmread(tmax_path, stop_before_pixels=True).StudyInstanceUID,
        pydicom.dcmread(tmax_path, stop_before_pixels=True).SeriesInstanceUID, tmax_uid)
    np.testing.assert_array_equal(theirs.pixel_array, pydicom.dcmread(tmax_path).pixel_array)

    # re-pushing everything sends every object again and still leaves one copy of each
    assert repush(settings, job_id, include_sent=True) == len(uids)
    assert push_due(settings, job_id, now=now + timedelta(seconds=1)).sent == len(uids)
    assert sorted(_orthanc_sop_uids(orthanc)) == sorted(uids)
    assert orthanc.changes_new_instances() == len(uids)
