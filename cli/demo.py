"""The ``--demo`` of ``synthperf serve`` (``make run``): on first start, send ourselves one phantom study.

A newcomer then sees a job go through every stage on the dashboard and the SYNTHETIC results in
the output folder (and in PACS, if a destination is configured). The phantom is generated with a
fixed seed, so every newcomer sees the same study. A marker under data_dir records that the demo
was sent; delete ``<data_dir>/demo`` to send it again.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("synthperf.demo")

DEMO_SEED = 7  # a small core (~10 mL) with a large Tmax>6 s region: a DEFUSE-3 target profile
DEMO_MATRIX = 128
DEMO_VENDOR = "siemens"


def _wait_for_scp(host: str, port: int, aet: str, timeout: float = 30.0) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ae = AE(ae_title="SYNTHPERF-DEMO")
        ae.add_requested_context(Verification)
        assoc = ae.associate(host, port, ae_title=aet)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return True
        time.sleep(0.5)
    return False


def _say(text: str) -> None:
    print(f"synthperf demo: {text}", flush=True)


def _say_login(settings: Any) -> None:
    secret_file = Path(settings.data_dir) / "demo" / "admin-password.txt"
    if secret_file.is_file():
        _say(f"  dashboard login: user '{settings.admin_user}', password in {secret_file.resolve()}")


def _copy_to_demo_pacs(files: list[Path]) -> None:
    """The scanner's copy of the study into the demo PACS (cli.demo_pacs), as a scanner routes a
    study to PACS and to us: the viewer shows our results over the DWI they came from."""
    from cli.cmd_send import send_paths
    from cli.demo_pacs import current

    pacs = current()
    if pacs is None:
        return
    try:
        send_paths(files, pacs.host, pacs.dicom_port, called_aet=pacs.destination["ae_title"],
                   calling_aet="SYNTHPERF-DEMO")
    except Exception as exc:  # noqa: BLE001 - the demo must never take the service down
        log.warning("demo study not copied to the demo PACS: %s", exc)


def _say_viewer(study_uid: str | None) -> bool:
    """Print the OHIF viewer URL of the demo study when the demo PACS runs (cli.demo_pacs)."""
    from cli.demo_pacs import current

    pacs = current()
    if pacs is None or pacs.front is None or not study_uid:
        return False
    _say(f"  and in PACS:     Orthanc {pacs.destination['ae_title']}@{pacs.host}:{pacs.dicom_port}; "
         "once the job is done, open the study in OHIF:")
    _say(f"                   {pacs.viewer_url(study_uid)}")
    return True


def ensure_demo_admin(settings: Any) -> tuple[str, Path] | None:
    """Give a newcomer a way into the dashboard: when no account exists (and none is configured
    through SYNTHPERF_ADMIN_PASSWORD), create ``admin_user`` with a random password, keep it in a
    file only root can read, and return (user, file). Production never runs with --demo."""
    if settings.auth_mode != "local" or settings.admin_password is not None:
        return None
    import os
    import secrets

    from sqlalchemy import func, select

    from common.jobstore.db import session_scope
    from common.jobstore.models import AuditEntry, User, UserRole
    from common.jobstore.queries import init_db
    from service.api.auth import create_user

    url = settings.effective_database_url
    init_db(url)
    secret_file = Path(settings.data_dir) / "demo" / "admin-password.txt"
    with session_scope(url) as session:
        if session.scalar(select(func.count(User.id))):
            return (settings.admin_user, secret_file) if secret_file.is_file() else None
        password = secrets.token_urlsafe(12)
        create_user(session, settings.admin_user, password, UserRole.ADMIN)
        session.add(AuditEntry(user="system", action="bootstrap_admin", target=f"user:{settings.admin_user}",
                               detail="demo mode: random password written to data_dir/demo"))
        secret_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
    return settings.admin_user, secret_file


def send_demo_study(settings: Any, port: int) -> Path | None:
    """Generate (once) and send the demo phantom study to our own SCP; print where to look."""
    demo_dir = Path(settings.data_dir) / "demo"
    marker = demo_dir / "sent.json"
    api = f"http://{'127.0.0.1' if settings.api_host in ('0.0.0.0', '::') else settings.api_host}:{settings.api_port}"
    if marker.is_file():
        sent = json.loads(marker.read_text())
        _say(f"demo study already sent on {sent.get('sent_at')}; "
             f"see {api}/ (delete {demo_dir}/sent.json to send it again)")
        _say_login(settings)
        _say_viewer(sent.get("study_uid"))
        return None
    try:
        from phantom.api import make_case, write_dicom_study
    except ImportError as exc:
        _say(f"phantom generator not available ({exc}); send a study yourself: "
             f"synthperf send DIR 127.0.0.1 {port}")
        return None
    try:
        from models.registry import resolve_members

        resolve_members(settings.model_name)  # every network it names
    except FileNotFoundError as exc:
        _say(f"WARNING: {exc}. The demo job will stop at the synthesize stage with this message.")
    _say(f"generating the phantom stroke study (seed {DEMO_SEED}, {DEMO_MATRIX}x{DEMO_MATRIX})...")
    case = make_case(DEMO_SEED, matrix=DEMO_MATRIX)
    study_dir = Path(write_dicom_study(case, demo_dir / "study", DEMO_VENDOR))
    files = [p for p in sorted(study_dir.rglob("*")) if p.is_file() and not p.name.endswith((".json", ".gz"))]
    if not _wait_for_scp("127.0.0.1", port, settings.ae_title):
        _say(f"our SCP did not answer on port {port}; demo study left in {study_dir}")
        return None
    from cli.cmd_send import send_paths

    counts = send_paths(files, "127.0.0.1", port, called_aet=settings.ae_title, calling_aet="SYNTHPERF-DEMO")
    import pydicom

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    _copy_to_demo_pacs(files)
    demo_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"sent_at": datetime.now(UTC).isoformat(), "study_dir": str(study_dir),
                                  "counts": counts, "study_uid": study_uid}))
    _say(f"sent {counts.get('sent', 0)} instances of a phantom stroke study (study {case.case_id}).")
    _say(f"  watch the job:   {api}/   (or: synthperf jobs --data-dir {settings.data_dir})")
    _say_login(settings)
    _say(f"  results (DICOM): {Path(settings.output_dir).resolve()}/job_<id>/dicom   "
         "(summary.dcm is the one-page overview)")
    shown_in_viewer = _say_viewer(study_uid)
    if settings.destinations and not shown_in_viewer:
        _say("  and in PACS:     " + ", ".join(d.key for d in settings.destinations))
    elif not settings.destinations:
        _say("  no PACS configured: the job ends 'done, not delivered'; to deliver, set SYNTHPERF_DESTINATIONS "
             "(docs/operations.md)")
    _say("  every result is SYNTHETIC PERFUSION - NOT FOR DIAGNOSTIC USE")
    return study_dir
