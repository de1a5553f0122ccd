"""What the service's brain mask does to the synthetic Tmax, against the mask the model was trained with.

Not a timing benchmark and not run by ``make bench``. The model is trained on phantom cases whose brain
mask is the phantom's true brain; the service makes its own from the b0 (``worker.pipeline.load.
brain_mask``: the brain and the CSF around it). Outside its mask the model sees background, so a larger
mask shows it a rim it never saw. This samples each held-out case twice, with the true brain and with the
service's mask made from the case's b0.nii.gz, everything else equal (truth core, same seed), and counts
Tmax>6 s inside the service's mask as the service does: false volume on healthy brains, Dice on strokes.

    .venv/bin/python -m bench.brain_mask_effect runs/data/setA runs/data/setB
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.tmax_ddpm.data import Case, list_cases, load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import dice, volume_ml

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "held-out phantom case folders with b0.nii.gz (synthperf phantom --training-only)"


def service_mask(case: Case) -> np.ndarray:
    """The service's brain mask made from the case's b0 (z, y, x), on the case's own grid."""
    import SimpleITK as sitk

    from worker.pipeline.load import brain_mask

    img = sitk.GetImageFromArray(case.images["b0"].astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in reversed(case.spacing_zyx)))
    return sitk.GetArrayFromImage(brain_mask(img)).astype(bool)


def case_row(synth: TmaxSynthesizer, case_dir: Path) -> dict:
    """One case sampled with each mask; volumes and Dice counted inside the service's mask."""
    case = load_case(case_dir, ("dwi", "flair", "adc", "core", "tmax", "brain", "b0"))
    im, true_brain = case.images, case.brain
    served = service_mask(case)
    voxel_ml = float(np.prod(case.spacing_zyx)) / 1000.0
    truth6 = (np.nan_to_num(im["tmax"]) > 6) & true_brain
    row = {"case": case.case_id, "stroke": bool(truth6.any() or (im["core"] > 0.5).any()),
           "mask_ratio": float(served.sum() / max(true_brain.sum(), 1)), "mask_dice": dice(served, true_brain)}
    for name, mask in (("true_brain", true_brain), ("service_mask", served)):
        res = synth.synthesize(im["dwi"], im["flair"], (im["core"] > 0.5).astype(np.float32), mask, adc=im["adc"],
                               spacing_zyx=case.spacing_zyx, seed=0)
        called = (res.mean > 6) & served
        row[f"{name}_tmax6_ml"] = volume_ml(called, voxel_ml)
        row[f"{name}_dice6"] = dice(called, truth6)
    return row


def summary(rows: list[dict]) -> list[str]:
    """Healthy brains' false volume and strokes' Dice with each mask."""
    healthy, stroke = [r for r in rows if not r["stroke"]], [r for r in rows if r["stroke"]]
    lines = [f"{len(rows)} cases: service mask / true brain size median {np.median([r['mask_ratio'] for r in rows]):.2f}x "
             f"(max {max(r['mask_ratio'] for r in rows):.2f}x), mask Dice {np.mean([r['mask_dice'] for r in rows]):.3f}"]
    for name in ("true_brain", "service_mask"):
        false_ml = [r[f"{name}_tmax6_ml"] for r in healthy]
        lines.append(
            f"model given the {name.replace('_', ' ')}: healthy {len(healthy)} false Tmax>6 s mean "
            f"{np.mean(false_ml) if false_ml else float('nan'):.1f} mL, max {max(false_ml, default=float('nan')):.1f}, "
            f"over 15 mL {sum(v > 15 for v in false_ml)} | stroke {len(stroke)} Dice "
            f"{np.mean([r[f'{name}_dice6'] for r in stroke]) if stroke else float('nan'):.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", type=Path, help="folders of held-out cases with b0.nii.gz (synthperf phantom)")
    ap.add_argument("--model", default="demo")
    args = ap.parse_args(argv)
    synth = TmaxSynthesizer.load(args.model, device="cpu")
    rows = []
    for d in args.data:
        for case_dir in list_cases(d, require=("dwi", "flair", "adc", "core", "tmax", "brain", "b0")):
            rows.append(case_row(synth, case_dir))
            r = rows[-1]
            print(f"{r['case']}: mask {r['mask_ratio']:.2f}x, Tmax>6 s {r['true_brain_tmax6_ml']:.1f} -> "
                  f"{r['service_mask_tmax6_ml']:.1f} mL, Dice {r['true_brain_dice6']:.2f} -> {r['service_mask_dice6']:.2f}",
                  flush=True)
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
