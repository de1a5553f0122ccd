"""Head anatomy as analytic shapes in a head frame (mm; x = patient left, y = posterior, z = superior).

The cerebrum is a deformed ellipsoid with a flattened base; a cortical grey-matter ribbon follows the
surface and lines sulci cut by the zero set of a smooth random field; ventricles, basal ganglia and
thalami are ellipsoids; a cerebellum and brainstem close the posterior fossa; CSF, skull (with
diploe) and scalp wrap it. Everything is evaluated point-wise, so any grid can be rendered sharply.
Per-case variation enters through :class:`AnatomyParams` and the random fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom.fields import smooth_noise

# Tissue classes (uint8 codes shared by the signal model).
AIR, SCALP, SKULL, MARROW, CSF, GM, WM, DEEP_GM, OTHER, EYE = range(10)

# Territory labels (issue 4 contract): odd = left, even = right.
TERRITORY_NAMES = {
    0: "none",
    1: "L-ACA",
    2: "R-ACA",
    3: "L-MCA-deep",
    4: "R-MCA-deep",
    5: "L-MCA-superficial",
    6: "R-MCA-superficial",
    7: "L-PCA",
    8: "R-PCA",
}


@dataclass
class AnatomyParams:
    """Per-case anatomy: brain size and shape, atrophy, tilt, confounders."""

    axes: np.ndarray  # cerebrum semi-axes (LR, AP, SI) in mm
    asymmetry: float  # relative width difference left vs right hemisphere
    petalia: float  # AP shift of the right vs left occipital pole (mm)
    atrophy: float  # 0 young .. 1 old: ventricles, sulci and extra-axial CSF widen
    skull_mm: float
    scalp_mm: float
    wmh_grade: int  # 0 none, 1 mild, 2 moderate, 3 severe
    old_infarct: dict | None  # {"centre": [x,y,z], "radius": r} in head frame
    tilt_deg: np.ndarray  # head pose in the scanner (x, y, z rotations)
    shift_mm: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator) -> AnatomyParams:
        scale = rng.uniform(0.93, 1.07)
        axes = np.array([rng.uniform(61, 67), rng.uniform(78, 86), rng.uniform(58, 64)]) * scale
        atrophy = float(rng.beta(2.0, 3.0))
        wmh = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.3, 0.17, 0.08]))
        old = None
        if rng.random() < 0.22:
            # A healed cortical-subcortical infarct somewhere on the upper convexity.
            theta = rng.uniform(0, 2 * np.pi)
            elev = rng.uniform(-0.1, 0.8)
            d = np.array([np.cos(theta) * np.cos(elev), np.sin(theta) * np.cos(elev), np.sin(elev)])
            centre = d * axes * 0.86 + np.array([0.0, 0.0, 8.0])
            old = {"centre": centre.round(2).tolist(), "radius": float(rng.uniform(7, 15))}
        return cls(
            axes=axes,
            asymmetry=float(rng.uniform(-0.03, 0.03)),
            petalia=float(rng.uniform(-4, 4)),
            atrophy=atrophy,
            skull_mm=float(rng.uniform(5, 8)),
            scalp_mm=float(rng.uniform(4, 7)),
            wmh_grade=wmh,
            old_infarct=old,
            tilt_deg=np.array([rng.uniform(-9, 7), rng.uniform(-4, 4), rng.uniform(-5, 5)]),
            shift_mm=np.array([rng.uniform(-4, 4), rng.uniform(-6, 6), rng.uniform(-5, 5)]),
        )

    def to_dict(self) -> dict:
        return {
            "cerebrum_semi_axes_mm": self.axes.round(2).tolist(),
            "asymmetry": round(self.asymmetry, 4),
            "atrophy": round(self.atrophy, 3),
            "wmh_grade": self.wmh_grade,
            "old_infarct": self.old_infarct,
            "head_tilt_deg": self.tilt_deg.round(3).tolist(),
        }


FIELD_NAMES = ("shape", "fold", "wmh", "vessel", "lesion", "folia", "warp0", "warp1", "warp2")
_FIELD_SCALES_MM = (28.0, 4.5, 5.0, 3.5, 9.0, 4.0, 30.0, 30.0, 30.0)


class AnatomyFields:
    """The random fields that make one head unique, stacked (nz, ny, nx, K) on the model grid.

    shape: global surface bumps; fold: cortical folding (sulci are its zero set); wmh: where
    white-matter hyperintensities grow; vessel: where sulcal vessels run (FVH); lesion: old-infarct
    border irregularity; folia: cerebellar folia; warp0..2: territory border warp.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.stack = np.stack([smooth_noise(rng, s) for s in _FIELD_SCALES_MM], axis=-1)

    def at_model(self) -> dict[str, np.ndarray]:
        return {n: self.stack[..., i] for i, n in enumerate(FIELD_NAMES)}

    def sampled(self, sampler) -> dict[str, np.ndarray]:
        vals = sampler.many(self.stack)
        return {n: vals[..., i] for i, n in enumerate(FIELD_NAMES)}


def _ellipsoid(q: np.ndarray, centre, axes) -> np.ndarray:
    """Normalised radius of q with respect to an axis-aligned ellipsoid (< 1 inside)."""
    d = (q - np.asarray(centre, dtype=np.float32)) / np.asarray(axes, dtype=np.float32)
    return np.sqrt(np.einsum("...i,...i->...", d, d))


def _cerebrum_rn(q: np.ndarray, p: AnatomyParams, shape_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius of the cerebrum and the approximate depth below its surface (mm)."""
    a, b, c = p.axes
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    z0 = 8.0
    ax = a * (1 + p.asymmetry * np.sign(x))
    yy = y - p.petalia * (x < 0) * np.clip(y / b, 0, 1)
    # flat base: frontal (orbital) and occipital (tentorial) floors are high, temporal lobes low
    c_low = np.interp(yy, [-95, -45, -22, 12, 32, 95], [24, 26, 46, 46, 30, 30]).astype(np.float32) * (c / 62)
    cz = np.where(z > z0, c, c_low)
    rn = np.sqrt((x / ax) ** 2 + (yy / b) ** 2 + ((z - z0) / cz) ** 2)
    rn = rn * (1 + 0.035 * shape_noise)
    r_loc = np.sqrt(x**2 + yy**2 + (z - z0) ** 2) / np.maximum(rn, 1e-3)
    return rn, (1 - rn) * r_loc


def _subset_union(q: np.ndarray, mask: np.ndarray, specs: list[tuple]) -> np.ndarray:
    """Union of ellipsoids (centre, axes) evaluated only at points where ``mask`` holds."""
    out = np.zeros(mask.shape, dtype=bool)
    qs = q[mask]
    if len(qs):
        hit = np.zeros(len(qs), dtype=bool)
        for centre, axes in specs:
            hit |= _ellipsoid(qs, centre, axes) < 1
        out[mask] = hit
    return out


def brain_masks(q: np.ndarray, p: AnatomyParams, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cerebrum, cerebellum, brainstem and the brain mask (parenchyma plus a 2 mm CSF rim)."""
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    rn, depth = _cerebrum_rn(q, p, f["shape"])
    cerebrum = depth > 0
    post = (z < 0) & (y > -10)
    rn_cb = np.full(rn.shape, 9.0, dtype=np.float32)
    rn_cb[post] = _ellipsoid(q[post], (0, 46, -40), (p.axes[0] * 0.78, 33, 23)) * (1 + 0.03 * f["shape"][post])
    cerebellum = rn_cb < 1
    rn_bs = np.sqrt((x / 12.5) ** 2 + ((y - 14 - 0.15 * (z + 20)) / 14) ** 2)
    in_bs_z = (z > -90) & (z < -4)
    brainstem = (rn_bs < 1) & in_bs_z
    depth_all = np.maximum(depth, np.maximum(np.where(in_bs_z, (1 - rn_bs) * 12.5, -99), (1 - rn_cb) * 25))
    brain = (depth > -2.0) | cerebellum | brainstem
    return {"rn": rn, "depth": depth, "depth_all": depth_all, "cerebrum": cerebrum,
            "cerebellum": cerebellum, "brainstem": brainstem, "brain": brain, "rn_cb": rn_cb}


def tissue_classes(q: np.ndarray, p: AnatomyParams, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Classify head-frame points.

    ``f`` holds the anatomy fields already sampled at ``q`` (see FIELD_NAMES). Returns class codes
    and the masks the signal and lesion models need. Small structures are evaluated only inside
    their bounding region, which keeps a 128x128x28 grid well under a second.
    """
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    at = p.atrophy
    b = brain_masks(q, p, f)
    rn, depth, depth_all, cerebrum = b["rn"], b["depth"], b["depth_all"], b["cerebrum"]
    cerebellum, brainstem, brain = b["cerebellum"], b["brainstem"], b["brain"]
    brain_tissue = cerebrum | cerebellum | brainstem

    cls = np.full(q.shape[:-1], AIR, dtype=np.uint8)
    # head envelope: inner skull follows the brain surface, plus the skull base and face below
    csf_gap = 1.8 + 2.5 * at
    low = z < -30
    neck = np.full(rn.shape, -99.0, dtype=np.float32)
    neck[low] = (1 - _ellipsoid(q[low], (0, 4, -20), (p.axes[0] + 16, p.axes[1] + 16, 100))) * 40 - 22
    outer = np.maximum(depth_all, neck)
    skull_in = -csf_gap
    skull_out = skull_in - p.skull_mm
    scalp_out = skull_out - p.scalp_mm
    cls[outer > scalp_out] = SCALP
    cls[outer > skull_out] = SKULL
    marrow = (outer > skull_out + 0.3 * p.skull_mm) & (outer < skull_in - 0.3 * p.skull_mm)
    cls[marrow] = MARROW
    cls[(outer > skull_in) & low] = OTHER  # skull base, sinuses, soft tissue
    cls[depth_all > -csf_gap] = CSF
    orbit = (z < -12) & (y < -50)
    cls[_subset_union(q, orbit, [((s * 31, -p.axes[1] + 5, -32), (11.5, 11.5, 11.5)) for s in (-1, 1)])] = EYE

    # cortex: ribbon under the surface, walls along sulci; sulci are CSF clefts
    fold = np.abs(f["fold"])
    sulc_w = 0.1 + 0.1 * at
    sulc_depth = 15.0
    sulcus = (fold < sulc_w) & (depth < sulc_depth) & cerebrum
    gm = cerebrum & ((depth < 3.2) | ((fold < sulc_w + 0.27) & (depth < sulc_depth + 2.5)))
    # interhemispheric fissure and medial cortex
    fiss = (z > 27) | (y < -38) | (y > 40)
    fiss_w = 1.0 + 1.5 * at
    fissure = cerebrum & fiss & (np.abs(x) < fiss_w)
    gm |= cerebrum & fiss & (np.abs(x) < fiss_w + 2.8)
    # sylvian fissure (lens-shaped cleft) with the insular cortex deep to it
    # (an oblique sheet rising posteriorly, so axial slices cut it as a thin cleft)
    zs = -4 + 0.5 * y + 0.004 * y**2
    taper = np.clip(1 - ((y + 2) / 30) ** 2, 0, 1)
    lateral = cerebrum & (np.abs(x) > 0.5 * p.axes[0] + 4 * (1 - taper))
    sylvian = lateral & (np.abs(z - zs) < (1.0 + 1.2 * at) * taper) & (np.abs(x) > 0.58 * p.axes[0])
    gm |= lateral & (np.abs(z - zs) < 4.0 * taper)

    cls[cerebrum] = WM
    cls[gm] = GM
    cb = cerebellum & ~cerebrum
    cls[cb] = np.where((b["rn_cb"][cb] < 0.45) & (np.abs(x[cb]) > 6), WM, GM)
    cb_sulc = cb & (np.abs(f["folia"]) < 0.08) & (b["rn_cb"] > 0.55)
    cls[brainstem] = WM

    # deep grey nuclei and ventricles, evaluated in the central box only
    inner = cerebrum & (np.abs(x) < 45) & (np.abs(y) < 56) & (z > -30) & (z < 36)
    deep = _subset_union(q, inner, [spec for s in (-1, 1) for spec in (
        ((s * 22, -3, 2), (6.5, 13, 9)),  # lentiform
        ((s * 12.5, -15, 10), (4.5, 8, 7)),  # caudate head
        ((s * 10, 13, 2), (8, 11, 8)),  # thalamus
    )])
    cls[deep] = DEEP_GM
    v = 0.75 + 1.0 * at
    vent = _subset_union(q, inner, [spec for s in (-1, 1) for spec in (
        ((s * (4.0 + 3.0 * v), -2, 16), (5.0 * v, 25, 5.5 * np.sqrt(v))),  # body
        ((s * (4.5 + 3.0 * v), -21, 10), (5.0 * v, 10, 7.5 * np.sqrt(v))),  # frontal horn
        ((s * (13 + 2 * v), 24, 10), (6 * v, 13, 8)),  # atrium
        ((s * 19, 36, 6), (3.5 * v, 9, 4)),  # occipital horn
        ((s * 27, 2, -17), (2.5 * v, 13, 3)),  # temporal horn
    )] + [((0, 6, -3), (1.6 * v, 12, 8))])  # third ventricle
    cls[vent] = CSF
    cls[sulcus | fissure | sylvian | cb_sulc] = CSF

    # white-matter hyperintensities: periventricular caps and deep patches
    wmh = np.zeros(q.shape[:-1], dtype=np.float32)
    if p.wmh_grade > 0:
        thr = {1: 2.1, 2: 1.5, 3: 1.0}[p.wmh_grade]
        peri = _subset_union(q, inner, [spec for s in (-1, 1) for spec in (
            ((s * (4 + 2.5 * v), -22, 9), (6 * v, 13, 10)),
            ((s * 15, 24, 8), (7 * v, 15, 10)),
        )])
        score = f["wmh"] - thr + (0.9 * p.wmh_grade) * peri
        wmh = np.clip(score / 0.6, 0, 1).astype(np.float32) * (cls == WM) * (rn < 0.7)

    # old infarct: gliotic rim around a cavity, never acute core
    old_cavity = np.zeros(q.shape[:-1], dtype=bool)
    old_rim = np.zeros(q.shape[:-1], dtype=bool)
    if p.old_infarct is not None:
        r = p.old_infarct["radius"] * (1 + 0.45 * f["lesion"])
        dist = np.linalg.norm(q - np.asarray(p.old_infarct["centre"], dtype=np.float32), axis=-1)
        inside = (dist < r) & cerebrum & ~vent & ~deep
        old_cavity = inside & (dist < 0.6 * r)
        old_rim = inside & ~old_cavity
        cls[old_cavity] = CSF

    parenchyma = np.isin(cls, (GM, WM, DEEP_GM)) & brain_tissue
    # sulcal / subarachnoid CSF where cortical vessels run (FVH live here)
    extra_axial = (cls == CSF) & ~vent & ~old_cavity & brain & (z > -30)
    return {
        "cls": cls,
        "brain": brain,
        "parenchyma": parenchyma,
        "ventricle": vent,
        "extra_axial_csf": extra_axial,
        "cerebrum": cerebrum,
        "rn": rn,
        "wmh": wmh,
        "old_cavity": old_cavity,
        "old_rim": old_rim,
        # where the DSC simulation puts vessels: MCA branches in the sylvian cleft, and the superior
        # sagittal sinus along the upper interhemispheric fissure
        "sylvian": sylvian,
        "sinus": fissure & (z > 27),
    }


def territories(q: np.ndarray, p: AnatomyParams, f: dict[str, np.ndarray], cerebrum: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Vascular territory labels (see TERRITORY_NAMES) and the superior-division flag of the MCA.

    Rules in normalised coordinates, with a smooth random warp so borders vary between cases.
    """
    a, b, c = p.axes
    u = q[..., 0] / a + 0.05 * f["warp0"]
    v = q[..., 1] / b + 0.06 * f["warp1"]
    w = (q[..., 2] - 8.0) / c + 0.05 * f["warp2"]
    au = np.abs(u)
    left = q[..., 0] > 0
    lab = np.zeros(q.shape[:-1], dtype=np.uint8)

    mca_sup = np.ones(q.shape[:-1], dtype=np.uint8) * 5
    aca = (au < 0.27 + 0.28 * np.clip(w, 0, 1)) & (v < 0.42 - 0.1 * np.clip(-w, 0, 1)) & (w > -0.55)
    aca |= (v < -0.62) & (au < 0.33)
    pca = (v > 0.52 - 0.22 * np.clip(-w, 0, 1.5)) | ((w < -0.32) & (v > -0.05))
    pca |= (v > 0.3) & (au < 0.24)
    thal = (au < 0.24) & (v > 0.04) & (v < 0.34) & (w < 0.12) & (w > -0.45)
    deep = np.sqrt(((au - 0.27) / 0.19) ** 2 + ((v + 0.12) / 0.24) ** 2 + ((w - 0.02) / 0.3) ** 2) < 1

    lab[:] = mca_sup
    lab[aca] = 1
    lab[pca] = 7
    lab[deep] = 3
    lab[thal] = 7
    lab = np.where(left, lab, lab + 1).astype(np.uint8)
    lab[~cerebrum] = 0
    # MCA superior division: frontal and upper parietal; inferior: temporal and lower parietal
    superior = (w > 0.02 + 0.5 * v).astype(bool)
    return lab, superior
