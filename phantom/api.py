"""Public phantom API: make a case from a seed, write it for training, as DICOM, or its truth.

Everything random derives from ``seed`` through ``numpy.random.SeedSequence`` sub-streams, so the
same seed gives bit-identical arrays and files. Phantom data is not patient data.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phantom import signal
from phantom.anatomy import TERRITORY_NAMES
from phantom.geometry import Grid, RigidPose, centred_grid, rotation_matrix
from phantom.render import HeadModel

#: 1.1 added the template family and domain randomisation; geometric unrandomised arrays equal 1.0's.
#: 1.2 draws the penumbral cue's strength per randomised case (phantom.randomise.penumbral_scale_draw):
#: randomised cases differ from 1.1's only in b0, DWI and ADC of hypoperfused tissue; unrandomised equal
#: 1.3 draws a mixed set's randomised DSC acquisition from its own stream (dsc_acquisition_rng); only
#: ``--family mixed --randomise --with-dsc`` cases differ from 1.2's, and in them only the DSC series
PHANTOM_VERSION = "1.3"
VENDORS = ("siemens", "ge", "philips")
FAMILIES = ("geometric", "template")

# Per-acquisition scanner-like scales (signal of white matter ~ these values).
_DWI_SCALE = 1100.0
_FLAIR_SCALE = 900.0
_T1_SCALE = 800.0


def case_id_for(seed: int) -> str:
    return f"case_{seed:06d}"


def family_for(seed: int, family: str) -> str:
    """The anatomy family of case ``seed``: ``family`` itself, or for ``"mixed"`` a seed-derived 50/50 pick."""
    if family in FAMILIES:
        return family
    if family != "mixed":
        raise ValueError(f"family must be one of {FAMILIES + ('mixed',)}, got {family!r}")
    return "template" if np.random.default_rng(np.random.SeedSequence([int(seed), 8200])).random() < 0.5 \
        else "geometric"


def dsc_acquisition_rng(seed: int, family: str) -> np.random.Generator:
    """The stream a randomised DSC acquisition is drawn from: ``[seed, 8200]``, or ``[seed, 8201]`` in
    a ``"mixed"`` set, whose pick of family (``family_for``) already reads ``[seed, 8200]``; sharing it
    made the family decide the TR (template under 1.4 s, geometric above; phantom 1.2 and before).
    Single-family sets keep the stream, so their DSC studies stay what they were."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 8201 if family == "mixed" else 8200]))


@dataclass
class PhantomCase:
    """One synthetic stroke study. Arrays are (z, y, x) on the DWI grid unless named otherwise.

    Units: b0/dwi/flair arbitrary scanner units; adc 1e-6 mm2/s; tmax seconds; masks bool;
    territory uint8 (see ``TERRITORY_NAMES``). ``flair`` (own grid) is rendered on first access.
    """

    seed: int
    case_id: str
    vendor: str
    matrix: int
    grid: Grid
    b0: np.ndarray
    dwi: np.ndarray
    adc: np.ndarray
    flair_on_dwi: np.ndarray
    tmax: np.ndarray
    core: np.ndarray
    brain: np.ndarray
    territory: np.ndarray
    fvh: np.ndarray
    flair_grid: Grid
    flair_motion: dict[str, Any]
    truth: dict[str, Any]
    tissue: np.ndarray | None = None  # uint8 tissue class per voxel (phantom.anatomy codes)
    confounders: np.ndarray | None = None  # uint8: 1 WMH, 2 old-infarct gliotic rim, 3 old cavity
    dsc: np.ndarray | None = None  # (t, z, y, x) on the DWI grid, scanner units
    dsc_times_s: np.ndarray | None = None
    acquisition: dict[str, Any] = field(default_factory=dict)
    _lazy: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    # geometry conveniences -------------------------------------------------------------------
    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.grid.spacing

    @property
    def direction(self) -> np.ndarray:
        """LPS directions of the x, y, z index axes as columns (SimpleITK GetDirection, reshaped)."""
        return self.grid.direction

    @property
    def origin(self) -> np.ndarray:
        """LPS position of voxel (0, 0, 0) in mm (SimpleITK GetOrigin)."""
        return self.grid.origin

    @property
    def affine(self) -> np.ndarray:
        """NIfTI (RAS) affine for the arrays transposed to (x, y, z)."""
        return self.grid.affine_ras()

    # lazily rendered series (DICOM path only) ---------------------------------------------------
    @property
    def flair(self) -> np.ndarray:
        """FLAIR on its own grid (``flair_grid``), head moved by ``flair_motion``."""
        if "flair" not in self._lazy:
            self._lazy["flair"] = self._lazy["render_flair"]()
        return self._lazy["flair"]

    def render_extra(self, grid: Grid, kind: str) -> np.ndarray:
        """Render a distractor contrast (``"t1"`` or ``"localizer"``) on any grid, head as for DWI."""
        return self._lazy["render_extra"](grid, kind)

    def territory_name(self, label: int) -> str:
        return TERRITORY_NAMES[int(label)]


def _dwi_grid(rng: np.random.Generator, matrix: int) -> tuple[Grid, dict]:
    fov = float(round(rng.uniform(220, 240)))
    thick = float(rng.choice([4.0, 5.0, 5.0, 6.0]))
    gap = float(rng.choice({4.0: [1.0, 1.2], 5.0: [0.0, 0.5, 1.0], 6.0: [0.0, 0.5]}[thick]))
    step = thick + gap
    nz = int(np.clip(round(140.0 / step), 20, 30))
    centre = np.array([rng.uniform(-6, 6), rng.uniform(-8, 8), rng.uniform(-8, 2)])
    px = fov / matrix
    g = centred_grid((nz, matrix, matrix), (step, px, px), centre=centre)
    return g, {"fov_mm": fov, "slice_thickness_mm": thick, "slice_gap_mm": gap}


def _dwi_grid_randomised(acq: dict, matrix: int) -> tuple[Grid, dict]:
    """DWI grid from domain-randomised acquisition draws: thickness, gap, FOV, coverage and cropping."""
    thick = round(acq["slice_thickness_mm"], 1)
    gap = round(acq["slice_gap_mm"], 1)
    nz = int(np.clip(round(acq["coverage_mm"] / (thick + gap)), 12, 40))
    fov = float(round(acq["fov_mm"]))
    g = centred_grid((nz, matrix, matrix), (thick + gap, fov / matrix, fov / matrix),
                     centre=np.asarray(acq["centre_shift_mm"], dtype=float))
    return g, {"fov_mm": fov, "slice_thickness_mm": thick, "slice_gap_mm": gap}


def _flair_grid(rng: np.random.Generator, matrix: int, dwi_centre: np.ndarray) -> tuple[Grid, dict]:
    m = 2 * matrix if matrix <= 128 else matrix
    fov = float(round(rng.uniform(220, 240)))
    thick = float(rng.choice([5.0, 5.0, 4.0]))
    gap = float(rng.choice([0.5, 1.0, 1.5]))
    step = thick + gap
    nz = int(np.clip(round(145.0 / step), 20, 32))
    oblique = rotation_matrix((rng.uniform(-8, 8), 0.0, rng.uniform(-2, 2)))
    centre = dwi_centre + np.array([rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-4, 4)])
    g = centred_grid((nz, m, m), (step, fov / m, fov / m), direction=oblique, centre=centre)
    return g, {"fov_mm": fov, "slice_thickness_mm": thick, "slice_gap_mm": gap}


def _volumes(tmax: np.ndarray, core: np.ndarray, brain: np.ndarray, grid: Grid) -> dict[str, Any]:
    ml = grid.voxel_volume_mm3 / 1000.0
    core_ml = float(core.sum()) * ml
    t6 = float(((tmax > 6.0) & brain).sum()) * ml
    t10 = float(((tmax > 10.0) & brain).sum()) * ml
    ratio = t6 / core_ml if core_ml > 0 else None
    mismatch = t6 - core_ml
    return {
        "core_ml": round(core_ml, 3),
        "tmax6_ml": round(t6, 3),
        "tmax10_ml": round(t10, 3),
        "mismatch_ml": round(mismatch, 3),
        "mismatch_ratio": None if ratio is None else round(ratio, 4),
        "hir": None if t6 == 0 else round(t10 / t6, 4),
        "defuse3_target_mismatch": bool(core_ml < 70 and ratio is not None and ratio >= 1.8 and mismatch >= 15),
        "voxel_volume_ml": ml,
    }


def check_pins(randomise: bool, penumbral_scale: float | None = None, grey_contrast: float | None = None,
               grey_contrast_in: str = "both", acquisition: dict[str, float] | None = None,
               texture: float | None = None) -> None:
    """Raise ValueError naming the bad argument unless each pin is None, or within its range with randomise.

    Each pins a property that randomisation draws (or that a stress test overrides), so each needs it;
    ``grey_contrast_in`` other than "both" needs ``grey_contrast``.
    """
    if acquisition is not None:
        from phantom.randomise import check_acquisition_pins

        if not randomise:
            raise ValueError(f"acquisition: needs randomise, got {acquisition!r}")
        check_acquisition_pins(acquisition)
    from phantom.randomise import GREY_CONTRAST_IN, TEXTURE_MAX_PCT

    for name, value, lo, hi in (("penumbral_scale", penumbral_scale, 0.0, 3.0),
                                ("grey_contrast", grey_contrast, 0.25, 4.0), ("texture", texture, 0.0, TEXTURE_MAX_PCT)):
        if value is not None and (not randomise or not lo <= float(value) <= hi):
            raise ValueError(f"{name}: needs randomise and a value in {lo:g}..{hi:g}, got {value!r}")

    if grey_contrast_in not in GREY_CONTRAST_IN or (grey_contrast_in != "both" and grey_contrast is None):
        raise ValueError(f"grey_contrast_in: needs grey_contrast and one of {sorted(GREY_CONTRAST_IN)}, "
                         f"got {grey_contrast_in!r}")


def make_case(seed: int, matrix: int = 128, with_dsc: bool = False, *,
              scenario: dict[str, Any] | None = None, family: str = "geometric",
              randomise: bool = False, dsc_acquisition: Any = None,
              penumbral_scale: float | None = None, grey_contrast: float | None = None,
              grey_contrast_in: str = "both", acquisition: dict[str, float] | None = None,
              texture: float | None = None) -> PhantomCase:
    """Generate one phantom case deterministically from ``seed``.

    ``matrix`` is the DWI in-plane matrix (128 or 256 typical; 32..512 accepted). With ``with_dsc``
    a DSC-PWI series consistent with the Tmax truth is simulated on the DWI grid. ``scenario``
    optionally pins stroke parameters (keys: occlusion, side, collaterals, onset_h) while the rest
    of the case still follows the seed - for demos and for tests that vary one factor.

    ``family``: ``"geometric"`` (analytic head, the v1.0 phantom), ``"template"`` (the MNI ICBM152
    brain warped per case, phantom.template) or ``"mixed"`` (seed-derived pick). ``randomise`` turns
    on domain randomisation (phantom.randomise) and the balanced case mix; without it and with the
    geometric family every array equals the v1.0 phantom's. ``dsc_acquisition`` (a
    ``phantom.dsc.DscAcquisition``) pins how the DSC series is acquired; by default it is the fixed
    v1.0 acquisition, or with ``randomise`` a draw of TR, TE, length, SNR and bolus arrival.
    ``penumbral_scale`` (with ``randomise`` only) pins the strength of the penumbral ADC decline and its
    DWI rise instead of drawing it: 0 removes that cue, 1 is the unrandomised phantom's; every other draw
    of the case stays as it was, so a set made with 0 tests what a model takes from that cue alone.
    ``grey_contrast`` (with ``randomise`` only) scales the grey-minus-white signal of b0 and FLAIR over the
    drawn one (``DomainParams.stretch_grey_contrast``): at K = 3 a median case's FLAIR grey/white ratio
    (1.33 as drawn) is beyond the largest the draws give (1.92). ``grey_contrast_in`` ("both", "dwi" or
    "flair") stretches one sequence alone. ``acquisition`` (with ``randomise`` only) pins acquisition
    draws, e.g. ``{"dwi_bias": 0.8}`` (``phantom.randomise.ACQ_PINNABLE``), the rest of the case as drawn.
    """
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    check_pins(randomise, penumbral_scale, grey_contrast, grey_contrast_in, acquisition, texture)
    if not isinstance(matrix, int | np.integer) or not 32 <= matrix <= 512:
        raise ValueError(f"matrix must be an int in 32..512 (128 or 256 typical), got {matrix!r}")
    streams = np.random.SeedSequence(int(seed)).spawn(10)
    r = [np.random.default_rng(s) for s in streams]
    r_anat, r_fields, r_stroke, r_lesion, r_geom, r_dwi, r_flair, r_dsc, r_vendor, r_extra = r

    fam = family_for(int(seed), family)
    dr = None
    if randomise:
        from phantom.randomise import DomainParams, case_scenario

        dr = DomainParams.sample(int(seed))
        if penumbral_scale is not None:
            dr.penumbral_scale = float(penumbral_scale)
        if grey_contrast is not None:
            dr.stretch_grey_contrast(float(grey_contrast), grey_contrast_in)
        if acquisition is not None:
            dr.pin_acquisition(acquisition)
        if texture is not None:
            dr.add_texture(float(texture))
        mix = case_scenario(int(seed))
        scenario = mix if scenario is None else {"case_type": "pinned", **scenario}
    if fam == "template":
        from phantom.template import TemplateHead

        head = TemplateHead(r_anat, r_fields, r_stroke, r_lesion, scenario=scenario, dr=dr)
    else:
        head = HeadModel(r_anat, r_fields, r_stroke, r_lesion, scenario=scenario, dr=dr)
    vendor = str(r_vendor.choice(VENDORS))
    pose = RigidPose(rotation_matrix(head.anat.tilt_deg), head.anat.shift_mm.astype(float))
    grid, dwi_acq = _dwi_grid(r_geom, int(matrix))
    if dr is not None:
        grid, dwi_acq = _dwi_grid_randomised(dr.acq, int(matrix))
    flair_grid, flair_acq = _flair_grid(r_geom, int(matrix), np.asarray(grid.origin) +
                                        grid.direction @ (np.array(grid.shape[::-1]) - 1) / 2 *
                                        np.array(grid.spacing[::-1]))
    # patient motion between DWI and FLAIR: p_flair = R (p_dwi - c) + c + t
    mot_deg = r_geom.uniform(-3.0, 3.0, size=3)
    mot_t = r_geom.uniform(-4.0, 4.0, size=3)
    mot_r = rotation_matrix(mot_deg)
    c = pose.translation.copy()
    flair_pose = pose.then(mot_r, c - mot_r @ c + mot_t)
    m44 = np.eye(4)
    m44[:3, :3] = mot_r
    m44[:3, 3] = c - mot_r @ c + mot_t
    motion = {
        "convention": "p_flair = R (p_dwi - center) + center + translation (LPS mm); "
        "R = Rz Ry Rx (SimpleITK Euler3DTransform with SetComputeZYX(True)); "
        "this is the fixed=DWI -> moving=FLAIR transform of a SimpleITK registration",
        "rotation_deg_xyz": mot_deg.round(6).tolist(),
        "translation_mm": mot_t.round(6).tolist(),
        "center_lps": c.round(6).tolist(),
        "matrix_dwi_to_flair_world": m44.round(9).tolist(),
    }

    dwi_snr = float(r_dwi.uniform(45, 70))  # trace image: 3 directions, averaged
    flair_snr = float(r_flair.uniform(30, 50))
    if dr is None:
        m = head.render(grid, pose)
        dwi_bias = signal.bias_field(r_dwi, grid.shape, float(r_dwi.uniform(0.05, 0.18)))
        psf = 0.45 * (128.0 / matrix) ** 0.5
        d = signal.acquire_dwi(r_dwi, m["s0"], m["adc"], dwi_snr, dwi_bias, psf, _DWI_SCALE)
        fl_bias_dwi = signal.bias_field(r_flair, grid.shape, float(r_flair.uniform(0.05, 0.18)))
        flair_on_dwi = signal.acquire(r_flair, m["flair"], flair_snr, fl_bias_dwi, psf, _FLAIR_SCALE, 0.42)
    else:
        from phantom.randomise import render_partial_volume

        a = dr.acq
        dwi_snr, flair_snr = a["dwi_snr"], a["flair_snr"]
        m = render_partial_volume(head, grid, pose, a["partial_volume_samples"], dwi_acq["slice_thickness_mm"])
        psf, flair_psf = a["dwi_psf"] * (128.0 / matrix) ** 0.5, a["flair_psf"] * (128.0 / matrix) ** 0.5
        m = dr.textured(dr.textured(m, 0, ("s0", "adc"), psf), 1, ("flair",), flair_psf)
        d = signal.acquire_dwi(r_dwi, m["s0"], m["adc"], dwi_snr, signal.bias_field(r_dwi, grid.shape, a["dwi_bias"]),
                               psf, a["dwi_scale"], noise=dr.noise)
        flair_on_dwi = signal.acquire(r_flair, m["flair"] ** a["flair_gamma"], flair_snr,
                                      signal.bias_field(r_flair, grid.shape, a["flair_bias"]),
                                      flair_psf, a["flair_scale"], 0.42, noise=dr.noise)

    s = head.stroke
    truth: dict[str, Any] = {
        "case_id": case_id_for(int(seed)),
        "seed": int(seed),
        "vendor": vendor,
        "synthetic": True,
        "note": "SYNTHETIC PHANTOM - not patient data - NOT FOR DIAGNOSTIC USE",
        "phantom_version": PHANTOM_VERSION,
        "matrix": int(matrix),
        "family": fam,
        "randomised": dr is not None,
    }
    truth.update(_volumes(m["tmax"], m["core"], m["brain"], grid))
    truth.update(s.to_dict())
    truth["flair_core_ratio"] = round(signal.flair_core_ratio(s.onset_h), 4)
    truth["fvh_voxels"] = int(m["fvh"].sum())
    truth["anatomy"] = head.anat.to_dict()
    if dr is not None:
        truth["domain"] = dr.to_dict()
    if fam == "template":
        truth["template"] = {**head.atlas.source, "warp_mm": round(head.warp_mm, 3),
                             "fine_warp_mm": round(head.fine_mm, 3)}
    truth["dwi_grid"] = grid.to_dict()
    truth["flair_grid"] = flair_grid.to_dict()
    truth["flair_motion"] = motion
    truth["acquisition"] = {"dwi": {**dwi_acq, "snr_b0_wm": round(dwi_snr, 2)},
                            "flair": {**flair_acq, "snr_wm": round(flair_snr, 2)}}

    case = PhantomCase(
        seed=int(seed), case_id=case_id_for(int(seed)), vendor=vendor, matrix=int(matrix), grid=grid,
        b0=d["b0"], dwi=d["dwi"], adc=d["adc"], flair_on_dwi=flair_on_dwi, tmax=m["tmax"],
        core=m["core"], brain=m["brain"], territory=m["territory"], fvh=m["fvh"],
        flair_grid=flair_grid, flair_motion=motion, truth=truth, tissue=m["cls"],
        confounders=m["confounders"],
        acquisition={"dwi": dwi_acq, "flair": flair_acq, "dwi_snr": dwi_snr, "flair_snr": flair_snr},
    )

    def render_flair() -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7001]))
        if dr is None:
            mf = head.render(flair_grid, flair_pose)
            bias = signal.bias_field(rng, flair_grid.shape, 0.12)
            psf_f = 0.45 * (256.0 / flair_grid.shape[2]) ** 0.5
            out = signal.acquire(rng, mf["flair"], flair_snr, bias, psf_f, _FLAIR_SCALE, 0.42)
        else:
            from phantom.randomise import render_partial_volume

            a = dr.acq
            psf_f = a["flair_psf"] * (256.0 / flair_grid.shape[2]) ** 0.5
            mf = dr.textured(render_partial_volume(head, flair_grid, flair_pose, a["partial_volume_samples"],
                                                   flair_acq["slice_thickness_mm"]), 2, ("flair",), psf_f)
            out = signal.acquire(rng, mf["flair"] ** a["flair_gamma"], flair_snr,
                                 signal.bias_field(rng, flair_grid.shape, a["flair_bias"]),
                                 psf_f, a["flair_scale"], 0.42, noise=dr.noise)
        case._lazy["flair_truth"] = {"tmax": mf["tmax"], "core": mf["core"], "fvh": mf["fvh"]}
        return out

    def render_extra(g: Grid, kind: str) -> np.ndarray:
        # crc32, not hash(): str hashes change from process to process (PYTHONHASHSEED)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7002, zlib.crc32(kind.encode()) % 1000]))
        mx = head.render(g, pose)
        rel = mx["t1"] if kind == "t1" else 0.85 * mx["t1"] + 0.15 * mx["s0"]
        return signal.acquire(rng, rel, 40.0, np.ones(g.shape, np.float32), 0.4, _T1_SCALE, 0.7)

    case._lazy["render_flair"] = render_flair
    case._lazy["render_extra"] = render_extra

    if with_dsc:
        from phantom.dsc import DscAcquisition, simulate_dsc

        acq = dsc_acquisition
        if acq is None and randomise:  # its own stream: the case's other draws stay as they were
            acq = DscAcquisition.sample(dsc_acquisition_rng(int(seed), family))
        dsc, times, dsc_info = simulate_dsc(r_dsc, m, grid, acq)
        case.dsc, case.dsc_times_s = dsc, times
        truth["acquisition"]["dsc"] = dsc_info
    return case


def _nifti(arr: np.ndarray, grid: Grid, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr.transpose(2, 1, 0)), grid.affine_ras())
    img.header.set_qform(grid.affine_ras(), code=1)
    img.header.set_sform(grid.affine_ras(), code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_truth(case: PhantomCase, out_dir: str | Path) -> Path:
    """Truth on the DWI grid: tmax, core, brain, territory, fvh NIfTI and truth.json in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _nifti(case.tmax.astype(np.float32), case.grid, out / "tmax.nii.gz")
    _nifti(case.core.astype(np.uint8), case.grid, out / "core.nii.gz")
    _nifti(case.brain.astype(np.uint8), case.grid, out / "brain.nii.gz")
    _nifti(case.territory.astype(np.uint8), case.grid, out / "territory.nii.gz")
    _nifti(case.fvh.astype(np.uint8), case.grid, out / "fvh.nii.gz")
    path = out / "truth.json"
    path.write_text(json.dumps(case.truth, indent=2, sort_keys=True) + "\n")
    return path


def write_training_case(case: PhantomCase, out_dir: str | Path) -> Path:
    """The training layout ``<out_dir>/<case_id>/{dwi,b0,adc,flair,core,tmax,brain,territory}.nii.gz``
    plus ``truth.json`` (and ``dsc.nii.gz`` when simulated). Returns the case directory."""
    d = Path(out_dir) / case.case_id
    d.mkdir(parents=True, exist_ok=True)
    _nifti(case.dwi.astype(np.float32), case.grid, d / "dwi.nii.gz")
    _nifti(case.b0.astype(np.float32), case.grid, d / "b0.nii.gz")
    _nifti(case.adc.astype(np.float32), case.grid, d / "adc.nii.gz")
    _nifti(case.flair_on_dwi.astype(np.float32), case.grid, d / "flair.nii.gz")
    write_truth(case, d)
    if case.dsc is not None:
        import nibabel as nib

        arr = np.ascontiguousarray(case.dsc.transpose(3, 2, 1, 0)).astype(np.float32)
        img = nib.Nifti1Image(arr, case.grid.affine_ras())
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = float(case.dsc_times_s[1] - case.dsc_times_s[0])
        nib.save(img, str(d / "dsc.nii.gz"))
    return d


def write_dicom_study(case: PhantomCase, out_dir: str | Path, vendor: str,
                      enhanced: bool | None = None, split_b: bool | None = None) -> Path:
    """Write the case as a DICOM study in ``vendor``'s header style. Returns the study directory.

    ``enhanced``/``split_b`` default to a seed-derived choice (so a mixed cohort covers all forms).
    """
    from phantom.dicom.study import write_study

    if vendor not in VENDORS:
        raise ValueError(f"vendor must be one of {VENDORS}, got {vendor!r}")
    return write_study(case, Path(out_dir), vendor, enhanced=enhanced, split_b=split_b)
