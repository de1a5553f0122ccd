"""One phantom head = anatomy + stroke on the model grid; :class:`HeadModel` renders it on any grid.

The DWI grid, the FLAIR grid (moved head, other geometry) and the distractor series all come from
the same continuous model, so the truth on the DWI grid is exact and the FLAIR motion is known.
"""

from __future__ import annotations

import numpy as np

from phantom import anatomy, lesion, signal
from phantom.fields import Sampler, model_points
from phantom.geometry import Grid, RigidPose

#: Sulcal-vessel density threshold per collateral grade (lower = denser FVH with better collaterals).
_FVH_THRESHOLD = {"good": -0.3, "moderate": 0.0, "poor": 0.35}


def fvh_strength(extra_axial: np.ndarray, vessel_field: np.ndarray, tmax: np.ndarray, collaterals: str,
                 dr=None) -> tuple[np.ndarray, np.ndarray]:
    """FVH voxels (slow flow in sulcal vessels over Tmax > 6 s tissue) and their FLAIR strength 0..1.

    Domain randomisation scales the strength per case (strong, weak) or removes FVH altogether.
    """
    vessel = extra_axial & (vessel_field > _FVH_THRESHOLD[collaterals]) & (tmax > 6.0)
    strength = np.where(vessel, np.clip((tmax - 6.0) / 5.0, 0.3, 1.0), 0.0).astype(np.float32)
    if dr is not None:
        if dr.fvh_gain <= 0:
            vessel = np.zeros_like(vessel)
        strength = (strength * dr.fvh_gain).astype(np.float32)
    return vessel, strength


def lesion_maps(tmax: np.ndarray, core: np.ndarray, core_adc: np.ndarray, fvh: np.ndarray, dr=None) -> dict:
    """The lesion inputs of ``signal.tissue_maps`` for either family; the penumbral cue's strength comes
    from the domain draw (phantom.randomise.penumbral_scale_draw), 1 in the unrandomised phantom."""
    return {"tmax": tmax, "core": core, "core_adc": core_adc, "fvh_strength": fvh,
            "penumbral_scale": 1.0 if dr is None else dr.penumbral_scale}


class HeadModel:
    """Anatomy parameters, random fields and the lesion fields of one case."""

    def __init__(self, rng_anat: np.random.Generator, rng_fields: np.random.Generator,
                 rng_stroke: np.random.Generator, rng_lesion: np.random.Generator,
                 scenario: dict | None = None, dr=None) -> None:
        self.anat = anatomy.AnatomyParams.sample(rng_anat)
        self.dr = dr  # phantom.randomise.DomainParams or None (the unrandomised v1.0 phantom)
        if dr is not None:
            dr.apply_anatomy(self.anat)
        self.fields = anatomy.AnatomyFields(rng_fields)
        self.stroke = lesion.StrokeParams.sample(rng_stroke, scenario)
        q = model_points()
        f = self.fields.at_model()
        t = anatomy.brain_masks(q, self.anat, f)
        terr, sup = anatomy.territories(q, self.anat, f, t["cerebrum"])
        self.perf = lesion.perfusion_fields(rng_lesion, terr, sup, t["brain"], self.stroke)

    def render(self, grid: Grid, pose: RigidPose, z_offset_mm: float = 0.0) -> dict[str, np.ndarray]:
        """Noise-free tissue maps and truth on ``grid`` for a head placed by ``pose``.

        ``z_offset_mm`` samples off the slice centre (through-slice partial volume averages several).
        """
        q = pose.to_head(grid.world_points(z_offset_mm))
        sample = Sampler(q)
        f = self.fields.sampled(sample)
        t = anatomy.tissue_classes(q, self.anat, f)
        terr, _ = anatomy.territories(q, self.anat, f, t["cerebrum"])
        brain = t["brain"]
        tmax = np.where(brain, sample(self.perf["tmax"]), 0.0).astype(np.float32)
        tmax[t["ventricle"] | t["old_cavity"]] = 0.0
        core = (sample(self.perf["core_score"]) > 0) & t["parenchyma"] & ~t["old_rim"] & ~t["old_cavity"]
        core &= tmax > 6.0
        s = self.stroke
        core_adc = np.clip(s.core_adc + 28.0 * f["lesion"], 360, 575).astype(np.float32)
        vessel, fvh = fvh_strength(t["extra_axial_csf"], f["vessel"], tmax, s.collaterals, self.dr)
        les = lesion_maps(tmax, core, core_adc, fvh, self.dr)
        tables = None if self.dr is None else self.dr.tables
        maps = signal.tissue_maps(t, les, s.onset_h, tables=tables)
        if self.dr is not None:
            self.dr.flair_lookalikes(maps, t["extra_axial_csf"], f["vessel"], f["shape"], tmax)
        maps.update(
            tmax=tmax,
            core=core,
            fvh=vessel,
            brain=brain,
            territory=np.where(brain, terr, 0).astype(np.uint8),
            cls=t["cls"],
            sylvian=t["sylvian"],
            sinus=t["sinus"],
            confounders=(np.where(t["wmh"] > 0.5, 1, 0) + 2 * t["old_rim"] + 3 * t["old_cavity"]).astype(np.uint8),
        )
        return maps
