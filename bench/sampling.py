"""Sampling benchmark for the Tmax diffusion model: every inference path side by side, speed, Dice
versus steps and samples, how many samples the uncertainty map needs, the 1000-step ancestral
reference, and slice-to-slice consistency.

    python -m bench.sampling [--model demo] [--data runs/data/heldout] [--cases 8] [--ancestral-cases 2]
    python -m bench.sampling --paths-only [--device cuda]

References for the ratios: fp32 eager torch for the inference paths (same study, same seed, same
run); the 1000-step ancestral DDPM sampler (the training chain) for the DDIM steps. Records the CPU
capability it ran on. Writes its figures into docs/benchmarks.md (section "Tmax diffusion model —
sampling") and prints them. Held-out phantom cases come from `synthperf phantom --out
runs/data/heldout --cases 8 --seed 100000 --vendor mixed --training-only` (made here if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.tmax_ddpm.data import list_cases, load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import dice
from models.tmax_ddpm.runtime import CUDA_PATHS, PATHS, PROBE_BATCH, TOLERANCE_S, CpuFeatures

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench.sampling:begin -->", "<!-- bench.sampling:end -->"


def paths_markers(machine: dict) -> tuple[str, str]:
    """One block per kind of machine (CPU capability, or the GPU), so each keeps its latest figures."""
    kind = machine["capability"] if machine["device"] == "cpu" else re.sub(r"\W+", "-", machine["device"]).strip("-")
    return f"<!-- bench.sampling.paths.{kind}:begin -->", f"<!-- bench.sampling.paths.{kind}:end -->"


def run_case(synth: TmaxSynthesizer, case, **kw) -> tuple[np.ndarray, float]:
    im = case.images
    t0 = time.perf_counter()
    r = synth.synthesize(im["dwi"], im["flair"], im["core"], im["brain"], adc=im.get("adc"),
                         spacing_zyx=case.spacing_zyx, **kw)
    return r.mean, time.perf_counter() - t0


def z_roughness(vol: np.ndarray, brain: np.ndarray) -> float:
    """Mean |Tmax(z+1) - Tmax(z)| (s) over voxels inside the brain on both slices."""
    m = brain[1:] & brain[:-1]
    return float(np.abs(np.diff(vol, axis=0))[m].mean())


def central(case, n: int):
    """The central n slices of a case."""
    nz = case.images["dwi"].shape[0]
    s = max(0, (nz - n) // 2)
    sub = {k: v[s : s + n] for k, v in case.images.items()}
    return type(case)(case.case_id, sub, case.spacing_zyx, case.truth)


def study_25(case):
    """The central 25 slices of a case: the 25-slice 128^2 study of the speed target."""
    return central(case, 25)


def ensure_heldout(data: str, n: int) -> None:
    """Make the held-out phantom cases the figures are measured on, if this machine has none yet."""
    if Path(data).is_dir() and len(list_cases(data)) >= n:
        return
    subprocess.run([sys.executable, "-m", "cli.main", "phantom", "--out", data, "--cases", str(n), "--seed", "100000",
                    "--vendor", "mixed", "--training-only"], check=True)


def bench_paths(model: str, device: str, study, skip: set[str]) -> dict:
    """Every inference path forced in turn on one study (default steps x samples), side by side.

    Per path: one-off setup (export/compile/first call), the best of two full syntheses, and the max
    |Tmax - Tmax_fp32| (s) inside the brain. Then what ``auto`` picks here, measured afresh.
    """
    im = study.images
    brain = im["brain"] > 0
    names = list(CUDA_PATHS if device.startswith("cuda") else PATHS)
    native_bf16 = CpuFeatures.detect().native_bf16
    rows, ref = [], None
    tmp = Path(tempfile.mkdtemp(prefix="bench_paths_"))
    for name in names:
        row = {"path": name}
        if name in skip:
            row["error"] = "skipped (--skip)"
            rows.append(row)
            continue
        if name == "bf16" and device == "cpu" and not native_bf16:
            row["error"] = "not a candidate: no native bf16 on this CPU (emulated bf16 was measured 33x slower than fp32 on an AVX2 EPYC, issue 14)"
            rows.append(row)
            continue
        try:
            synth = TmaxSynthesizer.load(model, device=device, inference_path=name, runtime_dir=tmp)
            t0 = time.perf_counter()
            run_case(synth, study, seed=0)
            row["setup_s"] = time.perf_counter() - t0
            best, out = float("inf"), None
            for _ in range(2):
                out, sec = run_case(synth, study, seed=0)
                best = min(best, sec)
            row["study_s"] = best
            if ref is None:
                ref = out
            row["max_abs_tmax_s"] = float(np.abs(out - ref)[brain].max())
            row["mean_abs_tmax_s"] = float(np.abs(out - ref)[brain].mean())
        except Exception as exc:  # noqa: BLE001 - a path that cannot run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        print(f"path {name:14s} " + (f"{row['study_s']:6.2f} s/study  setup {row['setup_s']:6.1f} s  max|dTmax| "
              f"{row['max_abs_tmax_s']:.3f} s" if "study_s" in row else row["error"]), flush=True)
    fp32 = next(r for r in rows if r["path"] == "fp32")
    for r in rows:
        if "study_s" in r:
            r["ratio_vs_fp32"] = r["study_s"] / fp32["study_s"]
    auto = TmaxSynthesizer.load(model, device=device, runtime_dir=tmp / "auto")
    run_case(auto, study, steps=1, samples=1)  # the first synthesis measures the candidates on this study
    chosen = auto.runtime.path
    chosen_row = next((r for r in rows if r["path"] == chosen and "study_s" in r), None)
    ok = [r for r in rows if "study_s" in r]
    fastest = min(ok, key=lambda r: r["study_s"])
    res = {"rows": rows, "auto": chosen, "auto_trials": [t.__dict__ for t in auto.runtime.trials],
           "auto_skipped": auto.runtime.skipped, "auto_ratio_vs_fp32": chosen_row["ratio_vs_fp32"] if chosen_row else None,
           "fastest": fastest["path"], "fastest_ratio_vs_fp32": fastest["ratio_vs_fp32"], "tolerance_s": TOLERANCE_S,
           "shape": list(im["dwi"].shape)}
    print(f"auto picks {chosen}: {res['auto_ratio_vs_fp32']:.2f}x the fp32 eager time per study "
          f"(fastest here: {fastest['path']} {fastest['ratio_vs_fp32']:.2f}x)", flush=True)
    if res["auto_ratio_vs_fp32"] is not None and res["auto_ratio_vs_fp32"] > 1.0:
        print("WARNING: the default path is slower than fp32 eager on this machine", flush=True)
    return res


def uncertainty_stability(synth: TmaxSynthesizer, cases, counts: list[int], ref_samples: int) -> list[dict]:
    """How many samples the SD (uncertainty) map needs: each count's SD map against a ``ref_samples``
    map from other seeds, inside the brain: correlation and median relative difference."""
    out = []
    refs = []
    for c in cases:
        im = c.images
        r = synth.synthesize(im["dwi"], im["flair"], im["core"], im["brain"], adc=im.get("adc"), samples=ref_samples,
                             seed=1000)
        refs.append(r.sd)
    for n in counts:
        cors, rels, secs = [], [], []
        for c, ref in zip(cases, refs, strict=True):
            im = c.images
            b = im["brain"] > 0
            t0 = time.perf_counter()
            r = synth.synthesize(im["dwi"], im["flair"], im["core"], im["brain"], adc=im.get("adc"), samples=n, seed=0)
            secs.append(time.perf_counter() - t0)
            a, bref = r.sd[b], ref[b]
            cors.append(float(np.corrcoef(a, bref)[0, 1]))
            rels.append(float(np.median(np.abs(a - bref)) / max(float(np.median(bref)), 1e-6)))
        out.append({"samples": n, "sd_correlation": float(np.mean(cors)), "sd_median_rel_diff": float(np.mean(rels)),
                    "seconds_per_case": float(np.mean(secs))})
        print(f"uncertainty: {n:3d} samples: SD map r={out[-1]['sd_correlation']:.3f} vs {ref_samples} samples, "
              f"median |dSD|/SD {out[-1]['sd_median_rel_diff']:.2f}, {out[-1]['seconds_per_case']:.1f} s/case", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="runs/data/heldout")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--ancestral-cases", type=int, default=2)
    ap.add_argument("--ancestral-slices", type=int, default=0,
                    help="central slices per case for the 1000-step comparison (0: all); DDIM runs on the same slices")
    ap.add_argument("--steps", default="1,2,5,10,20,50")
    ap.add_argument("--samples", default="1,2,4,8")
    ap.add_argument("--curve-samples", type=int, default=0, help="samples for the Dice-vs-steps curve (0: the default)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--paths-only", action="store_true", help="only the inference paths side by side")
    ap.add_argument("--no-paths", action="store_true", help="skip the inference paths (curves only)")
    ap.add_argument("--skip", default="", help="comma-separated paths not to time (e.g. compile)")
    ap.add_argument("--uncertainty-samples", default="2,4,8,16")
    ap.add_argument("--uncertainty-cases", type=int, default=3)
    ap.add_argument("--uncertainty-steps", type=int, default=0, help="DDIM steps for the uncertainty table (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_heldout(args.data, args.cases)
    feats = CpuFeatures.detect()
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ)
    machine = {"command": (env + " " if env else "") + "python -m bench.sampling " + " ".join(argv if argv is not None else sys.argv[1:]),
               "capability": feats.capability, "native_bf16": feats.native_bf16, "cpu": feats.name,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(0)}
    print(f"machine: {machine}", flush=True)
    synth = TmaxSynthesizer.load(args.model, device=args.device)
    d_steps, d_samples = synth.cfg.sample.steps, synth.cfg.sample.samples
    cases = [load_case(p) for p in list_cases(args.data)[: args.cases]]
    res: dict = {"model": synth.source, "model_info": synth.info, "cases": len(cases), "threads": torch.get_num_threads(),
                 "defaults": {"steps": d_steps, "samples": d_samples}, "machine": machine}
    tall = [c for c in cases if c.images["dwi"].shape[0] >= 25] or cases
    if not args.no_paths:
        res["paths"] = bench_paths(args.model, args.device, study_25(tall[0]), {p for p in args.skip.split(",") if p})
    if args.paths_only:
        _finish(res, args, paths_only=True)
        return 0

    def mean_dice(step: int, samples: int, subset, **kw) -> tuple[float, float, list[float]]:
        ds, ts = [], []
        for c in subset:
            pred, sec = run_case(synth, c, steps=step, samples=samples, seed=0, **kw)
            b = c.images["brain"] > 0
            ds.append(dice((pred > 6) & b, (c.images["tmax"] > 6) & b))
            ts.append(sec)
        return float(np.mean(ds)), float(np.mean(ts)), ds

    # 1. speed of the default settings on a 25-slice 128^2 study, on the path auto picks here
    s25 = study_25(tall[0])
    run_case(synth, s25, steps=1, samples=1)  # warm-up
    secs = [run_case(synth, s25)[1] for _ in range(2)]
    res["speed_25x128"] = {"seconds": min(secs), "target_s": 20.0, "shape": list(s25.images["dwi"].shape),
                           "path": synth.runtime.path if synth.runtime else "?"}
    print(f"default ({d_steps} steps x {d_samples} samples) on {s25.images['dwi'].shape}: {min(secs):.1f} s", flush=True)

    # 2. Dice vs DDIM steps
    curve = []
    cs = args.curve_samples or d_samples
    for st in [int(s) for s in args.steps.split(",")]:
        dm, tm, _ = mean_dice(st, cs, cases)
        curve.append({"steps": st, "samples": cs, "dice6": dm, "seconds_per_case": tm})
        print(f"steps {st:4d} samples {cs}: Dice>6 {dm:.3f}  {tm:.1f} s/case", flush=True)
    res["dice_vs_steps"] = curve

    # 3. Dice vs samples (default steps)
    sc = []
    for n in [int(s) for s in args.samples.split(",")]:
        dm, tm, _ = mean_dice(d_steps, n, cases)
        sc.append({"steps": d_steps, "samples": n, "dice6": dm, "seconds_per_case": tm})
        print(f"steps {d_steps} samples {n}: Dice>6 {dm:.3f}  {tm:.1f} s/case", flush=True)
    res["dice_vs_samples"] = sc

    # 3b. how many samples the uncertainty (SD) map needs to be stable
    counts = [int(s) for s in args.uncertainty_samples.split(",") if s]
    if counts and args.uncertainty_cases:
        d = synth.cfg.sample.steps
        synth.cfg.sample.steps = args.uncertainty_steps or d
        res["uncertainty"] = uncertainty_stability(synth, cases[: args.uncertainty_cases], counts, 32)
        res["uncertainty_steps"] = synth.cfg.sample.steps
        synth.cfg.sample.steps = d

    # 4. the 1000-step ancestral DDPM reference vs default DDIM steps, one sample, few cases
    sub = cases[: args.ancestral_cases]
    if sub and args.ancestral_slices:
        sub = [central(c, args.ancestral_slices) for c in sub]
    if sub:
        da, ta, _ = mean_dice(1000, 1, sub, ancestral=True)
        dd, td, _ = mean_dice(d_steps, 1, sub)
        res["ancestral"] = {"cases": len(sub), "slices_per_case": int(sub[0].images["dwi"].shape[0]), "dice6_ddpm1000": da, "seconds_ddpm1000": ta,
                            "dice6_ddim": dd, "seconds_ddim": td, "ddim_steps": d_steps,
                            "time_ratio": ta / td, "dice_diff": dd - da}
        print(f"ancestral 1000 steps: Dice {da:.3f} {ta:.1f} s/case; DDIM {d_steps}: Dice {dd:.3f} {td:.1f} s/case; "
              f"time ratio {ta / td:.0f}x, Dice diff {dd - da:+.3f}", flush=True)

    # 5. slice-to-slice consistency: one sample with independent vs AR(1)-correlated initial noise
    rho0 = synth.cfg.sample.slice_noise_correlation
    cons = {}
    for rho in (0.0, rho0):
        synth.cfg.sample.slice_noise_correlation = rho
        rough, ds = [], []
        for c in cases:
            pred, _ = run_case(synth, c, steps=d_steps, samples=1, seed=0)
            b = c.images["brain"] > 0
            rough.append(z_roughness(pred, b) / max(z_roughness(c.images["tmax"], b), 1e-6))
            ds.append(dice((pred > 6) & b, (c.images["tmax"] > 6) & b))
        cons[str(rho)] = {"z_roughness_ratio": float(np.mean(rough)), "dice6": float(np.mean(ds))}
        print(f"rho {rho}: z-roughness / truth {np.mean(rough):.2f}, Dice {np.mean(ds):.3f}", flush=True)
    synth.cfg.sample.slice_noise_correlation = rho0
    res["slice_consistency"] = cons

    _finish(res, args)
    return 0


def _finish(res: dict, args, paths_only: bool = False) -> None:
    out = Path("runs") / ("bench_sampling_paths.json" if paths_only else "bench_sampling.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    if not args.no_doc:
        if "paths" in res:
            write_paths_doc(res)
        if not paths_only:
            write_doc(res)


def _replace_block(begin: str, end: str, block: str, heading: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    DOC.write_text(text)


def write_paths_doc(r: dict) -> None:
    m, p = r["machine"], r["paths"]
    pbegin, pend = paths_markers(m)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        pbegin,
        f"`{m.get('command', 'python -m bench.sampling')}`, {when}: "
        f"{m['device']}, CPU `{m['cpu']}`, torch CPU capability **{m['capability']}**, native bf16 "
        f"{'yes' if m['native_bf16'] else 'no'}, {m['threads']} threads, torch {m['torch']}. One {p['shape'][0]}-slice "
        f"{p['shape'][1]}x{p['shape'][2]} phantom study, the model's default {r['defaults']['steps']} DDIM steps x "
        f"{r['defaults']['samples']} samples, seed 0; each path forced in turn in one run, best of 2 after a first call.",
        "",
        "| path | s / study | ratio vs fp32 eager | max abs dTmax vs fp32 (s) | mean abs dTmax (s) | setup + first study (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in p["rows"]:
        if "study_s" in row:
            mark = " (**auto**)" if row["path"] == p["auto"] else ""
            lines.append(f"| {row['path']}{mark} | {row['study_s']:.2f} | {row['ratio_vs_fp32']:.2f} | "
                         f"{row['max_abs_tmax_s']:.3f} | {row['mean_abs_tmax_s']:.4f} | {row['setup_s']:.1f} |")
        else:
            why = row["error"]
            lines.append(f"| {row['path']} | — | — | — | — | {why} |")
    ratio = p["auto_ratio_vs_fp32"]
    lines += ["", f"`auto` (the default) measured the candidates on {PROBE_BATCH} of this study's central slices and picked "
              f"**{p['auto']}**: {ratio:.2f}x the fp32 eager time per study" if ratio is not None else
              f"`auto` picked {p['auto']}",
              f"(fastest path in the table: {p['fastest']}, {p['fastest_ratio_vs_fp32']:.2f}x). Tolerance: max abs dTmax "
              f"<= {p['tolerance_s']} s inside the brain on the probe.",
              pend]
    _replace_block(pbegin, pend, "\n".join(lines), f"### Inference paths on {m['device']}, capability {m['capability']}")


def write_doc(r: dict) -> None:
    info = r.get("model_info") or {}
    lines = [
        BEGIN,
        f"Measured by `python -m bench.sampling` on {r['cases']} held-out phantom cases, torch threads "
        f"{r['threads']}, model `{r['model']}` (step {info.get('step', '?')} of {info.get('target_steps', '?')}"
        f"{', interim' if not info.get('finished') else ''}), inference path `{r['speed_25x128'].get('path', '?')}` "
        f"(auto), CPU capability {r.get('machine', {}).get('capability', '?')}. Timings vary with other jobs on the 2 cores.",
        "",
        f"- Default settings ({r['defaults']['steps']} DDIM steps x {r['defaults']['samples']} samples), "
        f"25-slice 128x128 study: **{r['speed_25x128']['seconds']:.1f} s** (target < 20 s).",
        "",
        "| DDIM steps | samples | Dice Tmax>6 | s/case |",
        "|---:|---:|---:|---:|",
    ]
    for row in r["dice_vs_steps"] + r["dice_vs_samples"]:
        lines.append(f"| {row['steps']} | {row['samples']} | {row['dice6']:.3f} | {row['seconds_per_case']:.1f} |")
    a = r.get("ancestral")
    if a:
        lines += ["", f"Reference: 1000-step ancestral DDPM, 1 sample, {a['cases']} case(s) x {a['slices_per_case']} central slices: Dice {a['dice6_ddpm1000']:.3f} in "
                  f"{a['seconds_ddpm1000']:.0f} s/case; DDIM {a['ddim_steps']} steps, 1 sample: Dice {a['dice6_ddim']:.3f} in "
                  f"{a['seconds_ddim']:.1f} s/case — **{a['time_ratio']:.0f}x faster, Dice difference {a['dice_diff']:+.3f}**."]
    c = r.get("slice_consistency", {})
    if c:
        lines += ["", "Slice-to-slice consistency (one sample; mean |Tmax(z+1)-Tmax(z)| in brain divided by the truth's; 1.0 = as smooth as the truth):", ""]
        for rho, v in c.items():
            lines.append(f"- initial-noise correlation along z rho={rho}: roughness ratio {v['z_roughness_ratio']:.2f}, Dice {v['dice6']:.3f}")
    u = r.get("uncertainty")
    if u:
        lines += ["", f"Uncertainty (SD) map at {r.get('uncertainty_steps', '?')} DDIM step(s) against a 32-sample SD map "
                  "from other seeds (mean over cases, inside the brain):", "",
                  "| samples | SD map correlation | median abs dSD / median SD | s/case |", "|---:|---:|---:|---:|"]
        for row in u:
            lines.append(f"| {row['samples']} | {row['sd_correlation']:.3f} | {row['sd_median_rel_diff']:.2f} | "
                         f"{row['seconds_per_case']:.1f} |")
    lines.append(END)
    _replace_block(BEGIN, END, "\n".join(lines), "## Tmax diffusion model — sampling (issue 7)")


if __name__ == "__main__":
    raise SystemExit(main())
