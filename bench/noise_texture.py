"""How much anatomy the ADC noise estimator (``models.confidence.adc_noise``) reads as noise, on a real
scan and on the phantom.

Why: the core rule's noise support and the confidence's ``adc_noise`` part both read that estimator (the
MAD of the residual from a 3 x 3 in-plane median). On a clean image the residual holds anatomy, not
noise, and real anatomy is richer than the phantom's; if real texture alone read near the part's 150 x
10^-6 mm^2/s, clean real studies would lose their call. A pair of repeated acquisitions measures the
noise apart from the anatomy (their difference). The only real pair here is two time points of the
Siemens XA30 BOLD series in ../shared/realdata (their difference also holds physiology, so its noise is
an upper bound). On the phantom the noise is pinned (SNR 500), so what the estimator reads is texture.

Reference: the noise from the pair difference (real) and the signal median (both), as ratios. Quality,
not speed: no timing.

    python -m bench.noise_texture [--cases 8] [--seed 710000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage as ndi

from bench.core_rule import REALDATA
from models.confidence import adc_noise
from models.robust import robust_sd
from worker.pipeline.load import brain_mask

BOLD_PAIR = REALDATA / "dcm_qa_xa30" / "7_BOLD"


def texture_against_pair(first: np.ndarray, second: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """The estimator on each volume of a repeated pair against the pair's own noise (difference / sqrt 2),
    over the eroded brain the estimator itself uses."""
    region = ndi.binary_erosion(brain, iterations=2)
    noise = float(robust_sd((first - second)[region])) / np.sqrt(2.0)
    read = float(np.mean([adc_noise(v, brain) for v in (first, second)]))
    signal = float(np.median(0.5 * (first + second)[region]))
    texture = float(np.sqrt(max(read ** 2 - noise ** 2, 0.0)))
    return {"estimator": read, "pair_noise": noise, "ratio": read / noise, "snr": signal / noise,
            "texture_pct": 100.0 * texture / signal}


def bold_pair(folder: Path = BOLD_PAIR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two enhanced multi-frame BOLD volumes (z, y, x) and the service's own brain mask of their mean."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if len(files) < 2:
        raise FileNotFoundError(f"{folder}: two BOLD volumes expected, found {len(files)}")
    first, second = (pydicom.dcmread(f).pixel_array.astype(np.float32) for f in files[:2])
    brain = sitk.GetArrayFromImage(brain_mask(sitk.GetImageFromArray(0.5 * (first + second)))) > 0
    return first, second, brain


def phantom_floor(seeds: range) -> list[dict[str, float]]:
    """Per case drawn as ``synthperf phantom --family mixed --randomise`` draws it but with the DWI's SNR
    pinned at 500 (near noise-free): the estimator on b0 (as % of its signal) and on the ADC (10^-6
    mm^2/s, the core left out) -- both texture."""
    from phantom.api import make_case

    rows = []
    for seed in seeds:
        case = make_case(seed, family="mixed", randomise=True, acquisition={"dwi_snr": 500.0})
        region = ndi.binary_erosion(case.brain, iterations=2)
        b0 = case.b0.astype(np.float32)
        rows.append({"case": case.case_id, "b0_pct": 100.0 * adc_noise(b0, case.brain) / float(np.median(b0[region])),
                     "adc": adc_noise(case.adc, case.brain, case.core)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--seed", type=int, default=710000)
    args = ap.parse_args(argv)
    print(f"real pair: {BOLD_PAIR.relative_to(REALDATA.parent)}")
    real = texture_against_pair(*bold_pair())
    print(f"  estimator {real['estimator']:.1f}, pair noise {real['pair_noise']:.2f} (SNR {real['snr']:.0f}): "
          f"x{real['ratio']:.1f} the noise; texture {real['texture_pct']:.1f} % of the signal")
    rows = phantom_floor(range(args.seed, args.seed + args.cases))
    for r in rows:
        print(f"  phantom {r['case']}: b0 texture {r['b0_pct']:.1f} % of the signal, ADC {r['adc']:.0f}")
    pct = np.array([r["b0_pct"] for r in rows])
    print(f"phantom b0 texture {pct.min():.1f}-{pct.max():.1f} % (median {np.median(pct):.1f}); "
          f"real / phantom median x{real['texture_pct'] / np.median(pct):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
