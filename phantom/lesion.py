"""Occlusion, collaterals, Tmax truth and the infarct core, computed on the head-frame model grid.

Physiology in a few lines:
- An occlusion (ICA-T, M1, M2 superior/inferior division) cuts antegrade flow to a set of
  territories. Lenticulostriate (MCA-deep) territory has no collaterals: it is the most delayed.
- Leptomeningeal collaterals enter the cortical territory from its border with unaffected tissue,
  so Tmax rises with the distance d (mm) from that border: Tmax = Tn + (Tpeak - Tn)(1 - exp(-d/lambda)).
  Good collaterals reach far (large lambda, lower Tpeak): the Tmax > 6 s region shrinks inside the
  territory; poor collaterals leave the whole territory severely delayed.
- The core grows into the most delayed tissue with time since onset, faster with poor collaterals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phantom.fields import MODEL_STEP, smooth_noise

OCCLUSIONS = ("none", "ICA-T", "M1", "M2-superior", "M2-inferior")
COLLATERALS = ("good", "moderate", "poor")


@dataclass
class StrokeParams:
    occlusion: str
    side: str  # "left" | "right" | "none"
    collaterals: str
    collateral_score: float  # 0 (none) .. 1 (excellent)
    onset_h: float
    tpeak_s: float
    reach_mm: float  # lambda: collateral reach into the territory
    core_adc: float  # mean core ADC (1e-6 mm2/s)
    case_type: str = ""  # domain-randomised case mix only (phantom.randomise.CASE_TYPES)
    no_core: bool = False  # TIA-like: hypoperfusion without core
    lacune_radius_mm: float = 0.0  # lacunar: small deep infarct, no large-vessel occlusion

    @classmethod
    def sample(cls, rng: np.random.Generator, scenario: dict | None = None) -> StrokeParams:
        """Draw a scenario; ``scenario`` pins occlusion/side/collaterals/onset_h (draws still happen,
        so everything else is unchanged by pinning)."""
        sc = dict(scenario or {})
        unknown = set(sc) - {"occlusion", "side", "collaterals", "onset_h", "case_type", "no_core"}
        if unknown:
            raise ValueError(f"scenario has unknown keys {sorted(unknown)}; "
                             "use occlusion, side, collaterals, onset_h (case_type, no_core)")
        occ = str(rng.choice(OCCLUSIONS, p=[0.1, 0.2, 0.4, 0.15, 0.15]))
        side = str(rng.choice(["left", "right"]))
        col = str(rng.choice(COLLATERALS, p=[0.35, 0.4, 0.25]))
        onset = float(np.exp(rng.uniform(np.log(0.5), np.log(20.0))))
        occ = sc.get("occlusion", occ)
        if occ not in OCCLUSIONS + ("lacunar",):
            raise ValueError(f"scenario occlusion must be one of {OCCLUSIONS + ('lacunar',)}, got {occ!r}")
        side = sc.get("side", side)
        if side not in ("left", "right"):
            raise ValueError(f"scenario side must be 'left' or 'right', got {side!r}")
        side = "none" if occ == "none" else side
        col = sc.get("collaterals", col)
        if col not in COLLATERALS:
            raise ValueError(f"scenario collaterals must be one of {COLLATERALS}, got {col!r}")
        onset = float(sc.get("onset_h", onset))
        if not 0 < onset <= 72:
            raise ValueError(f"scenario onset_h must be in (0, 72] hours, got {onset!r}")
        base = {"good": 0.8, "moderate": 0.5, "poor": 0.2}[col]
        score = float(np.clip(base + rng.uniform(-0.15, 0.15), 0.02, 0.98))
        site_peak = {"ICA-T": 17.0, "M1": 14.5, "M2-superior": 12.5, "M2-inferior": 12.5, "none": 0.0,
                     "lacunar": 0.0}[occ]
        tpeak = site_peak * (1.25 - 0.45 * score) * rng.uniform(0.9, 1.15)
        # collateral reach (mm into the territory); a division territory is smaller, so is the reach
        site_reach = 0.5 if occ.startswith("M2") else 1.0
        reach = (4.0 + 24.0 * score**1.3 * rng.uniform(0.8, 1.2)) * site_reach
        core_adc = float(rng.uniform(430, 540) - 40 * min(onset / 12.0, 1.0))
        out = cls(occ, side, col, score, onset, float(tpeak), float(reach), core_adc)
        # extra draws only for the randomised case mix, after every v1.0 draw (v1.0 cases unchanged)
        if "case_type" in sc:
            out.case_type = str(sc["case_type"])
            out.no_core = bool(sc.get("no_core", False))
            if out.no_core:  # transient hypoperfusion: delay, but not yet (or never) infarcting
                out.tpeak_s = float(rng.uniform(8.0, 11.0))
                out.reach_mm = min(out.reach_mm, float(rng.uniform(3.0, 8.0)))
            if occ == "lacunar":
                out.lacune_radius_mm = float(rng.uniform(3.0, 7.5))
        return out

    def to_dict(self) -> dict:
        return {
            "occlusion": self.occlusion,
            "side": self.side,
            "collaterals": self.collaterals,
            "collateral_score": round(self.collateral_score, 3),
            "onset_h": round(self.onset_h, 2),
            "tmax_peak_s": round(self.tpeak_s, 2),
            "collateral_reach_mm": round(self.reach_mm, 2),
            "core_adc_mean": round(self.core_adc, 1),
            **({"case_type": self.case_type, "no_core": self.no_core,
                "lacune_radius_mm": round(self.lacune_radius_mm, 2)} if self.case_type else {}),
        }


def affected_weight(territory: np.ndarray, superior: np.ndarray, s: StrokeParams) -> np.ndarray:
    """Severity weight (0..1) of loss of antegrade flow per model voxel."""
    w = np.zeros(territory.shape, dtype=np.float32)
    if s.occlusion == "none":
        return w
    odd = 1 if s.side == "left" else 0
    aca, deep, sup = (1 + (1 - odd), 3 + (1 - odd), 5 + (1 - odd))
    if s.occlusion in ("ICA-T", "M1"):
        w[territory == deep] = 1.0
        w[territory == sup] = 1.0
        if s.occlusion == "ICA-T":
            # the A1 segment is cut too; cross-filling over the AComm spares part of the ACA
            w[territory == aca] = 0.75
    elif s.occlusion == "M2-superior":
        w[(territory == sup) & superior] = 1.0
    elif s.occlusion == "M2-inferior":
        w[(territory == sup) & ~superior] = 1.0
    return w


def perfusion_fields(
    rng: np.random.Generator,
    territory: np.ndarray,
    superior: np.ndarray,
    brain: np.ndarray,
    s: StrokeParams,
) -> dict[str, np.ndarray]:
    """Tmax (s) and a core score (> 0 means infarcted) on the model grid.

    The noise fields are drawn whether or not there is a stroke, so the random stream (and hence the
    rest of the case) does not depend on the scenario.
    """
    n_norm = smooth_noise(rng, 20.0)
    n_tmax = smooth_noise(rng, 12.0)
    n_core = smooth_noise(rng, 7.0)
    tmax_normal = np.clip(1.0 + 0.45 * n_norm, 0.2, 2.4).astype(np.float32)
    w = affected_weight(territory, superior, s)
    if s.occlusion == "lacunar":
        return _lacune(rng, territory, tmax_normal, s)
    if s.occlusion == "none" or not (w > 0).any():
        return {"tmax": tmax_normal, "core_score": np.full(w.shape, -1.0, np.float32), "affected": w > 0}

    # distance (mm) from unaffected brain: the sources of collateral flow
    source = brain & (w == 0)
    d = ndimage.distance_transform_edt(~source, sampling=MODEL_STEP).astype(np.float32)
    d = ndimage.gaussian_filter(d, 1.0)
    lam = s.reach_mm * (1 + 0.25 * n_tmax)
    rise = 1 - np.exp(-d / np.maximum(lam, 1.0))
    deep_lab = 3 if s.side == "left" else 4
    # no collaterals to end arteries: the lenticulostriate territory is fully delayed
    rise = np.where(territory == deep_lab, np.maximum(rise, 0.97), rise)
    tpeak = s.tpeak_s * (1 + 0.08 * n_tmax)
    tmax = tmax_normal + (tpeak - tmax_normal) * rise * w
    tmax = ndimage.gaussian_filter(tmax, 0.7).astype(np.float32)

    # core: severity (how far Tmax sits between 6 s and the peak), grown by time / collaterals
    sev = np.clip((tmax - 6.0) / max(s.tpeak_s - 6.0, 1.0), -1, 1.2)
    tau = 1.5 + 14.0 * s.collateral_score**1.5  # hours to infarct most of the severe tissue
    growth = 0.92 * (1 - np.exp(-s.onset_h / tau))
    core_score = sev + 0.12 * n_core - (1.0 - growth)
    core_score = np.where(tmax > 6.5, core_score, -1.0).astype(np.float32)
    if s.no_core:
        core_score = np.full(w.shape, -1.0, np.float32)
    return {"tmax": tmax, "core_score": core_score, "affected": w > 0}


def _lacune(rng: np.random.Generator, territory: np.ndarray, tmax_normal: np.ndarray, s: StrokeParams
            ) -> dict[str, np.ndarray]:
    """A small deep infarct (lenticulostriate or thalamic perforator) with a thin delayed rim.

    Tmax exceeds 6 s only within ~1.5 radii, so Tmax > 6 s is a few mL and there is no mismatch.
    """
    from phantom.fields import model_points

    labs = (3, 7) if s.side == "left" else (4, 8)
    cand = np.argwhere(np.isin(territory, labs))
    if not len(cand):
        return {"tmax": tmax_normal, "core_score": np.full(territory.shape, -1.0, np.float32),
                "affected": np.zeros(territory.shape, bool)}
    pts = model_points()
    deep = cand[np.abs(pts[tuple(cand.T)][:, 0]) < 32]  # perforator territory lies near the midline
    cand = deep if len(deep) else cand
    centre = pts[tuple(cand[rng.integers(len(cand))])]
    d = np.linalg.norm(pts - centre, axis=-1)
    r = s.lacune_radius_mm
    tmax = np.maximum(tmax_normal, 6.0 + 3.0 * (1 - d / (1.5 * r))).astype(np.float32)
    core_score = (1 - d / r).astype(np.float32)
    return {"tmax": tmax, "core_score": core_score, "affected": d < 1.5 * r}
