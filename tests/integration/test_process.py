"""``synthperf process`` on a phantom study: result.json agrees with the NIfTI maps and the DICOM.

Shared fixtures here (``model_ref``, ``phantom_study``) are used by the e2e and dciodvfy tests too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cli.main import main as cli_main

DEMO_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights" / "demo" / "model.safetensors"


def export_untrained_model(folder: Path) -> str:
    """A real TmaxSynthesizer checkpoint with untrained weights (only when no demo weights exist).

    The pipeline runs the real model code; the values are meaningless, which these tests do not
    rely on: they check that what we report equals what we wrote.
    """
    import torch

    from models.tmax_ddpm.checkpoint import export_weights
    from models.tmax_ddpm.config import Config
    from models.tmax_ddpm.network import build_network

    torch.manual_seed(0)
    cfg = Config()
    net = build_network(cfg.model)
    export_weights(net.state_dict(), cfg, folder, info={"version": "untrained-test"})
    return str(folder)


@pytest.fixture(scope="session")
def model_ref(tmp_path_factory) -> str:
    if DEMO_WEIGHTS.is_file():
        return "demo"
    return export_untrained_model(tmp_path_factory.mktemp("model"))


def write_phantom(folder: Path, seed: int = 11, vendor: str = "siemens", matrix: int = 64, **kw) -> tuple:
    api = pytest.importorskip("phantom.api")
    try:
        import phantom.dicom.study  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("phantom DICOM writer (issue 4) has not landed yet")
    case = api.make_case(seed, matrix=matrix)
    study_dir = api.write_dicom_study(case, folder, vendor, **kw)
    return case, Path(study_dir)


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("phantom"))


def run_process(study_dir: Path, out: Path, model_ref: str, *extra: str) -> int:
    return cli_main(["process", str(study_dir), "--out", str(out), "--steps", "2", "--samples", "2",
                     "--seed", "3", "--model", model_ref, *extra])


@pytest.mark.slow
def test_process_result_agrees_with_nifti_and_dicom(phantom_study, model_ref, tmp_path):
    import nibabel as nib

    case, study_dir = phantom_study
    out = tmp_path / "out"
    assert run_process(study_dir, out, model_ref, "--nifti") == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "mismatch_ratio", "hir", "defuse3", "extend"):
        assert key in result
    # the series chosen and why
    chosen = result["series"]["selected"]
    assert chosen["dwi"]["series_instance_uid"] and chosen["flair"]["series_instance_uid"]
    assert chosen["dwi"]["rule"] and chosen["flair"]["rule"]
    assert any(c["role"] == "FLAIR" for c in result["series"]["classification"])
    assert set(result["timings_s"]) >= {"classify", "load", "core", "synthesize", "measure", "encode", "total"}
    assert result["versions"]["synthperf"] and result["versions"]["model_version"]
    assert result["versions"]["steps"] == 2 and result["versions"]["samples"] == 2
    # how the network ran here: measured on this machine (or read from its cache), never assumed
    inference = result["versions"]["inference"]
    assert inference["how"] in ("measured", "cached") and inference["capability"]
    assert inference["path"] in ("fp32", "channels_last", "bf16", "onnxruntime", "openvino")
    assert inference["path"] != "bf16" or inference["native_bf16"]

    imgs = {n: nib.load(out / f"{n}.nii.gz") for n in ("tmax", "tmax_sd", "core", "tmax6")}
    vml = float(np.prod(imgs["tmax"].header.get_zooms()[:3])) / 1000.0
    tmax = np.asarray(imgs["tmax"].dataobj, dtype=np.float32)
    core = np.asarray(imgs["core"].dataobj) > 0
    tmax6 = np.asarray(imgs["tmax6"].dataobj) > 0
    assert result["core_ml"] == pytest.approx(core.sum() * vml, rel=1e-6, abs=1e-6)
    assert result["tmax6_ml"] == pytest.approx(tmax6.sum() * vml, rel=1e-6, abs=1e-6)
    assert result["tmax10_ml"] == pytest.approx((tmax > 10).sum() * vml, rel=1e-6, abs=1e-6)
    assert result["mismatch_ml"] == pytest.approx(max(tmax6.sum() - core.sum(), 0) * vml, rel=1e-6, abs=1e-6)
    assert np.asarray(imgs["tmax_sd"].dataobj).max() >= 0
    assert imgs["tmax"].shape == tuple(reversed(case.tmax.shape))

    # the DICOM Tmax map holds the same values as the NIfTI
    objects = sorted((out / "dicom").glob("*.dcm"))
    assert len(objects) == result["outputs"]["count"]
    pm = pydicom.dcmread(out / "dicom" / "tmax.dcm")
    frames = pm.pixel_array.astype(np.float32)
    assert sorted(frames.ravel().tolist()) == pytest.approx(sorted(tmax.ravel().tolist()), abs=1e-5)
    assert pm.SeriesDescription.startswith("SYNTHETIC")
    assert not (out / "work").exists()


def test_process_refuses_an_unknown_inference_path(phantom_study, model_ref, tmp_path, capsys):
    _, study_dir = phantom_study
    assert run_process(study_dir, tmp_path / "out", model_ref, "--inference-path", "tensorrt") == 2
    assert "inference path 'tensorrt'" in capsys.readouterr().err


@pytest.mark.slow
def test_process_without_flair_says_what_is_missing(phantom_study, model_ref, tmp_path):
    _, study_dir = phantom_study
    copy = tmp_path / "study"
    shutil.copytree(study_dir, copy)
    removed = 0
    for f in copy.rglob("*"):
        if f.is_file():
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception:  # noqa: BLE001
                continue
            if "FLAIR" in str(ds.get("SeriesDescription", "")).upper() or "FLAIR" in str(
                    ds.get("ProtocolName", "")).upper() or "DARK" in str(ds.get("SeriesDescription", "")).upper():
                f.unlink()
                removed += 1
    assert removed
    out = tmp_path / "out"
    assert run_process(copy, out, model_ref) == 1
    result = json.loads((out / "result.json").read_text())
    assert not result["ok"] and "FLAIR" in result["error"]

