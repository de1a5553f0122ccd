"""bench.core_floor: each size floor (and noise support) of the core rule scored side by side on phantom cases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from bench.core_floor import score_case, summarise
from models.tmax_ddpm.data import lps_direction

SPECK = (slice(13, 14), slice(60, 62), slice(42, 44))  # 4 voxels of deep white matter, one slice


def _implant_speck(case_dir: Path) -> float:
    """Write a DWI-bright, ADC-dark 4-voxel focus into a case's volumes; returns its volume in mL."""
    vol = 0.0
    for name in ("adc", "dwi"):
        img = nib.load(str(case_dir / f"{name}.nii.gz"))
        arr = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0).copy()
        arr[SPECK] = 400.0 if name == "adc" else 2.0 * arr[SPECK]  # ADC in 1e-6 mm^2/s; DWI twice its tissue
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), img.affine, img.header), str(case_dir / f"{name}.nii.gz"))
        vol = 4 * float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    return vol


def test_a_floor_between_two_sizes_decides_whether_a_small_focus_is_core(tmp_path: Path) -> None:
    from phantom.api import make_case, write_training_case

    healthy = write_training_case(make_case(7, scenario={"occlusion": "none"}), tmp_path)
    stroke = write_training_case(make_case(3, scenario={"occlusion": "M1"}), tmp_path)
    speck_ml = _implant_speck(healthy)
    # the phantom's axial grid, read back from its NIfTI affine (RAS) as SimpleITK's LPS direction
    assert lps_direction(healthy / "dwi.nii.gz") == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert 0.03 < speck_ml < 0.1, speck_ml

    coarse_v, fine_v = (0.1, 2), (0.03, 2)  # (floor mL, noise support): a 2 x 2 focus has 3 low neighbours a voxel
    floors = (coarse_v, fine_v)
    rows = [score_case(healthy, floors), score_case(stroke, floors)]
    assert rows[0]["core_ml"] == 0 and not rows[0]["hypo"]
    assert rows[1]["core_ml"] > 1 and rows[1]["hypo"]
    # the 0.1 mL floor drops the focus; 0.03 mL keeps it, and on a healthy brain it is a false core
    assert rows[0][coarse_v][0] == 0.0
    assert rows[0][fine_v][0] >= speck_ml - 1e-6
    coarse, fine = summarise(rows, coarse_v), summarise(rows, fine_v)
    assert (coarse["false_healthy"], fine["false_healthy"]) == (0.0, 1.0)
    assert fine["false_healthy_max_ml"] >= speck_ml - 1e-6
    # the stroke's own core is found either way, and scored per family
    assert coarse["geometric"] == coarse["all"] > 0.8
    assert fine["geometric"] > 0.8
