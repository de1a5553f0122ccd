"""bench.no_core_ceiling's oracle: the territories of the true vessel signs, scored against the true Tmax>6 s."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.no_core_ceiling import fvh_territory_oracle


def _case(root: Path, fvh_at: tuple[int, int, int] | None) -> Path:
    d = root / ("sign" if fvh_at else "none")
    d.mkdir()
    shape = (4, 10, 10)  # (z, y, x)
    territory = np.zeros(shape, np.float32)
    territory[:, :, :5], territory[:, :, 5:] = 1, 2
    tmax = np.where(territory == 2, 9.0, 2.0).astype(np.float32)
    tmax[:, :5, 5:] = 2.0  # half of territory 2 is hypoperfused
    fvh = np.zeros(shape, np.float32)
    if fvh_at:
        fvh[fvh_at] = 1
    images = {"tmax": tmax, "brain": np.ones(shape, np.float32), "territory": territory, "fvh": fvh}
    for name, arr in images.items():
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), np.eye(4)), str(d / f"{name}.nii.gz"))
    return d


def test_the_oracle_calls_the_whole_territory_of_a_sign_and_nothing_without_one(tmp_path: Path):
    dice, voxels, called_ml = fvh_territory_oracle(_case(tmp_path, (1, 2, 7)))  # a sign in territory 2
    assert voxels == 1
    assert dice == pytest.approx(2 * 100 / (200 + 100))  # called 200 voxels, 100 of them true
    assert called_ml == pytest.approx(200 * 1e-3)  # 1 mm voxels
    assert fvh_territory_oracle(_case(tmp_path, None)) == (0.0, 0, 0.0)
