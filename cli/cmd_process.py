"""``synthperf process STUDY_DIR --out OUT_DIR``: the whole pipeline offline, no server needed.

Writes the DICOM objects (OUT_DIR/dicom), ``result.json`` (measures, the series chosen and why,
timings per stage, software and model versions) and, with ``--nifti``, tmax.nii.gz,
tmax_sd.nii.gz, core.nii.gz and tmax6.nii.gz on the DWI grid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MEASURE_KEYS = ("core_ml", "tmax6_ml", "tmax10_ml", "mismatch_ml", "mismatch_ratio", "hir", "defuse3", "extend",
                "confidence")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("process", help="run the pipeline offline on a folder of DICOM files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", type=Path, help="folder with the study's DICOM files (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--nifti", action="store_true", help="also write NIfTI maps on the DWI grid")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: settings ddim_steps, else the model's benchmark-chosen default)")
    p.add_argument("--samples", type=int, default=None, help="samples for mean/SD (default: settings samples, else the model's default)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: settings seed)")
    p.add_argument("--model", default=None, help="model name or weights folder (default: settings model_name)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--inference-path", default=None,
                   help="how the network runs: auto (measured here, cached in data_dir/runtime) or fp32, channels_last, "
                        "bf16, compile, onnxruntime, openvino (default: settings inference_path)")
    p.add_argument("--keep-work", action="store_true", help="keep intermediate arrays in OUT_DIR/work")
    p.add_argument("--config", default=None, help="YAML settings file")
    p.set_defaults(func=run)


def write_nifti(out: Path, work: Path, settings: Any) -> dict[str, str]:
    """NIfTI copies of the maps on the DWI grid (SimpleITK converts LPS to the NIfTI convention)."""
    import SimpleITK as sitk

    meta = json.loads((work / "load.json").read_text())["geometry"]
    with np.load(work / "tmax.npz") as t, np.load(work / "core.npz") as c, np.load(work / "volumes.npz") as v:
        brain = v["brain"].astype(bool)
        maps = {
            "tmax": t["mean"].astype(np.float32),
            "tmax_sd": t["sd"].astype(np.float32),
            "core": c["core"].astype(np.uint8),
            "tmax6": ((t["mean"] > settings.tmax_hypoperfusion_s) & brain).astype(np.uint8),
        }
    written = {}
    for name, arr in maps.items():
        img = sitk.GetImageFromArray(arr)
        img.SetOrigin(tuple(meta["origin"]))
        img.SetSpacing(tuple(meta["spacing"]))
        img.SetDirection(tuple(meta["direction"]))
        path = out / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        written[name] = str(path)
    return written


def run(args: argparse.Namespace) -> int:
    from common.config import load_settings
    from common.errors import SynthperfError
    from worker.pipeline.run import STAGES, Context, MemoryRecorder, RunOptions, run_stages, software_version

    if not args.study_dir.is_dir():
        print(f"error: {args.study_dir} is not a folder", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    try:
        options = RunOptions.from_settings(settings, steps=args.steps, samples=args.samples, seed=args.seed,
                                           model_name=args.model, device=args.device,
                                           inference_path=args.inference_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings=settings, job_dir=out, input_paths=[args.study_dir], study_uid="", job_version=1,
                  options=options)
    rec = MemoryRecorder()
    t0 = time.perf_counter()
    status = 0
    try:
        run_stages(ctx, rec, [s for s in STAGES if s != "push"])
    except SynthperfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except Exception as exc:  # noqa: BLE001
        print(f"error: internal error {type(exc).__name__}: {exc} (a bug in synthperf)", file=sys.stderr)
        status = 3
    result: dict[str, Any] = {"study_dir": str(args.study_dir)}
    measures = rec.result.get("measures") or {}
    result.update({k: measures.get(k) for k in MEASURE_KEYS})
    result["measures"] = measures
    result["series"] = {"selected": rec.result.get("series"), "classification": rec.result.get("classification")}
    result["registration"] = rec.result.get("registration")
    result["core"] = rec.result.get("core")  # method, core_ml, strict_adc620_ml, partial_volume_ml
    result["perfusion"] = rec.result.get("perfusion")  # real, DSC-derived measures when a DSC came
    result["timings_s"] = {name: st.get("duration_s") for name, st in rec.stages.items()}
    result["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    result["stages"] = {name: {k: v for k, v in st.items() if k not in ("detail",)} for name, st in rec.stages.items()}
    result["warnings"] = [f"{n}: {w}" for n, st in rec.stages.items() for w in st.get("warnings", [])]
    synth = rec.stages.get("synthesize", {}).get("detail", {})
    result["versions"] = {"synthperf": software_version(), "model": options.model_name,
                          "model_version": synth.get("model_version"), "steps": synth.get("steps", options.steps),
                          "samples": synth.get("samples", options.samples), "seed": options.seed,
                          "device": synth.get("device"), "inference": synth.get("inference")}
    result["outputs"] = rec.result.get("outputs")
    result["ok"] = status == 0
    if status == 0 and args.nifti:
        result["nifti"] = write_nifti(out, ctx.work, settings)
    failed = [n for n, st in rec.stages.items() if st.get("state") == "failed"]
    if failed:
        result["error"] = rec.stages[failed[0]].get("error")
    from worker.pipeline.run import _jsonable

    (out / "result.json").write_text(json.dumps(_jsonable(result), indent=1))
    if not args.keep_work and (out / "work").is_dir():
        shutil.rmtree(out / "work")
    if status == 0:
        m = result
        conf = m.get("confidence") or {}
        call = "withheld (low confidence)" if m["defuse3"] is None else ("yes" if m["defuse3"] else "no")
        print(f"core {m['core_ml']:.1f} mL, Tmax>6s {m['tmax6_ml']:.1f} mL, mismatch {m['mismatch_ml']:.1f} mL, "
              f"DEFUSE-3 {call} (SYNTHETIC - not for diagnostic use)")
        if conf:
            print(f"confidence {conf.get('score', 0):.2f} ({'LOW' if conf.get('low') else 'ok'}, threshold "
                  f"{conf.get('threshold')}){': ' + '; '.join(conf.get('reasons') or []) if conf.get('low') else ''}")
        print(f"wrote {result['outputs']['count'] if result['outputs'] else 0} DICOM objects and result.json to {out}")
    return status
