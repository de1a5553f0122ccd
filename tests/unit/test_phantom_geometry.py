"""Phantom geometry: the recorded DWI->FLAIR motion is the truth a registration must recover."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from phantom.api import make_case
from phantom.geometry import Grid, rotation_matrix


def _sitk(arr: np.ndarray, g: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(tuple(float(v) for v in g.spacing[::-1]))
    img.SetOrigin(tuple(float(v) for v in g.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(g.direction).ravel()))
    return img


def _corr(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    return float(np.corrcoef(a[m], b[m])[0, 1])


def test_recorded_motion_maps_flair_onto_dwi():
    c = make_case(31, scenario={"occlusion": "M1", "side": "left", "collaterals": "poor", "onset_h": 8.0})
    m = c.flair_motion
    mat = np.asarray(m["matrix_dwi_to_flair_world"])
    assert np.allclose(mat[:3, :3], rotation_matrix(m["rotation_deg_xyz"]), atol=1e-6)
    flair = _sitk(c.flair, c.flair_grid)
    ref = _sitk(c.flair_on_dwi, c.grid)

    euler = sitk.Euler3DTransform()
    euler.SetComputeZYX(True)
    euler.SetCenter(tuple(m["center_lps"]))
    euler.SetRotation(*np.deg2rad(m["rotation_deg_xyz"]))
    euler.SetTranslation(tuple(m["translation_mm"]))
    assert np.allclose(np.asarray(euler.GetMatrix()).reshape(3, 3), mat[:3, :3], atol=1e-9)

    brain = ndimage.binary_erosion(c.brain, iterations=2)
    moved = sitk.GetArrayFromImage(sitk.Resample(flair, ref, euler, sitk.sitkLinear, 0.0))
    naive = sitk.GetArrayFromImage(sitk.Resample(flair, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    r_true = _corr(moved, c.flair_on_dwi, brain)
    r_naive = _corr(naive, c.flair_on_dwi, brain)
    assert r_true > 0.7 and r_true > r_naive + 0.05, (r_true, r_naive)
    # the late core is FLAIR-bright on its own grid exactly where the DWI truth puts it
    core = ndimage.binary_erosion(c.core, iterations=1)
    assert core.sum() > 30
    fl_truth = c._lazy["flair_truth"]["core"].astype(np.float32)
    core_on_dwi = sitk.GetArrayFromImage(sitk.Resample(_sitk(fl_truth, c.flair_grid), ref, euler,
                                                       sitk.sitkNearestNeighbor, 0.0))
    assert core_on_dwi[core].mean() > 0.9


@pytest.mark.slow
def test_standard_registration_recovers_recorded_motion():
    """Plain SimpleITK mutual-information registration of FLAIR (moving) to b0 (fixed) lands within
    1 mm and 1 degree of the recorded motion: the truth is recoverable from the images."""
    c = make_case(45)
    fixed, moving = _sitk(c.b0, c.grid), _sitk(c.flair, c.flair_grid)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY), inPlace=False)
    tx = reg.Execute(fixed, moving)
    mat = np.asarray(c.flair_motion["matrix_dwi_to_flair_world"])
    pts = np.argwhere(c.brain)[::40][:, ::-1]  # (x, y, z) indices
    a = c.grid.affine_lps()
    world = pts @ a[:3, :3].T + a[:3, 3]
    truth = world @ mat[:3, :3].T + mat[:3, 3]
    est = np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in world])
    assert np.linalg.norm(est - truth, axis=1).mean() < 1.0
    # rotation part: angle between the recovered and the recorded rotation
    eps = 1.0
    basis = np.array([tx.TransformPoint(tuple(float(v) for v in c.flair_motion["center_lps"] + eps * e))
                      for e in np.eye(3)]) - np.array(tx.TransformPoint(tuple(c.flair_motion["center_lps"])))
    r_est = basis.T / eps
    cos = (np.trace(r_est.T @ mat[:3, :3]) - 1) / 2
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 1.0
