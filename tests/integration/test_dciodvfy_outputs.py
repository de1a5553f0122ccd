"""Every object we write for phantom studies in each vendor's header style passes dciodvfy with
no errors, and reads back with highdicom to our values.

The study goes through the real classify and load stages (so the encoder sees exactly the source
headers the pipeline gives it); the Tmax written is the phantom's ground truth, so this test does
not depend on the model.
"""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pytest

from common.config import load_settings
from tests.conftest import require_tool, small_scale
from tests.integration.test_process import write_phantom
from worker.pipeline.encode import EncodeInput, encode_outputs
from worker.pipeline.run import (
    Context,
    MemoryRecorder,
    RunOptions,
    _geometry,
    _headers,
    _load_json,
    _load_npz,
    run_stages,
)

FORMS = [("siemens", True), ("ge", False), ("philips", False)]
if not small_scale():
    FORMS += [("siemens", False), ("ge", True), ("philips", True)]


@pytest.mark.slow
@pytest.mark.parametrize(("vendor", "enhanced"), FORMS, ids=[f"{v}-{'enh' if e else 'classic'}" for v, e in FORMS])
def test_outputs_pass_dciodvfy_and_read_back(vendor, enhanced, tmp_path):
    dciodvfy = require_tool("dciodvfy")
    case, study_dir = write_phantom(tmp_path / "phantom", seed=3, vendor=vendor, matrix=64, enhanced=enhanced)
    settings = load_settings(data_dir=tmp_path / "data")
    ctx = Context(settings=settings, job_dir=tmp_path / "job", input_paths=[study_dir], study_uid="",
                  job_version=1, options=RunOptions.from_settings(settings))
    run_stages(ctx, MemoryRecorder(), ["classify", "load"])
    geo = _geometry(ctx)
    vols = _load_npz(ctx.work / "volumes.npz")
    meta = _load_json(ctx.work / "load.json")
    assert tuple(geo.shape_zyx) == case.tmax.shape, "the loaded DWI grid must be the phantom's DWI grid"
    brain = vols["brain"].astype(bool)
    tmax = (case.tmax * brain).astype(np.float32)
    dwi_sources = _headers(meta["dwi_paths"])
    multi = [d for d in dwi_sources if int(d.get("NumberOfFrames", 1) or 1) > 1]
    if enhanced:
        assert multi, "the enhanced form should give a multi-frame DWI source"
    vml = geo.voxel_ml()
    core = case.core.astype(bool) & brain
    t6, t10 = (tmax > 6) & brain, (tmax > 10) & brain
    measures = {"core_ml": core.sum() * vml, "tmax6_ml": t6.sum() * vml, "tmax10_ml": t10.sum() * vml,
                "mismatch_ml": max(t6.sum() - core.sum(), 0) * vml, "mismatch_ratio": None, "hir": None,
                "defuse3": False, "extend": False}
    study_uid = str(dwi_sources[0].StudyInstanceUID)
    inp = EncodeInput(
        study_uid=study_uid, job_version=1, geometry=geo, dwi_sources=multi[:1] or dwi_sources,
        flair_sources=_headers(meta["flair_paths"]), dwi=vols["dwi"], tmax=tmax, tmax_sd=0.1 * tmax,
        core=core, brain=brain, measures=measures, software_version="test", model_name="truth",
        model_version="phantom", samples=1,
    )
    result = encode_outputs(inp, tmp_path / "out")
    failures = {}
    overlays = [o.path for o in result.objects if o.kind == "overlay"]
    for obj in result.objects:
        if obj.kind == "overlay" and obj.path not in (overlays[0], overlays[-1]):
            continue  # the first overlay is built by highdicom, the others cloned from it
        proc = subprocess.run([dciodvfy, obj.path], capture_output=True, text=True, timeout=120)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        if errors:
            failures[obj.kind] = errors[:10]
    assert not failures, failures
    # read back: Tmax map and SEG give our arrays (highdicom orders slices its own way: match by position)
    tm = hd.imread(next(o.path for o in result.objects if o.kind == "tmax"))
    vol = tm.get_volume()
    normal = geo.axes[2]
    pos = [float(np.dot((vol.affine @ np.array([k, 0, 0, 1.0]))[:3], normal)) for k in range(vol.shape[0])]
    order = [int(np.argmin(np.abs(np.asarray(pos) - float(np.dot(geo.slice_position(k), normal)))))
             for k in range(geo.shape_zyx[0])]
    back = vol.array[order]
    if back.shape != tmax.shape:  # highdicom volume axes follow the stored orientation
        pytest.fail(f"read-back shape {back.shape} != {tmax.shape}")
    np.testing.assert_array_equal(back.astype(np.float32), tmax)
    seg = hd.seg.segread(next(o.path for o in result.objects if o.kind == "seg"))
    sv = seg.get_volume(combine_segments=False).array[order]
    np.testing.assert_array_equal(sv[..., 0].astype(bool), core)
    np.testing.assert_array_equal(sv[..., 1].astype(bool), t6)
