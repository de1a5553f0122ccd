"""Per-study confidence of a synthetic Tmax map: does the model know what it is doing on this study?

Issue 15: on inputs unlike its training data the demo model calls large false hypoperfusion (about
100 mL on healthy brains of another generator) with no sign of doubt in its output. The score below is
built only from what the service sees at run time, so a study where the map should not be trusted is
flagged before anyone reads a DEFUSE-3 call from it. Nine parts, each in [0, 1] (1 = nothing wrong):

``inputs``
    The study's input statistics after the model's own normalisation (percentiles of DWI and FLAIR
    over their brain median, ADC percentiles, the share of brain voxels at the clip limit; over
    normal-appearing brain, the core and two voxels around it left out), its
    resolution (in-plane and slice spacing), coverage (brain extent head-foot, brain volume) and how
    much of the in-plane field the brain fills, each compared with the same statistic over the
    model's training cases (``input_reference.json`` beside the weights, made by
    :func:`reference_from_folder`, ``synthperf reference``). A feature inside the training range
    [q01, q99] is at distance 0, outside it at (how far beyond) / (q99 - q01); the part is
    exp(-mean distance).
``uncertainty``
    The spread of the samples (the uncertainty map the sampler already makes): the mean SD in
    seconds over the voxels the model calls Tmax > 6 s and a ring of 3 voxels around them, where
    the call is decided. 1 up to ``sd_ok_s``, 0 from ``sd_bad_s``, linear in between.
``registration``
    FLAIR-to-DWI registration (when the pipeline registered one): FLAIR overlap with the DWI volume
    and whether the optimiser had to keep the scanner geometry or moved implausibly far.
``support``
    Hypoperfusion needs a cause the images show. Tmax > 6 s voxels farther than ``far_mm`` from any
    core voxel, in a hypoperfused region that does not reach a core (all of it when there is no core),
    count as unsupported unless the FLAIR shows hyperintense vessels (FVH: sulcal FLAIR
    voxels much brighter than the brain, more of them on the hypoperfused side than in the mirror
    image of that region). 1 up to ``unsupported_ok_ml`` of unsupported hypoperfusion, 0 from
    ``unsupported_bad_ml``.
``coverage``
    The infarct core lies inside the hypoperfused region: it is the tissue whose perfusion failed
    first. The share of core voxels (from ``coverage_min_ml`` of core) that the map calls Tmax > 6 s,
    its Tmax > 6 s region grown by one voxel (the core mask and the resampled map disagree at
    edges): 1 from ``covered_ok``, 0 at ``covered_bad`` and below. A map that leaves its core normal
    has missed the hypoperfusion that caused it - the under-call the other parts cannot see, since a
    missing region leaves no mark in the map. (A core that has reperfused after recanalisation is
    also uncovered, and rightly so; such a study is flagged too, which withholds a call, never a map.)
``anchor``
    The map needs a core to hang on. DWI and FLAIR show the infarct, not the perfusion: without a
    visible core the model has only FLAIR's vessel signs to go on, and a hypoperfusion with no core
    (a TIA-like or very early stroke) can be anything from nothing to a whole territory - on the
    phantom such studies were the model's largest misses (169 mL of truth called 9 mL). 1 from
    ``anchor_ok_ml`` of core, ``anchor_floor`` below it, which is under the threshold on its own: a
    study without a visible core gets its maps but no DEFUSE-3/EXTEND call, healthy brains included
    (their "no" is withheld too; it would rest on the same blind guess). A step, not a ramp: until
    2026-12-04 the part fell linearly to the floor, so a 0.2-0.9 mL core passed, and such studies
    were 6 of the 10 bad cases the score missed on the cross-family evaluations; on fresh held-out
    seeds (set D) the step raised the AUROC from 0.757 to 0.797 (cross-family) and 0.751 to 0.787
    (shipped weights).
``adc_noise``
    The core the map hangs on is ADC < 620 x 10^-6 mm^2/s, and a noisy ADC crosses that line in
    normal tissue: at DWI b0 SNR 14 (the lowest the phantom draws) two of seven healthy phantom brains
    got an 8 mL core of noise, the map then called 56 and 115 mL of Tmax > 6 s around it, and both were
    served a DEFUSE-3 "yes" with confidence 0.96-1.0 (docs/benchmarks.md, session 27). The ADC's
    voxel-to-voxel noise over normal-appearing brain (eroded by two voxels, away from CSF): the MAD of
    its residual from a 3 x 3 in-plane median, as an SD. 1 up to ``adc_noise_ok``, 0 from
    ``adc_noise_bad``; those two cases measured 148 and 160, the 40 randomised cases as drawn at most 117.
    Since the rule's noise support (session 28) those cores are gone at SNR 14 and the ramp moved from
    120-150 to 150-200: on the same cases at SNR 14, 22 calls served (21 right) instead of 8. At DWI b0
    SNR 10, below the drawn range, the part still withholds most calls (5 served, all right; 23 without
    it, 21 right): kept, because the network has never seen such a study. The estimator reads about
    0.93 of the true noise on the phantom and 0.85 on the one real scan where it could be measured
    (docs/benchmarks.md, "Noise support in the core rule").
``diffusion``
    The ADC < 620 convention is an isotropic ADC at b = 1000 s/mm^2: the b-value the DEFUSE-3 core was
    defined at and the only one the phantom makes. At a higher b the normal brain's ADC is lower (the
    signal is not mono-exponential): a real healthy volunteer's scanner ADC from b = 2500 (Siemens XA30
    in ../shared/realdata) got 371 mL of core from the rule. An ADC computed from one or two diffusion
    directions is not isotropic either: white-matter tracts across the gradient fall below 620 (107 mL
    on a real Philips single-direction b = 1000 scan). From the load stage's record: 1 while |b - 1000| is
    at most ``b_off_ok``, 0 from ``b_off_bad``, linear in between; and 0 when the ADC was computed from
    1 or 2 directions (a scanner ADC or trace is isotropic).
``symmetry``
    A stroke is one-sided. The share of the Tmax > 6 s region whose mirror image across the brain's
    midline is also Tmax > 6 s; on at least ``symmetry_min_ml`` of hypoperfusion, 1 up to a share of
    ``symmetric_ok``, 0 from ``symmetric_bad``.

The score is the product of the parts that could be computed (a part without its inputs - no
reference stored, no registration record - is left out and named in ``missing``). A product, because
each part describes a different way to fail and one failure is enough. A study whose score is below
``threshold`` (0.5) is "low confidence": its maps are still produced, but no DEFUSE-3 or EXTEND call
is given for it (worker/pipeline/confidence.py).

Arrays are numpy (z, y, x) on the DWI grid; ``lr_axis`` is the array axis that runs left-right
(2 for the usual axial grid). Pure numerics: no DICOM, no service code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from models.robust import robust_sd
from models.tmax_ddpm.preprocess import normalise_image

REFERENCE_FILE = "input_reference.json"
REFERENCE_VERSION = 2  # 2: intensity statistics over normal-appearing brain
QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


@dataclass(frozen=True)
class ConfidenceParams:
    """The constants of the score (module docstring). Defaults are the documented ones."""

    threshold: float = 0.5
    sd_ok_s: float = 1.5
    sd_bad_s: float = 3.5
    far_mm: float = 40.0
    unsupported_ok_ml: float = 15.0
    unsupported_bad_ml: float = 60.0
    fvh_bright: float = 1.6  # FLAIR over its brain median that counts as a bright vessel
    fvh_depth_mm: float = 12.0  # vessels lie in sulci: within this depth of the brain surface
    fvh_min_ml: float = 0.3  # bright sulcal volume on the hypoperfused side needed for a sign
    fvh_asymmetry_min: float = 1.5  # ... and at least this many times the mirror region's
    coverage_min_ml: float = 1.0
    covered_ok: float = 0.6  # share of the core inside Tmax > 6 s at and above which coverage is 1
    covered_bad: float = 0.2  # ... at and below which it is 0
    anchor_ok_ml: float = 1.0  # core volume from which the anchor part is 1 (a visible core)
    anchor_floor: float = 0.4  # the anchor part below that
    symmetry_min_ml: float = 10.0
    symmetric_ok: float = 0.25
    symmetric_bad: float = 0.6
    hypo_s: float = 6.0
    adc_noise_ok: float = 150.0  # ADC noise SD (10^-6 mm^2/s) up to which the ADC < 620 core is trusted
    adc_noise_bad: float = 200.0  # ... and from which it is not (120 and 150 before the rule's noise support)
    b_off_ok: float = 250.0  # |b - 1000| (s/mm^2) up to which the ADC < 620 convention holds
    b_off_bad: float = 500.0  # ... and from which it does not

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
        for lo, hi in (("sd_ok_s", "sd_bad_s"), ("unsupported_ok_ml", "unsupported_bad_ml"),
                       ("symmetric_ok", "symmetric_bad"), ("covered_bad", "covered_ok"),
                       ("adc_noise_ok", "adc_noise_bad"), ("b_off_ok", "b_off_bad")):
            if not 0 <= getattr(self, lo) < getattr(self, hi):
                raise ValueError(f"{lo} ({getattr(self, lo)}) must be >= 0 and below {hi} ({getattr(self, hi)})")
        if not 0 <= self.anchor_floor < self.threshold:
            raise ValueError(f"anchor_floor ({self.anchor_floor}) must be >= 0 and below threshold ({self.threshold})")
        for name in ("far_mm", "anchor_ok_ml", "fvh_bright", "fvh_depth_mm", "fvh_asymmetry_min", "hypo_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Confidence:
    """The score, whether it is low, each part, and the reasons a part fell."""

    score: float
    low: bool
    threshold: float
    parts: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ramp_down(value: float, ok: float, bad: float) -> float:
    """1 at or below ``ok``, 0 at or above ``bad``, linear between."""
    if not math.isfinite(value):
        return 0.0
    return float(np.clip((bad - value) / (bad - ok), 0.0, 1.0))


# ------------------------------------------------------------------------------------------ inputs


def normal_appearing(brain: np.ndarray, lesion: np.ndarray | None) -> np.ndarray:
    """The brain without ``lesion`` grown by two voxels (its own signal and its partial-volume rim left
    out), or the whole brain when there is no lesion or nothing would be left."""
    brain = np.asarray(brain, dtype=bool)
    if lesion is None or not np.asarray(lesion).any():
        return brain
    grown = ndi.binary_dilation(np.asarray(lesion, dtype=bool), ndi.generate_binary_structure(3, 1), iterations=2)
    normal = brain & ~grown
    return normal if normal.any() else brain


def input_features(
    dwi: np.ndarray, flair: np.ndarray | None, adc: np.ndarray | None, brain: np.ndarray,
    spacing_zyx: Sequence[float], lesion: np.ndarray | None = None,
) -> dict[str, float]:
    """Input statistics after the model's normalisation, resolution and coverage (one flat dict).

    Intensity statistics are taken over normal-appearing brain: ``lesion`` (the core), grown by two
    voxels, is left out. Otherwise the lesion itself reads as "unfamiliar input" - a large core lowers
    the ADC percentiles and raises the DWI ones - and large strokes, which the model handles best,
    would score lowest (seen on held-out phantom cases before this was added).
    """
    brain = np.asarray(brain) > 0
    if brain.ndim != 3 or not brain.any():
        raise ValueError("brain: needs a non-empty 3-D mask")
    sp = [float(s) for s in spacing_zyx]
    normal = normal_appearing(brain, None if lesion is None else np.asarray(lesion) > 0)
    f: dict[str, float] = {}
    for name, img in (("dwi", dwi), ("flair", flair)):
        if img is None:
            continue
        v = normalise_image(np.asarray(img), brain, name)[normal]
        for q in (5, 25, 75, 95):
            f[f"{name}_p{q:02d}"] = float(np.percentile(v, q))
        f[f"{name}_clipped"] = float(np.mean(v >= 3.999))
    if adc is not None:
        a = np.nan_to_num(np.asarray(adc, dtype=np.float32))[normal]
        for q in (5, 50, 95):
            f[f"adc_p{q:02d}"] = float(np.percentile(a, q))
    f["spacing_inplane_mm"] = float(np.sqrt(sp[1] * sp[2]))
    f["spacing_slice_mm"] = sp[0]
    zs = np.flatnonzero(brain.any(axis=(1, 2)))
    f["coverage_z_mm"] = float((zs.max() - zs.min() + 1) * sp[0])
    f["brain_ml"] = float(brain.sum()) * float(np.prod(sp)) / 1000.0
    ys = np.flatnonzero(brain.any(axis=(0, 2)))
    xs = np.flatnonzero(brain.any(axis=(0, 1)))
    side = max(brain.shape[1], brain.shape[2])  # the model pads the slice to a square of this side
    f["brain_fov_fraction"] = float(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)) / side
    return f


def reference_from_features(rows: Sequence[Mapping[str, float]], source: str = "") -> dict[str, Any]:
    """Training-range quantiles of each feature over ``rows`` (one dict per training case)."""
    if len(rows) < 5:
        raise ValueError(f"rows: need at least 5 training cases for a reference, got {len(rows)}")
    keys = sorted(set.intersection(*(set(r) for r in rows)))
    feats = {}
    for k in keys:
        vals = np.array([float(r[k]) for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        feats[k] = {f"q{int(round(q * 100)):02d}": float(np.quantile(vals, q)) for q in QUANTILES}
    return {"version": REFERENCE_VERSION, "cases": len(rows), "source": source, "features": feats}


def reference_from_folder(data_dir: str | Path, limit: int | None = None, progress: bool = False,
                          input_mask: str = "brain") -> dict[str, Any]:
    """The input reference of a training folder (``<case>/{dwi,flair,adc,brain}.nii.gz``), its statistics
    taken inside ``input_mask``: the mask the model was trained in (``train.input_mask``), which for
    "brain_served" is the one the service will compute them in."""
    from models.tmax_ddpm.data import list_cases, load_case

    cases = list_cases(data_dir, require=tuple(dict.fromkeys(("dwi", "brain", input_mask))))
    if limit:
        cases = cases[:limit]
    it: Any = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="input statistics", unit="case")
    rows = []
    for d in it:
        names = tuple(dict.fromkeys(("dwi", "flair", "adc", "brain", input_mask, "core")))
        c = load_case(d, tuple(n for n in names if (d / f"{n}.nii.gz").exists()))
        core = c.images["core"] > 0.5 if "core" in c.images else None
        rows.append(input_features(c.images["dwi"], c.images.get("flair"), c.images.get("adc"),
                                   c.images[input_mask] > 0, c.spacing_zyx, lesion=core))
    ref = reference_from_features(rows, source=str(data_dir))
    if input_mask != "brain":
        ref["input_mask"] = input_mask
    return ref


def load_reference(weights_dir: str | Path | None) -> dict[str, Any] | None:
    """The reference stored beside a model's weights, or None when it has none."""
    if not weights_dir:
        return None
    p = Path(weights_dir) / REFERENCE_FILE
    if not p.is_file():
        return None
    ref = json.loads(p.read_text())
    if ref.get("version") != REFERENCE_VERSION or not isinstance(ref.get("features"), dict):
        raise ValueError(f"{p}: not an input reference of version {REFERENCE_VERSION}; rebuild it with synthperf reference")
    return ref


def input_part(features: Mapping[str, float], reference: Mapping[str, Any]) -> tuple[float, list[str], dict[str, float]]:
    """(score, reasons, per-feature distance): how far the study lies outside the training range.

    A feature inside [q01, q99] of the training cases is at distance 0; outside, its distance is how
    far beyond the range it lies in units of the range (q99 - q01, floored for features that training
    never varied). The part is exp(-mean distance): one feature far out, or many a little, lower it
    smoothly, so studies stay ranked by how unfamiliar they are instead of all falling to 0 at once.
    """
    dist: dict[str, float] = {}
    reasons = []
    for k, q in reference["features"].items():
        if k not in features:
            continue
        v, lo, hi = float(features[k]), float(q["q01"]), float(q["q99"])
        span = max(hi - lo, 0.1 * max(abs(hi), abs(lo)), 0.01)  # a floor for features training never varied
        excess = lo - v if v < lo else v - hi if v > hi else 0.0
        dist[k] = excess / span if math.isfinite(v) else 10.0
    if not dist:
        return 1.0, [], {}
    mean = float(np.mean(list(dist.values())))
    for k in sorted(dist, key=dist.get, reverse=True)[:3]:
        if dist[k] > 0:
            q = reference["features"][k]
            reasons.append(f"{k} {features[k]:.3g} outside the training range {q['q01']:.3g}..{q['q99']:.3g}")
    return float(np.exp(-mean)), reasons, dist


# ------------------------------------------------------------------------------------- consistency


def _mirror(mask: np.ndarray, lr_axis: int, midline: float) -> np.ndarray:
    """``mask`` reflected across the plane ``index == midline`` along ``lr_axis``."""
    idx = np.nonzero(mask)
    out = np.zeros_like(mask, dtype=bool)
    m = list(idx)
    m[lr_axis] = np.rint(2 * midline - idx[lr_axis]).astype(np.intp)
    ok = (m[lr_axis] >= 0) & (m[lr_axis] < mask.shape[lr_axis])
    out[tuple(a[ok] for a in m)] = True
    return out


def _midline(brain: np.ndarray, lr_axis: int) -> float:
    profile = brain.sum(axis=tuple(a for a in range(3) if a != lr_axis)).astype(float)
    return float((profile * np.arange(profile.size)).sum() / profile.sum())


def fvh_sign(
    flair: np.ndarray | None, hypo: np.ndarray, brain: np.ndarray, spacing_zyx: Sequence[float], lr_axis: int,
    p: ConfidenceParams,
) -> tuple[bool, dict[str, float]]:
    """FLAIR vessel hyperintensity in the hypoperfused region: bright sulcal FLAIR voxels near it,
    more of them than in its mirror image (look-alikes - flow artefacts, bright sulci - are bilateral)."""
    if flair is None or not hypo.any():
        return False, {}
    sp = [float(s) for s in spacing_zyx]
    fl = normalise_image(np.asarray(flair), brain, "flair") + 1.0  # FLAIR over its brain median
    depth = ndi.distance_transform_edt(brain, sampling=sp)
    sulcal = brain & (depth <= p.fvh_depth_mm) & (fl >= p.fvh_bright)
    near = ndi.binary_dilation(hypo, ndi.generate_binary_structure(3, 1), iterations=2) & brain
    mid = _midline(brain, lr_axis)
    near_m = _mirror(near, lr_axis, mid) & ~near
    ml = float(np.prod(sp)) / 1000.0
    same, mirror = float((sulcal & near).sum()) * ml, float((sulcal & near_m).sum()) * ml
    # compare densities: the mirror region can be cut by the field of view
    dens_same = same / max(float(near.sum()) * ml, 1e-6)
    dens_mirror = mirror / max(float(near_m.sum()) * ml, 1e-6)
    sign = same >= p.fvh_min_ml and dens_same >= p.fvh_asymmetry_min * dens_mirror
    return bool(sign), {"fvh_ml": same, "fvh_mirror_ml": mirror}


def consistency_parts(
    tmax: np.ndarray, core: np.ndarray, brain: np.ndarray, flair: np.ndarray | None,
    spacing_zyx: Sequence[float], lr_axis: int = 2, p: ConfidenceParams | None = None,
) -> tuple[dict[str, float], dict[str, list[str]], dict[str, Any]]:
    """The ``support``, ``coverage`` and ``symmetry`` parts (module docstring) and each one's reasons
    (empty for a part at 1)."""
    p = p or ConfidenceParams()
    brain = np.asarray(brain) > 0
    core = (np.asarray(core) > 0) & brain
    hypo = brain & np.isfinite(tmax) & (np.asarray(tmax) > p.hypo_s)
    sp = [float(s) for s in spacing_zyx]
    ml = float(np.prod(sp)) / 1000.0
    hypo_ml = float(hypo.sum()) * ml
    core_ml = float(core.sum()) * ml
    details: dict[str, Any] = {"tmax6_ml": hypo_ml, "core_ml": core_ml}
    reasons: dict[str, list[str]] = {"support": [], "coverage": [], "symmetry": []}
    if core.any():
        # supported: near a core, or in a hypoperfused region that reaches a core (a territory downstream
        # of an occlusion is contiguous with its core, however far its cortex lies from it)
        dist = ndi.distance_transform_edt(~core, sampling=sp)
        lab, _ = ndi.label(hypo | core, structure=np.ones((3, 3, 3), bool))
        reaching = np.isin(lab, np.unique(lab[core]))
        far = hypo & (dist > p.far_mm) & ~reaching
    else:
        far = hypo
    far_ml = float(far.sum()) * ml
    sign, fvh = fvh_sign(flair, far, brain, sp, lr_axis, p) if far.any() else (False, {})
    unsupported = 0.0 if sign else far_ml
    support = _ramp_down(unsupported, p.unsupported_ok_ml, p.unsupported_bad_ml)
    details.update(far_from_core_ml=far_ml, fvh_sign=sign, unsupported_ml=unsupported, **fvh)
    if support < 1:
        reasons["support"].append(f"{unsupported:.0f} mL of Tmax>6 s lies more than {p.far_mm:.0f} mm from any core with no "
                       "FLAIR vessel sign")
    coverage = 1.0
    if core_ml >= p.coverage_min_ml:
        grown = ndi.binary_dilation(hypo, ndi.generate_binary_structure(3, 1))
        covered = float((core & grown).sum()) / float(core.sum())
        details["core_covered_share"] = covered
        coverage = _ramp_down(1.0 - covered, 1.0 - p.covered_ok, 1.0 - p.covered_bad)
        if coverage < 1:
            reasons["coverage"].append(f"only {covered:.0%} of the {core_ml:.1f} mL core lies in the Tmax>6 s region "
                                       "(the hypoperfusion that caused it looks missed)")
    sym_share = 0.0
    if hypo_ml >= p.symmetry_min_ml:
        mirrored = _mirror(hypo, lr_axis, _midline(brain, lr_axis))
        mirrored = ndi.binary_dilation(mirrored, ndi.generate_binary_structure(3, 1))
        sym_share = float((hypo & mirrored).sum()) / float(hypo.sum())
    symmetry = _ramp_down(sym_share, p.symmetric_ok, p.symmetric_bad)
    details["symmetric_share"] = sym_share
    if symmetry < 1:
        reasons["symmetry"].append(f"{sym_share:.0%} of the Tmax>6 s region is mirrored in the other hemisphere")
    return {"support": support, "coverage": coverage, "symmetry": symmetry}, reasons, details


def anchor_part(core_ml: float, p: ConfidenceParams | None = None) -> tuple[float, list[str]]:
    """How much core the map can hang on (module docstring): 1 from ``anchor_ok_ml``, ``anchor_floor``
    below it."""
    p = p or ConfidenceParams()
    if float(core_ml) >= p.anchor_ok_ml:
        return 1.0, []
    return p.anchor_floor, [f"core {core_ml:.1f} mL (< {p.anchor_ok_ml:g} mL): without a visible core the "
                            "synthetic Tmax rests on FLAIR alone"]


def adc_noise(adc: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None = None) -> float:
    """Robust SD of the ADC's voxel-to-voxel noise over normal-appearing brain (``adc``'s units).

    The residual from a 3 x 3 in-plane median holds the noise and little anatomy once the brain is eroded
    by two voxels (CSF edges left out); its MAD, scaled to an SD, ignores the lesion's and the vessels'
    outliers. NaN when fewer than 100 voxels are left."""
    region = ndi.binary_erosion(normal_appearing(brain, lesion), iterations=2)
    if region.sum() < 100:
        return float("nan")
    adc = np.asarray(adc, dtype=np.float32)
    res = (adc - ndi.median_filter(adc, size=(1, 3, 3)))[region]
    return robust_sd(res)


def adc_noise_part(adc: np.ndarray, brain: np.ndarray, core: np.ndarray | None,
                   p: ConfidenceParams | None = None) -> tuple[float, list[str], dict[str, float]]:
    """Whether the ADC is clean enough for the ADC < 620 core (module docstring)."""
    p = p or ConfidenceParams()
    sigma = adc_noise(adc, brain, core)
    if not math.isfinite(sigma):
        return 1.0, [], {}
    s = _ramp_down(sigma, p.adc_noise_ok, p.adc_noise_bad)
    reasons = [f"ADC noise SD {sigma:.0f} x 10^-6 mm2/s: at this noise the ADC < 620 rule calls noise "
               "as core"] if s < 1 else []
    return s, reasons, {"adc_noise": round(sigma, 1)}


def diffusion_part(diffusion: Mapping[str, Any], p: ConfidenceParams | None = None) -> tuple[float, list[str]]:
    """Whether the ADC is one the ADC < 620 core convention applies to (module docstring).

    ``diffusion``: the load stage's record (load.json): ``b_high`` (s/mm^2), ``dwi_directions`` (combined
    into the DWI; 0 = trace or unknown) and ``adc_computed`` (the ADC came from the DWI, not from a
    scanner ADC series). The load stage's job warnings are these reasons too."""
    p = p or ConfidenceParams()
    b = float(diffusion.get("b_high") or 0.0)
    s, reasons = 1.0, []
    if b > 0:
        s = _ramp_down(abs(b - 1000.0), p.b_off_ok, p.b_off_bad)
        if s < 1:
            reasons.append(f"DWI b = {b:g} s/mm2: the ADC < 620 core convention holds at b = 1000; at this b "
                           "the core volume is not comparable")
    n = int(diffusion.get("dwi_directions") or 0)
    if diffusion.get("adc_computed") and 1 <= n <= 2:
        s = 0.0
        reasons.append(f"ADC computed from {n} diffusion direction{'s' if n > 1 else ''}, not a trace: white "
                       "matter across the gradient reads as core")
    return s, reasons


def uncertainty_part(tmax: np.ndarray, sd: np.ndarray, brain: np.ndarray,
                     p: ConfidenceParams | None = None) -> tuple[float, list[str], dict[str, float]]:
    """Mean sample SD (s) where the Tmax > 6 s call is decided (the call and a 3-voxel ring)."""
    p = p or ConfidenceParams()
    brain = np.asarray(brain) > 0
    hypo = brain & (np.asarray(tmax) > p.hypo_s)
    if not hypo.any():
        return 1.0, [], {"sd_at_call_s": 0.0}
    region = ndi.binary_dilation(hypo, ndi.generate_binary_structure(3, 1), iterations=3) & brain
    v = float(np.mean(np.asarray(sd)[region]))
    s = _ramp_down(v, p.sd_ok_s, p.sd_bad_s)
    return s, ([f"sample spread {v:.1f} s where Tmax>6 s is decided"] if s < 1 else []), {"sd_at_call_s": v}


def registration_part(reg: Mapping[str, Any] | None) -> tuple[float | None, list[str]]:
    """From the load stage's registration record; None when there is none (no FLAIR registration)."""
    if not reg or "flair_overlap_fraction" not in reg:
        return None, []
    reasons = []
    overlap = float(reg.get("flair_overlap_fraction") or 0.0)
    s = float(np.clip((overlap - 0.5) / 0.4, 0.0, 1.0))  # 1 from 90 % overlap, 0 at 50 %
    if s < 1:
        reasons.append(f"FLAIR covers {overlap:.0%} of the DWI volume")
    if float(reg.get("rotation_deg") or 0.0) > 15 or float(reg.get("translation_mm") or 0.0) > 30:
        s *= 0.5
        reasons.append("FLAIR registration moved implausibly far")
    return s, reasons


# ------------------------------------------------------------------------------------------- score


def assess(
    tmax: np.ndarray, sd: np.ndarray, core: np.ndarray, brain: np.ndarray, spacing_zyx: Sequence[float], *,
    dwi: np.ndarray, flair: np.ndarray | None = None, adc: np.ndarray | None = None,
    reference: Mapping[str, Any] | None = None, registration: Mapping[str, Any] | None = None,
    diffusion: Mapping[str, Any] | None = None, lr_axis: int = 2, params: ConfidenceParams | None = None,
) -> Confidence:
    """The per-study confidence (module docstring). Reasons come weakest part first."""
    p = params or ConfidenceParams()
    parts: dict[str, float] = {}
    why: list[tuple[float, list[str]]] = []  # (part score, its reasons)
    missing: list[str] = []
    details: dict[str, Any] = {}
    if reference is not None:
        feats = input_features(dwi, flair, adc, brain, spacing_zyx, lesion=core)
        parts["inputs"], r, per = input_part(feats, reference)
        why.append((parts["inputs"], r))
        details["input_distance"] = {k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:3]}
    else:
        missing.append("inputs (no input_reference.json stored with the model)")
    parts["uncertainty"], r, d = uncertainty_part(tmax, sd, brain, p)
    why.append((parts["uncertainty"], r))
    details.update(d)
    reg, r = registration_part(registration)
    if reg is None:
        missing.append("registration (no FLAIR registration record)")
    else:
        parts["registration"] = reg
        why.append((reg, r))
    cons, by_part, d = consistency_parts(tmax, core, brain, flair, spacing_zyx, lr_axis, p)
    parts.update(cons)
    why.extend((cons[name], texts) for name, texts in by_part.items())
    details.update(d)
    parts["anchor"], r = anchor_part(d["core_ml"], p)
    why.append((parts["anchor"], r))
    if adc is None:
        missing.append("adc_noise (no ADC)")
    else:
        parts["adc_noise"], r, d = adc_noise_part(adc, brain, core, p)
        why.append((parts["adc_noise"], r))
        details.update(d)
    if diffusion is None:
        missing.append("diffusion (no b-value record)")
    else:
        parts["diffusion"], r = diffusion_part(diffusion, p)
        why.append((parts["diffusion"], r))
    score = float(np.prod(list(parts.values()))) if parts else 0.0
    reasons = [t for _, texts in sorted(why, key=lambda w: w[0]) for t in texts]
    return Confidence(score=score, low=score < p.threshold, threshold=p.threshold,
                      parts={k: round(v, 4) for k, v in parts.items()}, reasons=reasons, missing=missing,
                      details=details)


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` class, ties counted as one half.

    The Mann-Whitney form: the probability that a random positive case scores higher than a random
    negative one. None when either class is empty. (For confidence against "bad", pass ``-confidence``
    or ``1 - confidence``: low confidence should predict a bad case.)
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and positive must be 1-D of one length, got {s.shape} and {y.shape}")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))
