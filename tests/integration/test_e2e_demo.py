"""The ``--demo`` hook of ``synthperf serve``: one phantom study sent to our own SCP on first
start, a printout of where to look, and nothing sent again on the next start."""

from __future__ import annotations

import pytest

from common.config import load_settings
from tests.conftest import free_port
from tests.unit.test_push import CountingSCP


@pytest.mark.slow
def test_demo_sends_one_phantom_study_once(data_dir, capsys):
    pytest.importorskip("phantom.dicom.study", reason="phantom DICOM writer (issue 4) has not landed yet")
    from cli.demo import send_demo_study

    port = free_port()
    settings = load_settings(data_dir=data_dir, api_port=18123)
    scp = CountingSCP(port, ae_title=settings.ae_title)
    scp.start()
    try:
        study_dir = send_demo_study(settings, port)
        out = capsys.readouterr().out
        assert study_dir is not None and scp.received
        files = [p for p in study_dir.rglob("*") if p.is_file() and not p.name.endswith((".json", ".gz"))]
        assert len(scp.received) == len(files)
        assert "watch the job:   http://127.0.0.1:18123/" in out
        assert "NOT FOR DIAGNOSTIC USE" in out and str(settings.output_dir.resolve()) in out
        n = len(scp.received)
        assert send_demo_study(settings, port) is None  # second start: already sent
        assert "already sent" in capsys.readouterr().out
        assert len(scp.received) == n
    finally:
        scp.stop()
