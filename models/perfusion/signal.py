"""DSC signal to concentration, and the checks that decide whether a series can be trusted.

Gradient-echo DSC: ``S(t) = S0 exp(-TE * dR2*(t))`` and ``dR2*`` is taken as proportional to the
contrast concentration, so ``C(t) ~ dR2*(t) = -ln(S(t)/S0)/TE`` (Rosen et al., MRM 1990). ``S0`` is
the mean of the pre-bolus baseline, which is found on the whole-brain mean curve: the first frames
are skipped (T1 steady state), and the bolus arrives at the first frame that falls more than
3 baseline standard deviations below the running baseline.

Checks (each returns a flag and numbers, so the caller can warn instead of mapping silently):
* **truncation** - the whole-brain bolus must wash out before the series ends: after its peak the
  mean concentration has to fall below half of the peak and end below ``truncation_fraction`` of it;
* **short baseline** - fewer than 3 baseline frames;
* **motion** - the centre of mass of the head mask in every frame, in mm against the median position
  (a threshold on the pre-bolus mean image is insensitive to the contrast-induced signal drop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SKIP_FRAMES = 2


@dataclass
class Bolus:
    """Timing of the whole-brain bolus (frame indices) and the curve it was found on."""

    baseline_start: int
    arrival: int  # first frame of the bolus
    peak: int
    washout: int | None  # first frame after the peak below half the peak; None if never
    mean_conc: np.ndarray
    truncated: bool
    short_baseline: bool
    end_fraction: float  # last-frame mean concentration / peak

    def to_dict(self, dt: float) -> dict:
        return {"baseline_frames": [self.baseline_start, self.arrival],
                "arrival_s": round(self.arrival * dt, 3), "peak_s": round(self.peak * dt, 3),
                "washout_s": None if self.washout is None else round(self.washout * dt, 3),
                "end_fraction_of_peak": round(self.end_fraction, 4),
                "truncated": self.truncated, "short_baseline": self.short_baseline}


@dataclass
class Motion:
    """Per-frame head displacement (mm) against the median position."""

    displacement_mm: np.ndarray
    max_mm: float
    moved: bool
    threshold_mm: float
    frames_over: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"max_displacement_mm": round(self.max_mm, 3), "moved": self.moved,
                "threshold_mm": self.threshold_mm, "frames_over": self.frames_over[:20]}


def detect_bolus(mean_signal: np.ndarray, truncation_fraction: float = 0.5) -> Bolus:
    """Baseline, arrival, peak and wash-out on a whole-brain mean signal curve (t,)."""
    s = np.asarray(mean_signal, dtype=np.float64)
    n = s.size
    if s.ndim != 1 or n < 10:
        raise ValueError(f"mean_signal must be a 1-D curve of at least 10 frames, got shape {s.shape}")
    if not 0 < truncation_fraction < 1:
        raise ValueError(f"truncation_fraction must be in (0, 1), got {truncation_fraction!r}")
    b0 = min(SKIP_FRAMES, n // 10)
    tmin = int(np.argmin(s))
    arrival = tmin
    for j in range(b0 + 3, max(tmin, b0 + 3)):
        base = s[b0:j]
        sd = max(float(base.std(ddof=1)), 0.002 * float(base.mean()))
        if s[j] < base.mean() - 3.0 * sd:
            arrival = j
            break
    arrival = max(arrival, b0 + 1)
    s0 = float(s[b0:arrival].mean())
    conc = -np.log(np.clip(s / max(s0, 1e-9), 1e-6, None))
    conc[:b0] = 0.0
    peak = int(np.argmax(conc))
    top = max(float(conc[peak]), 1e-12)
    after = np.nonzero(conc[peak:] < 0.5 * top)[0]
    washout = None if after.size == 0 else int(peak + after[0])
    end_fraction = float(np.mean(conc[-2:]) / top)
    truncated = washout is None or end_fraction > truncation_fraction
    return Bolus(baseline_start=b0, arrival=arrival, peak=peak, washout=washout, mean_conc=conc,
                 truncated=bool(truncated), short_baseline=bool(arrival - b0 < 3), end_fraction=end_fraction)


def concentration(signal: np.ndarray, bolus: Bolus, te_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Delta R2* (1/s) per frame and voxel, the baseline S0 and the baseline temporal SD.

    ``signal`` is (t, voxels). Frames before the baseline start are set to 0.
    """
    if not np.isfinite(te_s) or te_s <= 0:
        raise ValueError(f"te_s must be a positive echo time in seconds, got {te_s!r}")
    sig = np.asarray(signal, dtype=np.float32)
    base = sig[bolus.baseline_start:bolus.arrival]
    s0 = base.mean(axis=0)
    sd = base.std(axis=0, ddof=1) if base.shape[0] > 1 else np.zeros_like(s0)
    floor = np.maximum(s0 * 1e-3, 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(sig, floor) / np.maximum(s0, floor)
    conc = (-np.log(ratio) / te_s).astype(np.float32)
    conc[:bolus.baseline_start] = 0.0
    conc[:, s0 <= 0] = 0.0
    return conc, s0, sd


def motion_check(series: np.ndarray, spacing_zyx: tuple[float, float, float], bolus: Bolus,
                 threshold_mm: float = 2.0) -> Motion:
    """Head centre-of-mass displacement per frame for a (t, z, y, x) series."""
    if threshold_mm <= 0:
        raise ValueError(f"threshold_mm must be positive, got {threshold_mm!r}")
    ref = series[bolus.baseline_start:bolus.arrival].mean(axis=0)
    bright = ref[ref > ref.mean()]
    thr = 0.2 * float(np.median(bright)) if bright.size else 0.0
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    grids = np.indices(ref.shape, dtype=np.float32)
    com = np.empty((series.shape[0], 3))
    for t in range(series.shape[0]):  # one frame at a time: bounded memory on a 128^2 x 25 x 60 series
        m = series[t] > thr
        cnt = max(int(m.sum()), 1)
        com[t] = [float(g[m].sum()) / cnt for g in grids]
    d = np.linalg.norm((com - np.median(com, axis=0)) * sp, axis=1)
    over = [int(i) for i in np.nonzero(d > threshold_mm)[0]]
    return Motion(displacement_mm=d, max_mm=float(d.max()), moved=bool(over), threshold_mm=threshold_mm,
                  frames_over=over)
