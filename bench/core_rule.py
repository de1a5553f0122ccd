"""Core rule vs the bare threshold, side by side: what the DWI evidence and artefact screening buy.

Reference: "ADC < 620e-6 mm^2/s inside the brain" alone (the RAPID-style threshold with no DWI
criterion and no cleaning), and the same with components < 0.1 mL dropped. Candidate: the full rule
(worker.pipeline.core.segment_core). On phantom make_case arrays (seeds 0..N-1) and on the real
ISLES'22 case. ``python -m bench.core_rule [N]`` (default 30 seeds).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from worker.pipeline.core import segment_core

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def bare(adc_u: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return brain & (adc_u > 0) & (adc_u < 620.0)


def bare_cleaned(adc_u: np.ndarray, brain: np.ndarray, voxel_ml: float) -> np.ndarray:
    m = bare(adc_u, brain)
    lab, n = ndi.label(m, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes * voxel_ml >= 0.1
    keep[0] = False
    return keep[lab]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def phantom(n: int) -> dict[str, dict[str, float]]:
    from phantom.api import make_case

    names = ("bare threshold", "threshold + 0.1 mL", "synthperf rule")
    dices: dict[str, list[float]] = {k: [] for k in names}
    errs: dict[str, list[float]] = {k: [] for k in names}
    fps: dict[str, list[float]] = {k: [] for k in names}
    secs: list[float] = []
    for seed in range(n):
        c = make_case(seed)
        ml = float(np.prod(c.spacing_zyx)) / 1000.0
        t0 = time.perf_counter()
        rule = segment_core(c.adc, c.dwi, c.brain, c.spacing_zyx, direction=c.direction).mask
        secs.append(time.perf_counter() - t0)
        masks = {names[0]: bare(c.adc, c.brain), names[1]: bare_cleaned(c.adc, c.brain, ml), names[2]: rule}
        for k, m in masks.items():
            errs[k].append(abs(float(m.sum()) - float(c.core.sum())) * ml)
            if c.core.any():
                dices[k].append(dice(m, c.core))
            else:
                fps[k].append(float(m.sum()) * ml)
    out = {}
    for k in names:
        out[k] = {"median_dice": float(np.median(dices[k])), "median_abs_err_ml": float(np.median(errs[k])),
                  "max_fp_ml_core_free": max(fps[k], default=0.0)}
    out["_"] = {"cases": n, "with_core": len(dices[names[2]]), "rule_s_median": float(np.median(secs))}
    return out


def isles() -> dict[str, dict[str, float]] | None:
    case = REALDATA / "isles22"
    if not case.is_dir():
        return None
    from tests.unit.test_core_isles import load_isles

    d = load_isles(REALDATA)
    ml = float(np.prod(d["spacing"])) / 1000.0
    adc_u = d["adc"] * 1000.0
    zs = np.flatnonzero(d["brain"].any(axis=(1, 2)))
    low_third = zs.min() + (zs.max() - zs.min()) // 3
    mid = float(np.nonzero(d["brain"])[2].mean())
    rule = segment_core(d["adc"], d["dwi"], d["brain"], d["spacing"], direction=d["direction"]).mask
    out = {}
    for k, m in (("bare threshold", bare(adc_u, d["brain"])), ("threshold + 0.1 mL", bare_cleaned(adc_u, d["brain"], ml)),
                 ("synthperf rule", rule)):
        xs = np.nonzero(m)[2]
        out[k] = {"core_ml": float(m.sum()) * ml, "left_fraction": float((xs > mid).mean()) if xs.size else 0.0,
                  "inferior_third_ml": float(m[: low_third + 1].sum()) * ml}
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    p = phantom(n)
    meta = p.pop("_")
    print(f"phantom: {meta['cases']} make_case studies, {meta['with_core']} with a core; "
          f"rule {meta['rule_s_median']:.2f} s/case (median)")
    print(f"{'method':22s} {'median Dice':>12s} {'median |err| mL':>16s} {'max FP mL (no core)':>20s}")
    for k, v in p.items():
        print(f"{k:22s} {v['median_dice']:12.3f} {v['median_abs_err_ml']:16.2f} {v['max_fp_ml_core_free']:20.2f}")
    ref = p["threshold + 0.1 mL"]
    rule = p["synthperf rule"]
    print(f"rule / (threshold + 0.1 mL): Dice x{rule['median_dice'] / max(ref['median_dice'], 1e-9):.2f}, "
          f"|err| x{rule['median_abs_err_ml'] / max(ref['median_abs_err_ml'], 1e-9):.3f}")
    i = isles()
    if i is not None:
        print("ISLES'22 sub-strokecase0001 (real; lesions: small left-hemisphere foci):")
        for k, v in i.items():
            print(f"  {k:22s} core {v['core_ml']:7.2f} mL, left fraction {v['left_fraction']:.2f}, "
                  f"inferior third {v['inferior_third_ml']:6.2f} mL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
