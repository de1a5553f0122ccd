"""Domain randomisation (SynthSeg style, Billot et al. 2023), per case and per sequence, both families.

Why: the Tmax network must not key on appearance cues that belong to our generator (issue 15). So
everything that is not the physiology it should learn is drawn per case from wide ranges: tissue
contrasts (per sequence), FLAIR CSF suppression, bias fields, noise level and distribution,
in-plane blur, slice thickness, gap and through-slice partial volume, head size, position, tilt and
cropping, skull and scalp appearance, white-matter disease, old infarcts, FVH strength (strong, weak,
absent) and FVH look-alikes (flow artefacts, bright sulci) in every brain, and a balanced case mix.

All draws come from one generator seeded from the case seed, so a randomised case is as reproducible
as an unrandomised one; the unrandomised phantom (v1.0) never touches this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from phantom import signal
from phantom.anatomy import CSF, DEEP_GM, GM, MARROW, SCALP, SKULL, WM

#: case type -> probability; no stroke >= 15 % (issue 15)
CASE_TYPES = {"no-stroke": 0.18, "lacunar": 0.12, "tia": 0.10, "M2": 0.18, "M1": 0.18, "ICA-T": 0.14,
              "large-core": 0.10}
NOISE_KINDS = ("rician", "noncentral-chi", "gaussian")


def case_scenario(seed: int) -> dict[str, Any]:
    """Case ``seed``'s type and the scenario keys (phantom.lesion.StrokeParams) that make it."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8102]))
    kind = str(rng.choice(list(CASE_TYPES), p=list(CASE_TYPES.values())))
    side = str(rng.choice(["left", "right"]))
    sc: dict[str, Any] = {"case_type": kind, "side": side}
    if kind == "no-stroke":
        sc["occlusion"] = "none"
    elif kind == "lacunar":
        sc.update(occlusion="lacunar", onset_h=float(np.exp(rng.uniform(np.log(1.0), np.log(48.0)))))
    elif kind == "tia":
        sc.update(occlusion=str(rng.choice(["M2-superior", "M2-inferior", "M1"])), collaterals="good",
                  no_core=True, onset_h=float(rng.uniform(0.5, 4.0)))
    elif kind == "M2":
        sc["occlusion"] = str(rng.choice(["M2-superior", "M2-inferior"]))
    elif kind == "large-core":
        sc.update(occlusion=str(rng.choice(["ICA-T", "M1"])), collaterals="poor",
                  onset_h=float(rng.uniform(8.0, 24.0)))
    else:
        sc["occlusion"] = kind
    return sc


def _contrast_tables(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-class contrasts drawn around the default ones: GM/WM/CSF/deep-grey ratios per sequence."""
    tb = signal.default_tables()

    def jitter(name: str, cls: int, lo: float, hi: float) -> None:
        tb[name][cls] = tb[name][cls] * rng.uniform(lo, hi)

    for name in ("s0", "flair", "t1"):
        for cls in (GM, WM, DEEP_GM):
            jitter(name, cls, 0.82, 1.18)
        jitter(name, SCALP, 0.35, 1.8)
        jitter(name, MARROW, 0.3, 2.2)
        tb[name][SKULL] = rng.uniform(0.0, 0.12)
    jitter("s0", CSF, 0.75, 1.25)
    tb["flair"][CSF] = rng.uniform(0.01, 0.30)  # FLAIR CSF suppression: perfect .. poor inversion
    jitter("t1", CSF, 0.6, 1.5)
    for cls in (GM, WM, DEEP_GM, CSF):  # ADC is physical: small spread only
        jitter("adc", cls, 0.94, 1.06)
    return tb


def penumbral_scale_draw(seed: int) -> float:
    """The penumbral cue's strength of one randomised case: full (0.7-1.4), weak (0.15-0.6) or absent,
    from its own stream so every other draw of the case stays as it was (phantom 1.1)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8103]))
    kind = rng.choice(["full", "weak", "absent"], p=[0.4, 0.3, 0.3])
    return {"full": float(rng.uniform(0.7, 1.4)), "weak": float(rng.uniform(0.15, 0.6)), "absent": 0.0}[kind]


#: the tables ``DomainParams.stretch_grey_contrast`` scales for each choice of sequences
GREY_CONTRAST_IN: dict[str, tuple[str, ...]] = {"both": ("s0", "flair"), "dwi": ("s0",), "flair": ("flair",)}
#: acquisition draws a stress set may pin (``DomainParams.pin_acquisition``), with the values accepted
ACQ_PINNABLE: dict[str, tuple[float, float]] = {
    "dwi_snr": (2.0, 500.0), "flair_snr": (2.0, 500.0), "dwi_bias": (0.0, 1.5), "flair_bias": (0.0, 1.5),
    "dwi_psf": (0.0, 4.0), "flair_psf": (0.0, 4.0), "flair_gamma": (0.3, 3.0),
    "slice_thickness_mm": (1.0, 12.0), "slice_gap_mm": (0.0, 6.0),
}


def check_acquisition_pins(pins: dict[str, float]) -> None:
    """Raise ValueError naming the bad key or value unless every pin is a known key within its range."""
    if not isinstance(pins, dict) or not pins:
        raise ValueError(f"acquisition: needs a non-empty dict of {sorted(ACQ_PINNABLE)}, got {pins!r}")
    for key, value in pins.items():
        if key not in ACQ_PINNABLE:
            raise ValueError(f"acquisition: unknown key {key!r}; one of {sorted(ACQ_PINNABLE)}")
        lo, hi = ACQ_PINNABLE[key]
        if not isinstance(value, int | float) or not lo <= float(value) <= hi:
            raise ValueError(f"acquisition: {key} must be a number in {lo:g}..{hi:g}, got {value!r}")


@dataclass
class DomainParams:
    """Every randomised property of one case (see ``to_dict`` for the names recorded in truth.json)."""

    rng_seed: int
    size_scale: float
    tilt_deg: np.ndarray
    shift_mm: np.ndarray
    skull_mm: float
    scalp_mm: float
    atrophy: float
    wmh_grade: int
    old_infarct_radius: float  # 0: none added (the anatomy's own draw still stands)
    tables: dict[str, np.ndarray]
    fvh_gain: float  # 0 absent, < 0.7 weak, else strong
    flow_artefact: float  # FLAIR gain of flow artefacts in sulcal vessels (0: none)
    bright_sulci: float  # FLAIR gain of incompletely suppressed sulcal CSF in a region (0: none)
    acq: dict[str, Any] = field(default_factory=dict)
    # strength of the penumbral ADC decline (and its slight DWI rise) over the unrandomised phantom's:
    # the shipped model leaned on that ~5 % DWI rise to find hypoperfusion (docs/benchmarks.md, session
    # 18), a cue whose size in patients is uncertain, so it must not decide alone
    penumbral_scale: float = 1.0
    # grey-white contrast of DWI's b0 and FLAIR over the drawn one (1: as drawn); only pinned by
    # stretch_grey_contrast, never drawn: a stress test, not part of the training distribution
    grey_contrast: float = 1.0
    grey_contrast_in: str = "both"  # which sequences the stretch reached: both, dwi (b0) or flair
    acq_pinned: tuple[str, ...] = ()  # acquisition draws overridden by pin_acquisition (a stress set)
    # voxel-scale anatomical texture (% of the signal, as a 3 x 3 median residual reads it); only pinned by
    # add_texture, never drawn: both families are smooth within a tissue class (0.1-0.4 %), a real EPI reads 4.2 %
    texture_pct: float = 0.0

    @classmethod
    def sample(cls, seed: int) -> DomainParams:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8100]))
        fvh_kind = rng.choice(["strong", "weak", "absent"], p=[0.45, 0.35, 0.2])
        fvh_gain = {"strong": rng.uniform(0.8, 1.3), "weak": rng.uniform(0.2, 0.6), "absent": 0.0}[fvh_kind]
        acq = {
            "dwi_snr": float(rng.uniform(14, 90)), "flair_snr": float(rng.uniform(12, 60)),
            "dwi_bias": float(rng.uniform(0.0, 0.4)), "flair_bias": float(rng.uniform(0.0, 0.4)),
            "dwi_psf": float(rng.uniform(0.3, 1.4)), "flair_psf": float(rng.uniform(0.3, 1.4)),
            "noise": str(rng.choice(NOISE_KINDS, p=[0.5, 0.3, 0.2])), "coils": int(rng.integers(2, 9)),
            "dwi_scale": float(np.exp(rng.uniform(np.log(300), np.log(3000)))),
            "flair_scale": float(np.exp(rng.uniform(np.log(250), np.log(2500)))),
            "flair_gamma": float(rng.uniform(0.75, 1.3)),
            "slice_thickness_mm": float(rng.uniform(3.0, 7.0)), "slice_gap_mm": float(rng.uniform(0.0, 2.0)),
            "fov_mm": float(rng.uniform(200, 260)),
            "coverage_mm": float(rng.uniform(90, 160)),  # < brain height: top or bottom cropped
            "centre_shift_mm": rng.uniform([-15, -15, -25], [15, 15, 20]).round(3).tolist(),
            "partial_volume_samples": int(rng.choice([1, 3], p=[0.4, 0.6])),
        }
        return cls(
            rng_seed=int(seed), size_scale=float(rng.uniform(0.86, 1.14)),
            tilt_deg=rng.uniform([-15, -8, -12], [15, 8, 12]), shift_mm=rng.uniform(-12, 12, size=3),
            skull_mm=float(rng.uniform(3.0, 10.0)), scalp_mm=float(rng.uniform(2.0, 11.0)),
            atrophy=float(rng.beta(1.4, 1.8)), wmh_grade=int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15])),
            old_infarct_radius=float(rng.uniform(5, 16)) if rng.random() < 0.3 else 0.0,
            tables=_contrast_tables(rng), fvh_gain=float(fvh_gain),
            flow_artefact=float(rng.uniform(0.15, 0.6)) if rng.random() < 0.5 else 0.0,
            bright_sulci=float(rng.uniform(0.1, 0.5)) if rng.random() < 0.4 else 0.0,
            acq=acq, penumbral_scale=penumbral_scale_draw(seed),
        )

    def pin_acquisition(self, pins: dict[str, float]) -> None:
        """Override acquisition draws (keys of ``ACQ_PINNABLE``) with fixed values, the rest as drawn.

        Why: a stress set beyond the drawn ranges (a bias field stronger than any drawn, half the lowest
        SNR) asks which acquisition a model breaks on, the way ``stretch_grey_contrast`` asks it of the
        cortex. Scanners differ in exactly these ways, and the drawn ranges are our guess of theirs."""
        check_acquisition_pins(pins)
        for key, value in pins.items():
            self.acq[key] = float(value)
        self.acq_pinned = tuple(sorted(set(self.acq_pinned) | set(pins)))

    def add_texture(self, pct: float) -> None:
        """Give the brain voxel-scale texture of about ``pct`` % of the signal in b0 (so DWI), ADC and FLAIR.

        Why: on a near noise-free image the residual of a 3 x 3 median holds 0.1-0.4 % of the phantom's b0
        signal and 4.2 % of a real EPI's (``bench.noise_texture``): what varies between neighbouring voxels
        of a phantom study is its drawn noise, of a patient's also anatomy (vessels, perivascular spaces,
        partial volume). Pinning it asks what the core rule, the ADC noise estimate and the network make of
        anatomy they never saw; it is not part of the training distribution."""
        if not 0.0 <= float(pct) <= TEXTURE_MAX_PCT:
            raise ValueError(f"texture_pct must be in [0, {TEXTURE_MAX_PCT:g}], got {pct!r}")
        self.texture_pct = float(pct)

    def textured(self, rendered: dict[str, np.ndarray], stream: int, keys: tuple[str, ...],
                 psf_px: float) -> dict[str, np.ndarray]:
        """``rendered`` with ``keys`` multiplied inside the brain by 1 + a f, f a unit-SD field of this case's
        own stream (``[seed, 8300, stream]``: one per grid and sequence group, other draws untouched). b0
        and ADC share one field (partial volume with CSF raises both); FLAIR takes another. The amplitude a
        is chosen so that, after the sequence's own blur (``psf_px``), a 3 x 3 median residual reads
        ``texture_pct`` % of the signal, as ``bench.noise_texture`` reads a real scan, up to
        ``TEXTURE_MAX_AMPLITUDE``: a strongly blurred draw (sigma above about 0.8 px) would need anatomy
        varying by half its signal from voxel to voxel, so it reads less, as a blurred real scan would."""
        if self.texture_pct <= 0:
            return rendered
        brain = np.asarray(rendered["brain"]) > 0
        field = texture_field(self.rng_seed, brain.shape, stream)
        amplitude = min(self.texture_pct / 100.0 / median_residual_sd(signal.blur_inplane(field, psf_px), brain),
                        TEXTURE_MAX_AMPLITUDE)
        gain = np.where(brain, np.clip(1.0 + amplitude * field, 0.5, 1.5), 1.0).astype(np.float32)
        return {**rendered, **{k: (rendered[k] * gain).astype(np.float32) for k in keys}}

    def stretch_grey_contrast(self, k: float, sequences: str = "both") -> None:
        """Scale the grey-minus-white signal of cortex and deep grey in b0 (so DWI) and FLAIR by ``k``.

        Why: a cortex more contrasted than training ever drew was read as hypoperfusion on healthy brains
        (issue 15: the independent generator's frontal ribbon; 2 of 39 healthy brains of A-F at the top of
        the drawn range). Pinning ``k`` measures that failure on purpose: the drawn FLAIR ratio has median
        1.33 and maximum 1.92 over 3 000 draws, and k = 3 takes the median case to 1.99. ADC is physical and stays as drawn.
        ``sequences`` ("both", "dwi" or "flair") stretches one of them alone, to tell which one the model
        reads: a brighter cortex in the DWI looks like the penumbral DWI rise (session 23 measured both).
        """
        if sequences not in GREY_CONTRAST_IN:
            raise ValueError(f"sequences must be one of {sorted(GREY_CONTRAST_IN)}, got {sequences!r}")
        for name in GREY_CONTRAST_IN[sequences]:
            tb = self.tables[name]
            for cls in (GM, DEEP_GM):
                tb[cls] = tb[WM] + k * (tb[cls] - tb[WM])
        self.grey_contrast = float(k)
        self.grey_contrast_in = sequences

    def apply_anatomy(self, anat) -> None:
        """Overwrite the anatomy's size, pose, shells, atrophy and confounders with wider draws."""
        anat.axes = anat.axes * self.size_scale
        anat.tilt_deg = self.tilt_deg
        anat.shift_mm = self.shift_mm
        anat.skull_mm, anat.scalp_mm, anat.atrophy = self.skull_mm, self.scalp_mm, self.atrophy
        anat.wmh_grade = self.wmh_grade
        if self.old_infarct_radius > 0 and anat.old_infarct is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.rng_seed, 8101]))
            theta, elev = rng.uniform(0, 2 * np.pi), rng.uniform(-0.1, 0.8)
            d = np.array([np.cos(theta) * np.cos(elev), np.sin(theta) * np.cos(elev), np.sin(elev)])
            centre = d * anat.axes * 0.84 + np.array([0.0, 0.0, 8.0])
            anat.old_infarct = {"centre": centre.round(2).tolist(), "radius": self.old_infarct_radius}

    def flair_lookalikes(self, maps: dict[str, np.ndarray], extra_axial: np.ndarray, vessel_field: np.ndarray,
                         region_field: np.ndarray, tmax: np.ndarray) -> None:
        """FVH look-alikes anywhere, stroke or not: flow artefacts in sulcal vessels (the field's other
        tail, so they never coincide with true FVH by construction) and bright, poorly suppressed sulci."""
        fl = maps["flair"]
        if self.flow_artefact > 0:
            art = extra_axial & (vessel_field < -1.1)
            fl = np.where(art, np.maximum(fl, 0.45 + 0.5 * self.flow_artefact), fl)
        if self.bright_sulci > 0:
            region = extra_axial & (region_field > 0.6)
            fl = np.where(region, fl + self.bright_sulci * np.clip(region_field - 0.6, 0, 1), fl)
        maps["flair"] = fl.astype(np.float32)

    def noise(self, rng: np.random.Generator, s: np.ndarray, sigma: float) -> np.ndarray:
        """Magnitude noise: Rician (one coil), non-central chi (sum of squares over coils), or
        Gaussian (phase-corrected real images, clipped at zero)."""
        kind = self.acq["noise"]
        if kind == "rician":
            return signal.rician(rng, s, sigma)
        if kind == "gaussian":
            return np.maximum(s + rng.standard_normal(s.shape, dtype=np.float32) * sigma, 0).astype(np.float32)
        n = self.acq["coils"]
        sc = sigma / np.sqrt(n)  # same overall SNR; signal split evenly across coils
        acc = np.zeros(s.shape, np.float32)
        part = (s / np.sqrt(n)).astype(np.float32)
        for _ in range(n):
            acc += (part + rng.standard_normal(s.shape, dtype=np.float32) * sc) ** 2
            acc += (rng.standard_normal(s.shape, dtype=np.float32) * sc) ** 2
        return np.sqrt(acc).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        tb = self.tables
        return {
            "size_scale": round(self.size_scale, 4), "tilt_deg": self.tilt_deg.round(3).tolist(),
            "shift_mm": self.shift_mm.round(3).tolist(), "skull_mm": round(self.skull_mm, 2),
            "scalp_mm": round(self.scalp_mm, 2), "atrophy": round(self.atrophy, 3), "wmh_grade": self.wmh_grade,
            "old_infarct_radius_mm": round(self.old_infarct_radius, 2),
            "gm_wm_ratio": {k: round(float(tb[k][GM] / tb[k][WM]), 4) for k in ("s0", "flair", "t1")},
            "deep_wm_ratio": {k: round(float(tb[k][DEEP_GM] / tb[k][WM]), 4) for k in ("s0", "flair", "t1")},
            "csf_wm_ratio": {k: round(float(tb[k][CSF] / tb[k][WM]), 4) for k in ("s0", "flair", "t1")},
            "flair_csf": round(float(tb["flair"][CSF]), 4),
            "scalp_s0": round(float(tb["s0"][SCALP]), 4), "marrow_s0": round(float(tb["s0"][MARROW]), 4),
            "fvh_gain": round(self.fvh_gain, 3),
            "fvh": "absent" if self.fvh_gain <= 0 else ("weak" if self.fvh_gain < 0.7 else "strong"),
            "flow_artefact": round(self.flow_artefact, 3), "bright_sulci": round(self.bright_sulci, 3),
            "penumbral_scale": round(self.penumbral_scale, 3), "grey_contrast": round(self.grey_contrast, 3),
            "grey_contrast_in": self.grey_contrast_in, "acq_pinned": list(self.acq_pinned),
            **({"texture_pct": round(self.texture_pct, 3)} if self.texture_pct > 0 else {}),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.acq.items()},
        }


TEXTURE_MAX_PCT = 10.0
TEXTURE_SIGMA_PX = 0.6  # in-plane smoothing of the texture's white noise, DWI/FLAIR voxels
TEXTURE_MAX_AMPLITUDE = 0.25  # SD of the texture's gain at most (a quarter of the signal)


def median_residual_sd(image: np.ndarray, brain: np.ndarray) -> float:
    """Robust SD (MAD x 1.4826) of ``image`` minus its 3 x 3 in-plane median over the brain eroded by two
    voxels: what ``models.confidence.adc_noise`` reads, written here because the phantom imports no model."""
    region = ndi.binary_erosion(brain, iterations=2)
    res = (image - ndi.median_filter(image, size=(1, 3, 3)))[region if region.any() else brain]
    return float(1.4826 * np.median(np.abs(res - np.median(res))))


def texture_field(seed: int, shape: tuple[int, ...], stream: int) -> np.ndarray:
    """A unit-SD field that changes from voxel to voxel in-plane (white noise smoothed by
    ``TEXTURE_SIGMA_PX``), independent between slices, from the case's own stream."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8300, int(stream)]))
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(0.0, TEXTURE_SIGMA_PX,
                                                                                  TEXTURE_SIGMA_PX))
    return (f / max(float(f.std()), 1e-9)).astype(np.float32)


def render_partial_volume(head, grid, pose, samples: int, thickness_mm: float) -> dict[str, np.ndarray]:
    """Render ``samples`` planes across each slice's thickness and average their signals.

    Truth (Tmax, core, masks) comes from the central plane; b0 and b1000 are averaged separately, so
    the ADC is the one a scanner measures in a voxel that straddles tissues.
    """
    if samples <= 1:
        return head.render(grid, pose)
    offsets = np.linspace(-thickness_mm / 3.0, thickness_mm / 3.0, samples)
    planes = [head.render(grid, pose, float(o)) for o in offsets]
    out = dict(planes[samples // 2])
    s0 = np.mean([p["s0"] for p in planes], axis=0)
    s1 = np.mean([p["s0"] * np.exp(-signal.B_VALUE * p["adc"] * 1e-6) for p in planes], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["adc"] = np.where(s0 > 1e-4, np.log(np.maximum(s0, 1e-6) / np.maximum(s1, 1e-9)) / signal.B_VALUE * 1e6,
                              0.0).astype(np.float32)
    out["s0"] = s0.astype(np.float32)
    for k in ("flair", "t1"):
        out[k] = np.mean([p[k] for p in planes], axis=0).astype(np.float32)
    return out
