"""The ADC/DWI core rule on hand-built volumes: what is core, what is not, units, settings.

The volumes are built here (no phantom): an ellipsoidal brain with grey/white-like texture, a smooth
coil-intensity gradient, ventricles, and lesions of known ADC/DWI behaviour -- an acute infarct
(low ADC, bright DWI), a chronic infarct (high ADC, dark DWI), white-matter hyperintensities (ADC
raised, DWI mildly bright by T2 shine-through), a low-ADC rim on the ventricle wall and a bright
low-ADC susceptibility streak at the skull-base brain edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from common.config import load_settings
from common.errors import InvalidInputError
from worker.pipeline.core import ADC_UNITS, CoreParams, detect_adc_units, segment_core, world_axis

SPACING = (4.0, 2.0, 2.0)  # z, y, x mm


@dataclass
class Synth:
    adc: np.ndarray  # 1e-6 mm^2/s
    dwi: np.ndarray
    brain: np.ndarray
    acute: np.ndarray
    chronic: np.ndarray
    wmh: np.ndarray
    rim: np.ndarray
    streak: np.ndarray


def _ellipsoid(shape: tuple[int, int, int], centre_mm: tuple[float, ...], radii_mm: tuple[float, ...]) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)), indexing="ij")
    d = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre_mm, radii_mm, strict=True))
    return d <= 1.0


def make_synth(
    seed: int = 0,
    lesion: bool = True,
    shape: tuple[int, int, int] = (36, 96, 80),
    noise: float = 0.07,
    acute_dwi: float = 190.0,
) -> Synth:
    """A small head: 144 x 192 x 160 mm field of view at 4 x 2 x 2 mm. ``noise``: relative DWI noise."""
    rng = np.random.default_rng(seed)
    zc, yc, xc = (n * s / 2 for n, s in zip(shape, SPACING, strict=True))
    brain = _ellipsoid(shape, (zc, yc, xc), (66, 88, 70))
    vent = _ellipsoid(shape, (zc + 10, yc, xc - 8), (14, 26, 5)) | _ellipsoid(shape, (zc + 10, yc, xc + 8), (14, 26, 5))
    grey = rng.random(shape) < 0.4
    adc = np.where(grey, 850.0, 720.0)
    dwi = np.where(grey, 110.0, 95.0)
    adc[vent] = 3000.0
    dwi[vent] = 25.0
    none = np.zeros(shape, bool)
    acute = _ellipsoid(shape, (zc + 4, yc - 10, xc + 34), (16, 18, 14)) & brain & ~vent if lesion else none
    adc[acute], dwi[acute] = 430.0, acute_dwi
    chronic = _ellipsoid(shape, (zc + 8, yc + 40, xc - 38), (12, 14, 12)) & brain
    adc[chronic], dwi[chronic] = 1900.0, 60.0
    wmh = (
        _ellipsoid(shape, (zc + 20, yc - 34, xc - 14), (8, 8, 6)) | _ellipsoid(shape, (zc + 24, yc + 30, xc + 14), (6, 10, 6))
    ) & brain & ~vent
    adc[wmh], dwi[wmh] = 1150.0, 135.0
    # One-voxel low-ADC, mildly bright rim on the outer wall of the left ventricle.
    from scipy import ndimage as ndi

    rim = ndi.binary_dilation(vent, structure=np.array([[[0, 0, 0], [0, 0, 0], [0, 1, 1]]], bool)) & ~vent & brain
    rim &= np.arange(shape[2])[None, None, :] > shape[2] // 2 + 4
    adc[rim], dwi[rim] = 560.0, 150.0
    # Susceptibility streak: lowest 5 brain slices, outermost 1-2 voxels at the anterior edge.
    edge = brain & ~ndi.binary_erosion(brain, iterations=2)
    zs = np.flatnonzero(brain.any(axis=(1, 2)))
    streak = edge.copy()
    streak[zs[5] :] = False
    streak[:, : int(shape[1] * 0.7)] = False
    adc[streak], dwi[streak] = 380.0, 260.0
    # Noise and a smooth coil gradient (40 % across the head) on DWI.
    adc = adc * (1 + 0.08 * rng.standard_normal(shape))
    dwi = dwi * (1 + noise * rng.standard_normal(shape))
    dwi *= np.linspace(0.8, 1.2, shape[1])[None, :, None]
    adc[~brain] = 0.0
    dwi[~brain] = 0.0
    return Synth(adc.astype(np.float32), dwi.astype(np.float32), brain, acute, chronic, wmh, rim, streak)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


@pytest.fixture(scope="module")
def synth() -> Synth:
    return make_synth(0)


def test_acute_infarct_found(synth: Synth) -> None:
    r = segment_core(synth.adc, synth.dwi, synth.brain, SPACING)
    assert r.method == "rule"
    assert synth.acute.sum() > 300
    assert dice(r.mask, synth.acute) > 0.9
    vol_err = abs(r.volume_ml(SPACING) - synth.acute.sum() * 0.016)
    assert vol_err < 0.1 * synth.acute.sum() * 0.016


def test_chronic_infarct_wmh_and_artefacts_are_not_core(synth: Synth) -> None:
    r = segment_core(synth.adc, synth.dwi, synth.brain, SPACING)
    for name in ("chronic", "wmh", "rim", "streak"):
        region = getattr(synth, name)
        assert region.sum() > 10, name
        assert not (r.mask & region).any(), f"{name} called core"
    # Everything the rule calls core lies in or right next to the acute infarct.
    from scipy import ndimage as ndi

    assert not (r.mask & ~ndi.binary_dilation(synth.acute, iterations=1)).any()


def test_rim_and_streak_would_pass_the_adc_threshold_alone(synth: Synth) -> None:
    """The artefact regions are real traps: each is below 620 and DWI-bright, so only the
    artefact screening keeps them out (guards against the previous test passing vacuously)."""
    for region in (synth.rim, synth.streak):
        assert np.median(synth.adc[region]) < 620
        assert np.median(synth.dwi[region]) > 1.2 * np.median(synth.dwi[synth.brain & (synth.adc < 1000)])
    loose = CoreParams(rim_fraction_max=1.0, edge_fraction_max=1.0, rim_edge_fraction_max=1.0, min_component_ml=0)
    r = segment_core(synth.adc, synth.dwi, synth.brain, SPACING, loose)
    assert (r.mask & synth.streak).any() or (r.mask & synth.rim).any()


def test_no_lesion_no_core() -> None:
    s = make_synth(3, lesion=False)
    r = segment_core(s.adc, s.dwi, s.brain, SPACING)
    assert r.mask.sum() == 0
    assert r.mask.dtype == bool and r.mask.shape == s.adc.shape


@pytest.mark.parametrize("units", ["1e-6 mm2/s", "1e-3 mm2/s", "mm2/s"])
def test_units_detected_and_mask_unchanged(synth: Synth, units: str) -> None:
    ref = segment_core(synth.adc, synth.dwi, synth.brain, SPACING).mask
    adc = synth.adc / ADC_UNITS[units]
    r = segment_core(adc, synth.dwi, synth.brain, SPACING)
    assert r.adc_units == units and r.units_guessed
    assert r.adc_scale == ADC_UNITS[units]
    assert any("guessed" in w for w in r.warnings)
    assert dice(r.mask, ref) > 0.999


def test_declared_units_are_not_guessed_but_checked(synth: Synth) -> None:
    scale, units, guessed, warnings = detect_adc_units(synth.adc / 1000, synth.brain, "1e-3 mm2/s")
    assert (scale, units, guessed, warnings) == (1000.0, "1e-3 mm2/s", False, [])
    _, _, guessed, warnings = detect_adc_units(synth.adc, synth.brain, "1e-3 mm2/s")
    assert not guessed and warnings and "implausible" in warnings[0]
    with pytest.raises(InvalidInputError, match="unknown ADC units"):
        detect_adc_units(synth.adc, synth.brain, "furlongs")


def test_unclear_units_warn_to_check_the_series(synth: Synth) -> None:
    _, units, guessed, warnings = detect_adc_units(synth.adc * 50, synth.brain)
    assert guessed and "unclear" in warnings[0] and units == "1e-6 mm2/s"


def test_bad_inputs_say_what_is_wrong(synth: Synth) -> None:
    with pytest.raises(InvalidInputError, match="ADC has no positive values"):
        segment_core(np.zeros_like(synth.adc), synth.dwi, synth.brain, SPACING)
    with pytest.raises(InvalidInputError, match="share one grid"):
        segment_core(synth.adc[:-1], synth.dwi, synth.brain, SPACING)
    with pytest.raises(InvalidInputError, match="spacing_zyx"):
        segment_core(synth.adc, synth.dwi, synth.brain, (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="dwi_ratio_seed"):
        CoreParams(dwi_ratio_min=1.5, dwi_ratio_seed=1.2)


def test_settings_drive_threshold_and_min_volume(synth: Synth) -> None:
    default = CoreParams.from_settings(load_settings())
    assert default.adc_threshold == 620.0 and default.learned_weights is None
    # The acute lesion has ADC ~430: a 400 threshold leaves (almost) nothing of it.
    strict = CoreParams.from_settings(load_settings(adc_core_threshold=400.0))
    r = segment_core(synth.adc, synth.dwi, synth.brain, SPACING, strict)
    assert r.mask.sum() < 0.2 * synth.acute.sum()
    # A minimum component volume above the lesion's volume drops it.
    big = CoreParams.from_settings(load_settings(core_min_component_ml=synth.acute.sum() * 0.016 * 1.5))
    assert segment_core(synth.adc, synth.dwi, synth.brain, SPACING, big).mask.sum() == 0


def test_single_low_voxel_dropped_by_minimum_volume_and_by_noise_support() -> None:
    """One bright low-ADC voxel is what noise makes: either screen alone removes it."""
    s = make_synth(5, lesion=False)
    z, y, x = 12, 40, 20  # deep white matter, away from ventricles and edge
    s.adc[z, y, x], s.dwi[z, y, x] = 400.0, 250.0  # one bright low-ADC voxel (0.016 mL)

    def found(**kw: float) -> np.ndarray:
        return segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(adc_median_px=1, **kw)).mask

    assert found().sum() == 0
    assert found(min_component_ml=0.0, low_support=0)[z, y, x]
    assert found(min_component_ml=0.0).sum() == 0  # no low neighbour: no support
    assert found(low_support=0).sum() == 0  # 0.016 mL < min_component_ml
    with pytest.raises(ValueError, match="low_support"):
        CoreParams(low_support=9)


def test_world_axis_reads_the_direction() -> None:
    assert world_axis(None, 0) == (2, 1)  # x index runs to patient left
    assert world_axis(None, 2) == (0, 1)  # z index runs superior
    flipped = np.diag([-1.0, 1.0, -1.0])
    assert world_axis(flipped.ravel(), 0) == (2, -1)
    assert world_axis(flipped, 2) == (0, -1)
    sagittal = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # columns: i->P, j->I, k->L
    assert world_axis(sagittal, 0) == (0, 1)
    assert world_axis(sagittal, 2) == (1, -1)


def test_mirror_symmetric_pair_is_artefact_single_is_kept() -> None:
    """Bilateral mirror-image low-ADC spots (petrous/sinus susceptibility) are dropped as a pair;
    the same spot on one side only is kept."""
    s = make_synth(7, lesion=False)
    spot = np.zeros_like(s.brain)
    spot[10:13, 30:35, 14:19] = True  # deep enough not to be an edge artefact
    twin = spot[:, :, ::-1]  # the brain is centred: its centroid is the array centre
    for region in (spot, twin):
        s.adc[region], s.dwi[region] = 450.0, 200.0
    r = segment_core(s.adc, s.dwi, s.brain, SPACING)
    assert not (r.mask & (spot | twin)).any()
    assert any("mirror-symmetric" in w for w in r.warnings)
    one = make_synth(7, lesion=False)
    one.adc[spot], one.dwi[spot] = 450.0, 200.0
    r1 = segment_core(one.adc, one.dwi, one.brain, SPACING)
    assert dice(r1.mask, spot) > 0.8


def test_dwi_evidence_scales_with_the_scan_noise() -> None:
    """A faint early core (DWI only ~1.3x normal) is found on a clean scan; on a noisy scan the
    seed level rises with the noise, so patches of low ADC in normal-brightness tissue are not
    made core by voxels that are bright by chance -- which fixed low levels would do."""
    clean = make_synth(8, noise=0.02, acute_dwi=135.0)
    r = segment_core(clean.adc, clean.dwi, clean.brain, SPACING)
    assert dice(r.mask, clean.acute) > 0.85
    fixed_high = CoreParams(dwi_ratio_seed=1.5, dwi_ratio_seed_cap=1.5)
    assert dice(segment_core(clean.adc, clean.dwi, clean.brain, SPACING, fixed_high).mask, clean.acute) < 0.5
    noisy = make_synth(9, lesion=False, noise=0.2)
    rng = np.random.default_rng(1)
    patches = np.zeros_like(noisy.brain)
    for z, y, x in zip(rng.integers(4, 32, 150), rng.integers(10, 86, 150), rng.integers(10, 70, 150), strict=True):
        patches[z : z + 2, y : y + 3, x : x + 3] = True
    patches &= noisy.brain & (noisy.adc < 1000)
    noisy.adc[patches] = 560.0
    assert patches.sum() > 1000
    assert segment_core(noisy.adc, noisy.dwi, noisy.brain, SPACING).mask.sum() == 0
    fixed_low = CoreParams(seed_sigmas=1, grow_sigmas=0.5, dwi_ratio_seed_cap=1.2, dwi_ratio_grow_cap=1.1)
    assert segment_core(noisy.adc, noisy.dwi, noisy.brain, SPACING, fixed_low).mask.sum() > 50


def test_a_large_core_whose_mirror_covers_a_speck_is_kept() -> None:
    """A noise speck at the mirror position of a large infarct is not its artefact twin: the infarct stays
    (the speck goes). Measured against the smaller of the two, the old screen dropped both (a 55 mL core
    on randomised phantom seed 270013)."""
    s = make_synth(7, lesion=False)
    lesion = np.zeros_like(s.brain)
    lesion[8:16, 24:40, 10:22] = True
    speck = np.zeros_like(s.brain)
    speck[11:13, 31:33, -16:-14] = True  # inside the lesion's mirror image, a few voxels
    assert (speck[:, :, ::-1] & lesion).sum() == speck.sum()
    for region in (lesion, speck):
        s.adc[region], s.dwi[region] = 450.0, 200.0
    r = segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(min_component_ml=0.0))
    assert dice(r.mask, lesion) > 0.8
    assert not (r.mask & speck).any()
    assert any("mirror-symmetric" in w for w in r.warnings)
