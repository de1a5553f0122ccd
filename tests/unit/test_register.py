"""Rigid FLAIR->DWI registration recovers known phantom motion within 1 mm and 1 degree; brain mask.

The phantom moves the head between DWI and FLAIR by a known rigid motion
(``case.flair_motion``: p_flair = R (p_dwi - c) + c + t) and acquires the FLAIR on its own oblique,
finer grid. The registration's transform maps DWI points to FLAIR points, so it must equal that motion.
Errors are measured as the residual rotation angle and the displacement at the head centre and over
the brain.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import small_scale
from worker.pipeline.load import brain_mask, register_rigid, resample_to

phantom_api = pytest.importorskip("phantom.api")


def grid_image(arr: np.ndarray, grid) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    sz, sy, sx = grid.spacing
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(grid.direction).flatten()))
    return img


def motion_errors(case, info: dict, b0: sitk.Image, brain: np.ndarray) -> tuple[float, float, float]:
    truth = np.asarray(case.flair_motion["matrix_dwi_to_flair_world"])
    est = np.asarray(info["matrix_dwi_to_flair"])
    r = truth[:3, :3].T @ est[:3, :3]
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))
    centre = np.asarray(case.flair_motion["center_lps"])
    d_centre = float(np.linalg.norm((truth[:3, :3] - est[:3, :3]) @ centre + truth[:3, 3] - est[:3, 3]))
    idx = np.argwhere(brain)[::40]
    pts = np.array([b0.TransformIndexToPhysicalPoint([int(k[2]), int(k[1]), int(k[0])]) for k in idx])
    d = np.linalg.norm(pts @ (truth[:3, :3] - est[:3, :3]).T + truth[:3, 3] - est[:3, 3], axis=1)
    return angle, d_centre, float(d.mean())


SEEDS = [3] if small_scale() else [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_registration_recovers_phantom_motion(seed: int):
    case = phantom_api.make_case(seed, matrix=128)
    b0 = grid_image(case.b0, case.grid)
    flair = grid_image(case.flair, case.flair_grid)
    moved = case.flair_motion
    assert max(abs(a) for a in moved["rotation_deg_xyz"]) > 0.2 or max(abs(t) for t in moved["translation_mm"]) > 1
    transform, info = register_rigid(b0, flair)
    angle, d_centre, d_mean = motion_errors(case, info, b0, case.brain)
    assert angle < 1.0, info
    assert d_centre < 1.0, info
    assert d_mean < 1.0, info
    assert info["metric_after"] < info["metric_before"]
    # The registered FLAIR matches the phantom's motion-free FLAIR on the DWI grid better than the
    # scanner geometry does.
    ref = case.flair_on_dwi[case.brain]
    corr_before = np.corrcoef(sitk.GetArrayFromImage(resample_to(flair, b0))[case.brain], ref)[0, 1]
    corr_after = np.corrcoef(sitk.GetArrayFromImage(resample_to(flair, b0, transform))[case.brain], ref)[0, 1]
    assert corr_after > corr_before


def test_registration_of_identical_images_stays_put():
    rng = np.random.default_rng(0)
    arr = np.zeros((20, 64, 64), np.float32)
    zz, yy, xx = np.mgrid[:20, :64, :64]
    arr[((zz - 10) / 8) ** 2 + ((yy - 32) / 22) ** 2 + ((xx - 30) / 18) ** 2 < 1] = 100
    arr[((zz - 10) / 4) ** 2 + ((yy - 28) / 6) ** 2 + ((xx - 36) / 5) ** 2 < 1] = 40
    arr += rng.normal(0, 2, arr.shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 5.0))
    _, info = register_rigid(img, img)
    assert info["rotation_deg"] < 0.2 and info["translation_mm"] < 0.3


def test_registration_rejects_mismatched_levels():
    img = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    with pytest.raises(ValueError, match="one entry per level"):
        register_rigid(img, img, shrink=(2, 1), smoothing=(0.0,))


def test_brain_mask_matches_phantom_brain_under_noise():
    case = phantom_api.make_case(7, matrix=64)
    b0 = grid_image(case.b0, case.grid)
    mask = sitk.GetArrayFromImage(brain_mask(b0)) > 0
    truth = case.brain
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9
    # Stronger noise: add Rician-like noise at 10 % of the brain signal; the mask barely changes.
    rng = np.random.default_rng(1)
    sigma = 0.1 * float(np.median(case.b0[truth]))
    noisy = np.hypot(case.b0 + rng.normal(0, sigma, case.b0.shape), rng.normal(0, sigma, case.b0.shape))
    mask_n = sitk.GetArrayFromImage(brain_mask(grid_image(noisy, case.grid))) > 0
    assert 2 * (mask_n & truth).sum() / (mask_n.sum() + truth.sum()) > 0.88
    assert brain_mask(b0).GetPixelID() == sitk.sitkUInt8


def test_brain_mask_leaves_a_bright_scalp_out():
    """A randomised geometric case (seed 250012) whose scalp is thick and bright on the b0: the largest
    tissue component with its holes filled took scalp and skull, 1.75x the brain's volume. Cutting the
    partial-volume bridges and keeping the component at the head's deep core: measured 1.24x, no brain
    lost. (Seed 210000 stays at 1.63x: its lower slices join face and brain more broadly.)"""
    case = phantom_api.make_case(250012, matrix=128, randomise=True, family="geometric")
    mask = sitk.GetArrayFromImage(brain_mask(grid_image(case.b0, case.grid))) > 0
    truth = case.brain
    assert (truth & ~mask).sum() < 0.02 * truth.sum()
    assert mask.sum() < 1.35 * truth.sum(), mask.sum() / truth.sum()
