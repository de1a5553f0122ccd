"""``make run``'s demo PACS (cli/demo_pacs.py): a real Orthanc with OHIF in front of it becomes the
demo's destination where both are installed; where not, the demo says how to get them.

The PACS receives our objects by C-STORE (as the worker sends them), serves them through OHIF's
origin by DICOMweb, and the demo prints the study's viewer URL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pydicom
import pytest

from cli import demo_pacs
from cli.cmd_send import send_paths
from common.config import load_settings
from tests.conftest import _missing
from tests.unit.test_encode import make_input
from worker.pipeline.encode import encode_outputs

pytestmark = pytest.mark.integration


@pytest.fixture
def no_demo_pacs_left():
    yield
    demo_pacs.stop_demo_pacs()


def test_demo_pacs_receives_results_and_shows_them_through_ohif(no_demo_pacs_left, tmp_path, capsys):
    lack = demo_pacs.missing()
    if lack:
        _missing(f"demo PACS parts not installed: {lack} (make test installs them)")
    settings = load_settings(data_dir=tmp_path / "var")
    assert not settings.destinations
    env: dict[str, str] = {}
    pacs, settings = demo_pacs.start_demo_pacs(settings, env)
    assert pacs is not None and demo_pacs.current() is pacs
    # it is the one destination, for us and for the worker we start
    assert [d.key for d in settings.destinations] == [f"ORTHANC@127.0.0.1:{pacs.dicom_port}"]
    assert json.loads(env["SYNTHPERF_DESTINATIONS"]) == [pacs.destination]
    assert "OHIF viewer at http://127.0.0.1:" in capsys.readouterr().out

    inp, _ = make_input(False)
    objects = [Path(o.path) for o in encode_outputs(inp, tmp_path / "out").objects if o.kind in ("seg", "tmax")]
    counts = send_paths(objects, "127.0.0.1", pacs.dicom_port, called_aet="ORTHANC", calling_aet="SYNTHPERF")
    assert counts.get("sent") == len(objects), counts
    study_uid = pydicom.dcmread(objects[0], stop_before_pixels=True).StudyInstanceUID

    front = pacs.front
    assert front is not None
    with httpx.Client(timeout=10) as http:
        studies = http.get(f"{front.url}/dicom-web/studies", headers={"Accept": "application/dicom+json"}).json()
        assert [s["0020000D"]["Value"][0] for s in studies] == [study_uid]
        page = http.get(pacs.viewer_url(study_uid))
        assert page.status_code == 200 and "OHIF" in page.text  # the app routes /viewer itself
        config = http.get(f"{front.url}/app-config.js").text
        assert '"qidoRoot": "/dicom-web"' in config and '"defaultDataSourceName": "synthperf"' in config

    # the demo's phantom: to us (here a counting SCP) and, as a scanner routes it, to the demo PACS;
    # the printout names the study's viewer URL
    pytest.importorskip("phantom.dicom.study")
    from cli.demo import send_demo_study
    from tests.conftest import free_port
    from tests.unit.test_push import CountingSCP

    port = free_port()
    scp = CountingSCP(port, ae_title=settings.ae_title)
    scp.start()
    try:
        demo_study = send_demo_study(settings, port)
    finally:
        scp.stop()
    assert demo_study is not None and scp.received
    demo_uid = json.loads((settings.data_dir / "demo" / "sent.json").read_text())["study_uid"]
    out = capsys.readouterr().out
    assert f"{front.url}/viewer?StudyInstanceUIDs={demo_uid}" in out, out
    in_pacs = httpx.get(f"{front.url}/dicom-web/studies/{demo_uid}/instances", timeout=10).json()
    assert len(in_pacs) == len(scp.received)

    proc = pacs.proc
    demo_pacs.stop_demo_pacs()
    assert proc is not None and proc.poll() is not None and demo_pacs.current() is None


def test_demo_without_the_viewer_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("SYNTHPERF_TOOLS_DIR", str(empty))
    monkeypatch.delenv("SYNTHPERF_OHIF_DIST", raising=False)
    assert "OHIF's app" in demo_pacs.missing()
    settings = load_settings(data_dir=tmp_path / "var")
    env: dict[str, str] = {}
    pacs, same = demo_pacs.start_demo_pacs(settings, env)
    assert pacs is None and same is settings and not env and demo_pacs.current() is None
    out = capsys.readouterr().out
    assert "no demo PACS" in out and "OHIF's app" in out and "make tools" in out and "ensure_ohif.sh" in out


def test_a_configured_destination_wins_over_the_demo_pacs(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHPERF_DESTINATIONS", json.dumps([{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}]))
    settings = load_settings(data_dir=tmp_path / "var")
    env: dict[str, str] = {}
    pacs, same = demo_pacs.start_demo_pacs(settings, env)
    assert pacs is None and same is settings and not env
    assert os.environ["SYNTHPERF_DESTINATIONS"]  # untouched
