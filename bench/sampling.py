"""Sampling benchmark for the Tmax diffusion model: speed, Dice versus steps and samples, the
1000-step ancestral reference, and slice-to-slice consistency.

    python -m bench.sampling [--model demo] [--data runs/data/heldout] [--cases 8] [--ancestral-cases 2]

Reference for the ratios: the 1000-step ancestral DDPM sampler (the training chain) on the same
cases, same seed, one sample. Writes its figures into docs/benchmarks.md (section "Tmax diffusion
model — sampling") and prints them.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from models.tmax_ddpm.data import list_cases, load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import dice

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench.sampling:begin -->", "<!-- bench.sampling:end -->"


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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    synth = TmaxSynthesizer.load(args.model)
    d_steps, d_samples = synth.cfg.sample.steps, synth.cfg.sample.samples
    cases = [load_case(p) for p in list_cases(args.data)[: args.cases]]
    res: dict = {"model": synth.source, "model_info": synth.info, "cases": len(cases), "threads": torch.get_num_threads(),
                 "defaults": {"steps": d_steps, "samples": d_samples}}

    def mean_dice(step: int, samples: int, subset, **kw) -> tuple[float, float, list[float]]:
        ds, ts = [], []
        for c in subset:
            pred, sec = run_case(synth, c, steps=step, samples=samples, seed=0, **kw)
            b = c.images["brain"] > 0
            ds.append(dice((pred > 6) & b, (c.images["tmax"] > 6) & b))
            ts.append(sec)
        return float(np.mean(ds)), float(np.mean(ts)), ds

    # 1. speed of the default settings on a 25-slice 128^2 study
    tall = [c for c in cases if c.images["dwi"].shape[0] >= 25] or cases
    s25 = study_25(tall[0])
    run_case(synth, s25, steps=1, samples=1)  # warm-up
    secs = [run_case(synth, s25)[1] for _ in range(2)]
    res["speed_25x128"] = {"seconds": min(secs), "target_s": 20.0, "shape": list(s25.images["dwi"].shape)}
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

    out = Path("runs") / "bench_sampling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    if not args.no_doc:
        write_doc(res)
    return 0


def write_doc(r: dict) -> None:
    info = r.get("model_info") or {}
    lines = [
        BEGIN,
        f"Measured by `python -m bench.sampling` on {r['cases']} held-out phantom cases, torch threads "
        f"{r['threads']}, model `{r['model']}` (step {info.get('step', '?')} of {info.get('target_steps', '?')}"
        f"{', interim' if not info.get('finished') else ''}). The machine is a shared 2-core CPU; timings vary "
        "with the other jobs running.",
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
    lines.append(END)
    block = "\n".join(lines)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Tmax diffusion model — sampling (issue 7)\n\n" + block + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
