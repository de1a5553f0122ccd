"""SIGKILL the SCP process in the middle of a transfer, restart it: every instance that was
acknowledged is in the spool and the job store, and no partial file sits under a final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.jobstore.db import session_scope
from common.jobstore.models import Instance
from service.ingest.dataset import parse_dataset, split_part10
from tests.conftest import REPO_ROOT, free_port, require_tool, small_scale

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_series(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """``n`` synthetic MR slices of one series (random pixels; only the transport matters)."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.InstanceNumber = "MR", "CRASH", i + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MRImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def start_serve(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, SYNTHPERF_DISK_WATERMARK_MB="0", SYNTHPERF_STABLE_AGE_S="600", PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--data-dir", str(data_dir), "--port", str(port),
             "--no-api", "--no-worker"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.read_text(errors="replace").count("synthperf: SCP") > start_serve.started.get(log_path, 0):
            start_serve.started[log_path] = start_serve.started.get(log_path, 0) + 1
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"synthperf serve did not start: {log_path.read_text()[-2000:]}")


start_serve.started = {}  # type: ignore[attr-defined]


def final_files(spool: Path) -> list[Path]:
    return [p for p in spool.glob("*/*/*.dcm") if not p.name.startswith(".")]


def test_sigkill_mid_transfer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    n = 120 if small_scale() else 400
    files = write_series(tmp_path / "src", n)
    data_dir, port = tmp_path / "data", free_port()
    serve_log = tmp_path / "serve.log"
    serve = start_serve(data_dir, port, serve_log)
    log_path = tmp_path / "storescu.log"
    with open(log_path, "w") as log:
        scu = subprocess.Popen(
            [storescu, "-v", "-aec", "SYNTHPERF", "127.0.0.1", str(port), *map(str, files)],
            stdout=log, stderr=subprocess.STDOUT, env={"TCP_NODELAY": "1"},
        )
        spool = data_dir / "spool"
        deadline = time.monotonic() + 120
        while len(final_files(spool)) < n // 3 and time.monotonic() < deadline and scu.poll() is None:
            time.sleep(0.01)
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=30)
        scu.wait(timeout=60)
    acked = log_path.read_text().count("Received Store Response (Success)")
    assert 0 < acked < n, "the kill must land mid-transfer"
    # Before any recovery: whatever sits under a final name is a complete data set.
    for f in final_files(spool):
        ts, offset, _ = split_part10(f.read_bytes())
        parse_dataset(f.read_bytes()[offset:], ts)
    # Restart: recovery removes temp files and records complete, unrecorded files.
    serve = start_serve(data_dir, port, serve_log)
    try:
        assert not list(spool.rglob(".tmp-*"))
        url = f"sqlite:///{(data_dir / 'synthperf.db').resolve()}"
        with session_scope(url) as s:
            rows = {i.sop_instance_uid: i.path for i in s.query(Instance)}
        from pydicom import dcmread

        for f in files[:acked]:
            sop = str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert sop in rows, f"acknowledged instance {f.name} missing from the job store"
            assert (spool / rows[sop]).is_file()
        assert len(rows) == len(final_files(spool))
        # The sender simply retries everything: duplicates are idempotent, the rest arrives.
        res = subprocess.run([storescu, "-aec", "SYNTHPERF", "127.0.0.1", str(port), *map(str, files)],
                             capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})
        assert res.returncode == 0, res.stderr[-1000:]
        with session_scope(url) as s:
            assert s.query(Instance).count() == n
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
