"""STOW-RS delivery through dicomweb-client to a small STOW-RS origin server on loopback that
answers like PS3.18 10.5.3 says (200, 202 with FailedSOPSequence, 409, 401), so each answer the
spec allows is exercised; tests/integration/test_push_stow.py does the same against Orthanc.

Covers: per-object outcomes of a partial failure, retried object by object under the job store's
backoff until each object is stored once; a duplicate (0x0111) counts as stored; bearer and basic
authentication; an unreachable server leaves rows pending; settings keep the C-STORE form valid.
"""

from __future__ import annotations

import base64
import email
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from common.config import Destination, StowDestination, load_settings
from common.jobstore.db import session_scope
from common.jobstore.models import Delivery, DeliveryState, Job, JobState
from tests.conftest import free_port
from tests.unit.test_push import encoded_files, job_with_deliveries  # noqa: F401 - encoded_files: a fixture
from worker.pipeline.push import push_due, utcnow
from worker.pipeline.stow import send_files


class StowOrigin:
    """A STOW-RS origin server: parses the multipart body, stores each instance once, and fails
    the SOP instances in ``fail_once`` (uid -> FailureReason) on their first attempt."""

    def __init__(self, *, token: str | None = None, basic: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.token, self.basic = token, basic
        self.fail_once: dict[str, int] = {}
        self.all_fail_status = 202
        self.stored: dict[str, int] = {}  # uid -> times stored
        self.attempts: dict[str, int] = {}
        self.requests = 0
        self.auth_seen: list[str | None] = []
        self.accept_seen: list[str | None] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: ANN002 - quiet
                pass

            def _body(self) -> bytes:
                """The request body, plain or chunked (dicomweb-client chunks bodies over 1 MB)."""
                if self.headers.get("Content-Length"):
                    return self.rfile.read(int(self.headers["Content-Length"]))
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def do_POST(self):  # noqa: N802 - http.server's name
                origin.requests += 1
                auth = self.headers.get("Authorization")
                origin.auth_seen.append(auth)
                origin.accept_seen.append(self.headers.get("Accept"))
                if not origin.authorised(auth):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="pacs"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self._body()
                status, answer = origin.store(self.headers["Content-Type"], body)
                data = json.dumps(answer.to_json_dict()).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def authorised(self, header: str | None) -> bool:
        if self.token:
            return header == f"Bearer {self.token}"
        if self.basic:
            return header == "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
        return True

    def store(self, content_type: str, body: bytes) -> tuple[int, pydicom.Dataset]:
        msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        ok, failed = [], []
        for part in msg.get_payload():
            ds = pydicom.dcmread(BytesIO(part.get_payload(decode=True)))
            uid = str(ds.SOPInstanceUID)
            self.attempts[uid] = self.attempts.get(uid, 0) + 1
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = uid
            if uid in self.fail_once and self.attempts[uid] == 1:
                item.FailureReason = self.fail_once[uid]
                failed.append(item)
            elif uid in self.stored:
                item.FailureReason = 0x0111  # duplicate SOP instance
                failed.append(item)
            else:
                self.stored[uid] = self.stored.get(uid, 0) + 1
                ok.append(item)
        answer = pydicom.Dataset()
        if ok:
            answer.ReferencedSOPSequence = ok
        if failed:
            answer.FailedSOPSequence = failed
        return (200 if not failed else 202 if ok else 409), answer

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _job_with_deliveries(data_dir: Path, files, **dest) -> tuple:
    settings = load_settings(data_dir=data_dir, destinations=[dest], push_backoff_initial_s=5,
                             push_backoff_max_s=60, push_retry_period_s=3600)
    return settings, job_with_deliveries(settings, files)


def _rows(settings, job_id) -> list[Delivery]:
    with session_scope(settings.effective_database_url) as s:
        return list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))


@pytest.fixture
def origin():
    servers: list[StowOrigin] = []

    def make(**kw) -> StowOrigin:
        servers.append(StowOrigin(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def test_partial_failure_is_retried_per_object_until_each_lands_once(data_dir, encoded_files, origin):  # noqa: F811
    srv = origin()
    uids = [u for u, _, _ in encoded_files]
    srv.fail_once = {uids[1]: 0xA700, uids[4]: 0xC000}
    settings, job_id = _job_with_deliveries(data_dir, encoded_files, url=srv.url, max_objects_per_request=8)
    t0 = utcnow()
    first = push_due(settings, job_id, now=t0)
    assert first.sent == len(uids) - 2 and first.pending == 2
    rows = {r.sop_instance_uid: r for r in _rows(settings, job_id)}
    assert rows[uids[1]].state == DeliveryState.PENDING and rows[uids[1]].last_status == 0xA700
    assert "FailureReason 0xA700" in rows[uids[1]].last_error and rows[uids[4]].last_status == 0xC000
    assert rows[uids[0]].state == DeliveryState.SENT and rows[uids[0]].last_status == 0
    assert rows[uids[1]].destination == f"STOW-RS {srv.url}"
    requests_before = srv.requests
    second = push_due(settings, job_id, now=t0 + timedelta(seconds=6))
    assert second.sent == 2 and second.complete
    assert srv.requests == requests_before + 1  # one request, carrying only the two failed objects
    assert srv.stored == {u: 1 for u in uids}  # every object stored exactly once
    assert srv.attempts[uids[1]] == 2 and srv.attempts[uids[0]] == 1
    with session_scope(settings.effective_database_url) as s:
        assert s.get(Job, job_id).state == JobState.DONE


def test_duplicate_counts_as_stored_and_409_marks_each_object(tmp_path, encoded_files, origin):  # noqa: F811
    srv = origin()
    paths = [p for _, _, p in encoded_files[:3]]
    dest = StowDestination(url=srv.url)
    assert all(o.stored for o in send_files(paths, dest))
    again = send_files(paths, dest)  # the server answers 409, every object a duplicate (0x0111)
    assert [o.stored for o in again] == [True] * 3 and srv.stored == {u: 1 for u, _, _ in encoded_files[:3]}
    srv.fail_once = {u: 0xA700 for u, _, _ in encoded_files[3:5]}
    refused = send_files([p for _, _, p in encoded_files[3:5]], dest)  # 409, both refused
    assert [(o.stored, o.status) for o in refused] == [(False, 0xA700)] * 2


def test_bearer_and_basic_authentication(encoded_files, origin):  # noqa: F811
    path = [encoded_files[0][2]]
    bearer = origin(token="s3cret-token")
    assert send_files(path, StowDestination(url=bearer.url, bearer_token="s3cret-token"))[0].stored
    assert bearer.auth_seen[-1] == "Bearer s3cret-token"
    assert bearer.accept_seen[-1] == "application/dicom+json"  # the response type we read (PS3.18 10.5.1.1)
    wrong = send_files(path, StowDestination(url=bearer.url, bearer_token="other"))[0]
    assert not wrong.stored and wrong.status is None and "HTTP 401" in wrong.error
    basic = origin(basic=("pacsuser", "pa:ss"))
    assert send_files(path, StowDestination(url=basic.url, username="pacsuser", password="pa:ss"))[0].stored


def test_unreachable_server_leaves_rows_pending(data_dir, encoded_files):  # noqa: F811
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    settings, job_id = _job_with_deliveries(data_dir, encoded_files[:4], url=url, timeout_s=5)
    report = push_due(settings, job_id)
    assert report.sent == 0 and report.pending == 4 and not report.complete
    rows = _rows(settings, job_id)
    assert all(r.state == DeliveryState.PENDING and r.attempts == 1 for r in rows)
    assert "cannot store to STOW-RS" in rows[0].last_error and "ConnectionError" in rows[0].last_error


def test_settings_accept_both_destination_forms_and_name_bad_ones(tmp_path):
    s = load_settings(data_dir=tmp_path, destinations=[
        {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"url": "https://pacs.example/dicom-web/", "bearer_token": "tok-123", "verify_tls": True},
    ])
    cstore, stow = s.destinations
    assert isinstance(cstore, Destination) and cstore.key == "PACS@10.0.0.5:104"
    assert isinstance(stow, StowDestination) and stow.key == "STOW-RS https://pacs.example/dicom-web"
    assert "tok-123" not in repr(s) and stow.bearer_token.get_secret_value() == "tok-123"
    for bad, words in (
        ({"url": "https://u:p@pacs.example/dicom-web"}, "no credentials"),
        ({"url": "ftp://pacs.example/"}, "must be http"),
        ({"url": "https://pacs.example/dw", "bearer_token": "t", "username": "u", "password": "p"}, "not both"),
        ({"url": "https://pacs.example/dw", "username": "u"}, "go together"),
    ):
        with pytest.raises((ValidationError, ValueError), match=words):
            StowDestination(**bad)
