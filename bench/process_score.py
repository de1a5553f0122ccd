"""The service's own path, scored: `synthperf process` on phantom DICOM studies against their truth.

Not a timing benchmark and not run by ``make bench``. `synthperf evaluate` scores the model on the
phantom's NIfTI volumes, FLAIR already on the DWI grid and the truth core as the model's conditioning
(the paper's protocol). The independent generator of issue 15 scores something else: DICOM in, through
`synthperf process` - series classification, loading with each vendor's headers, FLAIR registered onto
the DWI, the service's core rule, the model, the measures, the confidence. This runs that command on
every study of a phantom folder written *with* DICOM (``synthperf phantom`` without --training-only)
and scores its NIfTI maps against the truth volumes beside the DICOM, resampled onto the service's DWI
grid by world coordinates (so no axis convention is assumed).

Per study: Tmax>6 s Dice and volumes, the service's core against the truth core, the DEFUSE-3 call
raw (from the service's own volumes) and as served (withheld when the confidence is low), the false
Tmax>6 s volume on healthy brains, and any study the service failed on (nothing may be lost silently).

    .venv/bin/python -m bench.process_score runs/data/dicomG --out runs/process/dicomG
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import BAD_FALSE_ML, core_visible
from models.tmax_ddpm.metrics import defuse3, dice

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "a phantom folder written with DICOM and an --out folder"

#: the console script installed beside this interpreter (bench does not import cli)
SYNTHPERF = Path(sys.executable).with_name("synthperf")


def phantom_studies(root: Path) -> list[Path]:
    """Phantom case folders that hold DICOM and the truth volumes."""
    return sorted(p for p in root.iterdir()
                  if (p / "dicom").is_dir() and all((p / f"{n}.nii.gz").exists() for n in ("tmax", "core", "brain")))


def process(study: Path, out: Path, extra: list[str]) -> tuple[dict, float]:
    """Run `synthperf process STUDY/dicom --out OUT --nifti`; its result.json (or the failure) and seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(SYNTHPERF), "process", str(study / "dicom"), "--out", str(out), "--nifti", *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    result_file = out / "result.json"
    if not result_file.exists():
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no result.json"])[-1]}, seconds
    return json.loads(result_file.read_text()), seconds


def truth_on_grid(study: Path, reference: Any) -> dict[str, np.ndarray]:
    """The truth Tmax (linear), core and brain (nearest) resampled onto the grid of the SimpleITK image
    ``reference`` (the service's map)."""
    import SimpleITK as sitk

    from worker.pipeline.load import resample_to

    return {name: sitk.GetArrayFromImage(resample_to(sitk.ReadImage(str(study / f"{name}.nii.gz")), reference,
                                                     interpolator=interp))
            for name, interp in (("tmax", sitk.sitkLinear), ("core", sitk.sitkNearestNeighbor),
                                 ("brain", sitk.sitkNearestNeighbor))}


def score(study: Path, result: dict, seconds: float) -> dict:
    """One study's row (module docstring)."""
    import SimpleITK as sitk

    truth_json = json.loads((study / "truth.json").read_text()) if (study / "truth.json").exists() else {}
    row: dict = {"case": study.name, "family": truth_json.get("family", "geometric"),
                 "vendor": truth_json.get("vendor") or truth_json.get("vendor_style") or "",
                 "case_type": truth_json.get("case_type", ""), "seconds": round(seconds, 1), "ok": bool(result.get("ok"))}
    if not row["ok"]:
        row["error"] = str(result.get("error"))
        return row
    called = sitk.ReadImage(result["nifti"]["tmax6"])  # the service's Tmax>6 s map: its grid is the reference
    t = truth_on_grid(study, called)
    voxel_ml = float(np.prod(called.GetSpacing())) / 1000.0
    brain = t["brain"] > 0.5
    true6 = (np.nan_to_num(t["tmax"]) > 6) & brain
    true_core = (t["core"] > 0.5) & brain
    called6 = sitk.GetArrayFromImage(called) > 0
    core = sitk.GetArrayFromImage(sitk.ReadImage(result["nifti"]["core"])) > 0
    m = result["measures"]
    true_core_ml, true6_ml = float(true_core.sum()) * voxel_ml, float(true6.sum()) * voxel_ml
    conf = m.get("confidence") or {}
    row.update({
        "core_ml": true_core_ml, "service_core_ml": float(m["core_ml"]),
        "core_dice": dice(core, true_core) if true_core.any() else float("nan"),
        "true_tmax6_ml": true6_ml, "service_tmax6_ml": float(m["tmax6_ml"]),
        "dice6": dice(called6, true6),
        "no_stroke": true6_ml == 0 and true_core_ml == 0,
        "true_defuse3": defuse3(true_core_ml, true6_ml)["target"],
        "raw_defuse3": defuse3(float(m["core_ml"]), float(m["tmax6_ml"]))["target"],
        "served_defuse3": "withheld" if m.get("defuse3") is None else bool(m["defuse3"]),
        "confidence": conf.get("score"), "confidence_low": bool(conf.get("low")),
        "flair_registered": (result.get("registration") or {}).get("method", ""),
    })
    return row


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


def summary_lines(rows: list[dict]) -> list[str]:
    """The pooled figures, overall and per family."""
    lines = []
    groups = [("all", rows)] + [(f, [r for r in rows if r["family"] == f]) for f in sorted({r["family"] for r in rows})]
    for label, rs in groups:
        ok = [r for r in rs if r["ok"]]
        stroke = [r for r in ok if not r["no_stroke"]]
        with_core = [r["dice6"] for r in stroke if core_visible(r["core_ml"])]
        no_core = [r["dice6"] for r in stroke if not core_visible(r["core_ml"])]
        healthy = [r for r in ok if r["no_stroke"]]
        served = [r for r in ok if r["served_defuse3"] != "withheld"]
        false_ml = [r["service_tmax6_ml"] for r in healthy]
        lines.append(
            f"{label}: {len(rs)} studies, {len(rs) - len(ok)} failed | Dice>6 stroke "
            f"{_mean([r['dice6'] for r in stroke]):.3f} (core {_mean(with_core):.3f} n={len(with_core)} / no core "
            f"{_mean(no_core):.3f} n={len(no_core)}) | core Dice "
            f"{_mean([r['core_dice'] for r in ok if np.isfinite(r['core_dice'])]):.3f} | DEFUSE-3 raw "
            f"{_mean([r['raw_defuse3'] == r['true_defuse3'] for r in ok]):.3f}, served "
            f"{_mean([r['served_defuse3'] == r['true_defuse3'] for r in served]):.3f} on {len(served)} | healthy "
            f"{len(healthy)}: median false {np.median(false_ml) if false_ml else float('nan'):.1f} mL, over "
            f"{BAD_FALSE_ML:.0f} mL {sum(v > BAD_FALSE_ML for v in false_ml)}, yes raw "
            f"{sum(r['raw_defuse3'] for r in healthy)} served {sum(r['served_defuse3'] is True for r in healthy)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="phantom folder written with DICOM (synthperf phantom without --training-only)")
    ap.add_argument("--out", type=Path, required=True, help="one `synthperf process` output per study, and per_case.csv")
    ap.add_argument("--limit", type=int, help="only the first N studies")
    ap.add_argument("--model", help="model name or weights folder (default: the service's)")
    args = ap.parse_args(argv)
    studies = phantom_studies(args.data)[: args.limit]
    if not studies:
        print(f"error: no phantom study with dicom/ and truth volumes in {args.data}", file=sys.stderr)
        return 2
    extra = ["--model", args.model] if args.model else []
    rows = []
    for i, study in enumerate(studies, 1):
        result, seconds = process(study, args.out / study.name, extra)
        rows.append(score(study, result, seconds))
        r = rows[-1]
        print(f"[{i}/{len(studies)}] {study.name} {r['family']} {r['case_type']}: " + (
            f"Dice>6 {r['dice6']:.2f}, Tmax>6 {r['service_tmax6_ml']:.0f}/{r['true_tmax6_ml']:.0f} mL, core "
            f"{r['service_core_ml']:.1f}/{r['core_ml']:.1f} mL, DEFUSE-3 {r['true_defuse3']} -> {r['raw_defuse3']} "
            f"(served {r['served_defuse3']}), {r['seconds']:.0f} s" if r["ok"] else f"FAILED: {r['error']}"), flush=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    with open(args.out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print("\n".join(summary_lines(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
