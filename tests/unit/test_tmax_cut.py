"""bench.tmax_cut: Dice, volumes and DEFUSE-3 of the mean Tmax map cut at other values than 6 s."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.tmax_cut import case_scores, choose, choose_no_core, summarise


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


def _scored(core_ml: float, true6_ml: float, v6: dict[float, float]) -> dict:
    """case_scores's shape without images: the called volume at each cut, Dice 1 where it matches the truth."""
    d6 = {cut: 1.0 if abs(v - true6_ml) < 1 else 0.5 for cut, v in v6.items()}
    return {"core_ml": core_ml, "true6_ml": true6_ml, "d6": d6, "v6": v6, "d10": {10.0: 1.0}}


def test_the_no_core_cut_moves_only_studies_without_a_core_and_never_buys_a_healthy_yes():
    core_study = _scored(20.0, 60.0, {5.0: 90.0, 6.0: 60.0})  # right at 6 s, over-called at 5 s
    tia = _scored(0.0, 40.0, {5.0: 40.0, 6.0: 10.0})  # "yes" only when cut at 5 s
    quiet = _scored(0.0, 0.0, {5.0: 2.0, 6.0: 0.0})  # a healthy brain that stays quiet
    s = summarise([core_study, tia, quiet], 5.0, 10.0, no_core_only=True)
    assert s["dice6_core"] == 1.0 and s["dice6_no_core"] == 1.0  # the core study kept its 6 s cut
    assert s["defuse3"] == 1.0 and s["healthy_yes"] == 0
    assert summarise([core_study, tia, quiet], 5.0, 10.0)["dice6_core"] == 0.5  # a global cut moves it too
    assert choose_no_core([core_study, tia, quiet]) == 5.0
    noisy = _scored(0.0, 0.0, {5.0: 20.0, 6.0: 0.0})  # a healthy brain the 5 s cut would call "yes"
    assert choose_no_core([core_study, tia, quiet, noisy]) == 6.0
