"""A phantom study with DSC through the real stages (classify, load, core, measure, encode): the
DSC-derived Parametric Maps, SEG, comparison summary page and SR are written, listed for push,
pass dciodvfy, and read back to the maps and measures the measure stage computed.

The "synthetic" Tmax is the phantom's truth written where the synthesize stage would put it, so the
test does not depend on the model; the DSC-derived Tmax is the real deconvolution.
"""

from __future__ import annotations

import json
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from common.config import load_settings
from tests.conftest import require_tool
from worker.pipeline.encode_perfusion import MAPS
from worker.pipeline.run import (
    Context,
    MemoryRecorder,
    RunOptions,
    _geometry,
    _load_npz,
    _save_json,
    _save_npz,
    run_stages,
)

phantom_api = pytest.importorskip("phantom.api")
SCENARIO = {"occlusion": "M1", "side": "left", "collaterals": "moderate", "onset_h": 3.0}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsc_outputs")
    case = phantom_api.make_case(3, matrix=64, with_dsc=True, scenario=SCENARIO)
    study = phantom_api.write_dicom_study(case, root / "study", "siemens", enhanced=False, split_b=False)
    settings = load_settings(data_dir=root / "data")
    ctx = Context(settings=settings, job_dir=root / "job", input_paths=[study], study_uid="", job_version=1,
                  options=RunOptions.from_settings(settings))
    rec = MemoryRecorder()
    run_stages(ctx, rec, ["classify", "load", "core"])
    brain = _load_npz(ctx.work / "volumes.npz")["brain"].astype(bool)
    tmax = (case.tmax * brain).astype(np.float32)
    _save_npz(ctx.work / "tmax.npz", mean=tmax, sd=0.1 * tmax)
    _save_json(ctx.work / "model.json", {"model_name": "truth", "model_version": "phantom", "samples": 1})
    out = run_stages(ctx, rec, ["measure", "encode"])
    return ctx, rec, out


@pytest.mark.slow
def test_dsc_objects_are_written_listed_and_valid(job):
    dciodvfy = require_tool("dciodvfy")
    ctx, rec, out = job
    manifest = json.loads((ctx.dicom_dir / "manifest.json").read_text())
    kinds = [o["kind"] for o in manifest]
    for kind in ("dsc_summary", "dsc_sr", *MAPS, "dsc_seg"):
        assert kinds.count(kind) == 1, kind
    assert out["encode"].detail["objects"] == len(manifest), "push registers what the manifest lists"
    failures = {}
    for o in manifest:
        if not o["kind"].startswith("dsc_"):
            continue
        assert "research" in o["series_description"].lower()
        proc = subprocess.run([dciodvfy, o["path"]], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        if errors:
            failures[o["kind"]] = errors[:10]
    assert not failures, failures
    by_kind = {o["kind"]: o["path"] for o in manifest}
    # the real Tmax map reads back to the measure stage's map (NaN stored as 0), frames ascending
    perf = np.load(ctx.job_dir / "perfusion" / "perfusion.npz")
    pm = pydicom.dcmread(by_kind["dsc_tmax"])
    assert "DSC-DERIVED" in pm.ImageComments and pm.ContentQualification == "RESEARCH"
    geo = _geometry(ctx)
    normal = geo.axes[2]
    along = [float(np.dot(f.PlanePositionSequence[0].ImagePositionPatient, normal))
             for f in pm.PerFrameFunctionalGroupsSequence]
    assert along == sorted(along)
    frames = pm.pixel_array
    order = np.argsort([float(np.dot(geo.slice_position(k), normal)) for k in range(geo.shape_zyx[0])])
    np.testing.assert_array_equal(frames, np.nan_to_num(perf["tmax"], nan=0.0)[order])
    # the SEG holds the real Tmax>6 s region whose volume the result reports
    real = rec.result["perfusion"]
    seg = hd.seg.segread(by_kind["dsc_seg"])
    assert seg.ImageLaterality == "U" and "Laterality" not in seg  # pixelmed's condition, as the synthetic SEG
    t6 = seg.get_volume(combine_segments=False).array[..., 0].astype(bool)
    assert t6.sum() * geo.voxel_ml() == pytest.approx(real["measures"]["tmax6_ml"], rel=1e-6)
    # the SR carries both sets of volumes and the Dice of the shadow comparison
    sr = pydicom.dcmread(by_kind["dsc_sr"])
    texts = {str(item.TextValue) for item in _walk(sr) if item.get("ValueType") == "TEXT"}
    assert {"DSC Tmax>6s", "DSC Tmax>10s", "Hypoperfusion Tmax>6s", "Infarct core ADC<620"} <= texts
    shadow = real["shadow"]
    assert 0.5 < shadow["dice_t6"] <= 1.0, shadow  # DSC vs phantom truth: measured in the unit tests ~0.85
    values = [float(item.MeasuredValueSequence[0].NumericValue) for item in _walk(sr)
              if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "DICE_TMAX6"]
    assert values == [pytest.approx(shadow["dice_t6"], abs=1e-4)]
    summary = pydicom.dcmread(by_kind["dsc_summary"])
    assert summary.SeriesNumber == 916 and summary.Rows == 768


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
