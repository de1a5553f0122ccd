"""bench.tmax_cut: Dice, volumes and DEFUSE-3 of the mean Tmax map cut at other values than 6 s."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.tmax_cut import case_scores, choose, summarise


def _case(root: Path, name: str, mean_in_lesion: float) -> Path:
    """A 1 mm grid with a 200-voxel true Tmax>6 s region, no core; the map under-calls it at ``mean_in_lesion``."""
    d = root / "data" / name
    d.mkdir(parents=True)
    shape = (4, 10, 10)  # (z, y, x)
    tmax = np.full(shape, 2.0, np.float32)
    tmax[:, :, 5:] = 9.0
    images = {"tmax": tmax, "brain": np.ones(shape, np.float32), "core": np.zeros(shape, np.float32)}
    for key, arr in images.items():
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), np.eye(4)), str(d / f"{key}.nii.gz"))
    maps = root / "maps"
    maps.mkdir(exist_ok=True)
    mean = np.where(tmax > 6, mean_in_lesion, 1.0).astype(np.float16)
    np.savez_compressed(maps / f"{name}.npz", mean=mean, sd=np.zeros_like(mean))
    return d


def test_a_cut_below_the_maps_values_recovers_an_under_call(tmp_path: Path):
    c = case_scores(tmp_path / "maps", _case(tmp_path, "case_1", 5.5), (5.0, 6.0), (10.0,))
    assert c["true6_ml"] == pytest.approx(0.2)
    assert c["d6"][6.0] == 0.0 and c["v6"][6.0] == 0.0  # 5.5 s is under the clinical cut
    assert c["d6"][5.0] == 1.0 and c["v6"][5.0] == pytest.approx(0.2)
    assert choose([c]) == (5.0, 10.0)
    s6, s5 = summarise([c], 6.0, 10.0), summarise([c], 5.0, 10.0)
    assert s6["bias6_ml"] == pytest.approx(-0.2) and s5["bias6_ml"] == pytest.approx(0.0)
    assert s6["dice6_no_core"] == 0.0 and s5["dice6_no_core"] == 1.0
