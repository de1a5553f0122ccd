"""Evaluate a model on held-out cases the way the paper does, with two baselines in the same run.

Per case: MAE (s) in brain, PSNR, SSIM, Dice of Tmax>6 s and >10 s, volume errors (mL), DEFUSE-3
target-mismatch agreement; summary means; a Bland-Altman plot of mismatch volumes. Baselines:
"core" (hypoperfusion = the core itself) and "territory" (hypoperfusion = the vascular territory that
holds most of the core, united with the core; needs territory.nii.gz).

Cross-generator validation (issue 15): a held-out folder may mix phantom families, so every figure is
also given per family (``truth.json`` key ``family``; cases without it are "geometric", the only family
before it existed). On no-stroke studies (truth Tmax>6 s and core both empty) Dice is 1 for any empty
call and hides the failure that matters - hypoperfusion called on a healthy brain - so those studies
get their own figures: the false Tmax>6 s volume each method calls and how often DEFUSE-3 says "yes".
Every method is given the truth core, so a method's mismatch-volume error equals its Tmax>6 s volume
error; it is not reported twice (the Bland-Altman plot shows the mismatch volumes themselves).
The family is read from the JSON, not from phantom/, which models must not import.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from models.tmax_ddpm.data import list_cases, load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import defuse3, dice, mae, psnr, ssim, volume_ml

METHODS = ("model", "core", "territory")
#: the family of a case whose truth.json has no ``family`` key (written before families existed)
DEFAULT_FAMILY = "geometric"


def case_family(truth: dict) -> str:
    """The phantom family a case belongs to, from its truth.json contents."""
    fam = truth.get("family")
    return str(fam) if fam else DEFAULT_FAMILY


def territory_baseline(territory: np.ndarray | None, core: np.ndarray) -> np.ndarray | None:
    """The vascular territory label holding most core voxels, plus the core."""
    if territory is None:
        return None
    lab = np.asarray(territory).round().astype(int)
    vals = lab[core & (lab > 0)]
    if vals.size == 0:
        return core.copy()
    label = int(np.bincount(vals).argmax())
    return (lab == label) | core


def evaluate_case(synth: TmaxSynthesizer, case_dir: Path, steps: int | None, samples: int | None, seed: int) -> dict:
    case = load_case(case_dir)
    im = case.images
    brain = case.brain
    core = (im["core"] > 0.5) & brain
    truth = np.clip(np.nan_to_num(im["tmax"]), 0, 20) * brain
    res = synth.synthesize(
        im["dwi"], im.get("flair"), im.get("core"), brain, adc=im.get("adc"),
        spacing_zyx=case.spacing_zyx, steps=steps, samples=samples, seed=seed,
    )
    voxel_ml = float(np.prod(case.spacing_zyx)) / 1000.0
    t6, t10 = (truth > 6) & brain, (truth > 10) & brain
    p6, p10 = (res.mean > 6) & brain, (res.mean > 10) & brain
    core_ml = volume_ml(core, voxel_ml)
    true6_ml = volume_ml(t6, voxel_ml)
    row: dict = {
        "case": case.case_id,
        "family": case_family(case.truth),
        "vendor": case.truth.get("vendor") or case.truth.get("vendor_style") or "",
        "seconds": round(res.seconds, 2),
        "core_ml": core_ml,
        "true_tmax6_ml": true6_ml,
        "true_tmax10_ml": volume_ml(t10, voxel_ml),
        "mae_s": mae(res.mean, truth, brain),
        "psnr_db": psnr(res.mean, truth, brain),
        "ssim": ssim(res.mean, truth),
        "mean_sd_in_hypo_s": float(res.sd[t6].mean()) if t6.any() else float("nan"),
    }
    ref = defuse3(core_ml, true6_ml)
    row["no_stroke"] = true6_ml == 0 and core_ml == 0
    row["true_mismatch_ml"] = ref["mismatch_ml"]
    row["true_defuse3"] = ref["target"]
    terr = territory_baseline(im.get("territory"), core)
    preds6 = {"model": p6, "core": core, "territory": terr}
    for name, m6 in preds6.items():
        if m6 is None:
            continue
        m6 = m6 & brain
        v = volume_ml(m6, voxel_ml)
        d = defuse3(core_ml, v)
        row[f"{name}_dice6"] = dice(m6, t6)
        row[f"{name}_tmax6_ml"] = v
        row[f"{name}_vol6_err_ml"] = v - true6_ml
        row[f"{name}_mismatch_ml"] = d["mismatch_ml"]
        row[f"{name}_defuse3"] = d["target"]
        row[f"{name}_defuse3_agree"] = d["target"] == ref["target"]
    row["model_dice10"] = dice(p10, t10)
    row["model_tmax10_ml"] = volume_ml(p10, voxel_ml)
    row["model_vol10_err_ml"] = row["model_tmax10_ml"] - row["true_tmax10_ml"]
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r and isinstance(r[key], (int, float)) and math.isfinite(float(r[key]))]
    return float(np.mean(vals)) if vals else None


def _abs_mean(rows: list[dict], key: str) -> float | None:
    vals = [abs(r[key]) for r in rows if key in r]
    return float(np.mean(vals)) if vals else None


def no_stroke_summary(rows: list[dict]) -> dict:
    """False hypoperfusion on studies without stroke: per method, the Tmax>6 s volume called (mL;
    all of it is false) and the number of DEFUSE-3 "yes" calls (all of them are wrong)."""
    ns = [r for r in rows if r.get("no_stroke")]
    out: dict = {"cases": len(ns)}
    for m in METHODS:
        vols = [r[f"{m}_tmax6_ml"] for r in ns if f"{m}_tmax6_ml" in r]
        if not vols:
            continue
        out[m] = {
            "false_tmax6_ml_median": float(np.median(vols)),
            "false_tmax6_ml_mean": float(np.mean(vols)),
            "false_tmax6_ml_max": float(np.max(vols)),
            "defuse3_yes": int(sum(bool(r[f"{m}_defuse3"]) for r in ns if f"{m}_defuse3" in r)),
        }
    return out


def _summarise_rows(rows: list[dict]) -> dict:
    s: dict = {"cases": len(rows)}
    for k in ("mae_s", "psnr_db", "ssim", "model_dice10", "model_vol10_err_ml", "seconds", "mean_sd_in_hypo_s"):
        s[k] = _mean(rows, k)
    for m in METHODS:
        if not any(f"{m}_dice6" in r for r in rows):
            continue
        d = [r[f"{m}_dice6"] for r in rows if f"{m}_dice6" in r]
        s[m] = {
            "dice6_mean": float(np.mean(d)),
            "dice6_median": float(np.median(d)),
            "dice6_sd": float(np.std(d)),
            "vol6_abs_err_ml": _abs_mean(rows, f"{m}_vol6_err_ml"),
            "vol6_bias_ml": _mean(rows, f"{m}_vol6_err_ml"),
            "defuse3_agreement": float(np.mean([r[f"{m}_defuse3_agree"] for r in rows if f"{m}_defuse3_agree" in r])),
        }
    s["model_vol10_abs_err_ml"] = _abs_mean(rows, "model_vol10_err_ml")
    s["true_defuse3_rate"] = float(np.mean([r["true_defuse3"] for r in rows])) if rows else None
    s["no_stroke"] = no_stroke_summary(rows)
    return s


def summarise(rows: list[dict]) -> dict:
    """Overall figures plus the same figures per phantom family (``per_family``)."""
    s = _summarise_rows(rows)
    families = sorted({r.get("family", DEFAULT_FAMILY) for r in rows})
    s["per_family"] = {f: _summarise_rows([r for r in rows if r.get("family", DEFAULT_FAMILY) == f])
                       for f in families}
    return s


def bland_altman(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if any(f"{m}_mismatch_ml" in r for r in rows)]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), dpi=100, squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        t = np.array([r["true_mismatch_ml"] for r in rows if f"{m}_mismatch_ml" in r])
        p = np.array([r[f"{m}_mismatch_ml"] for r in rows if f"{m}_mismatch_ml" in r])
        mean, diff = (t + p) / 2, p - t
        bias, sd = float(diff.mean()), float(diff.std())
        ax.scatter(mean, diff, s=12)
        for y, ls in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            ax.axhline(y, color="k", ls=ls, lw=0.8)
        ax.set_title(f"{m}: bias {bias:.1f} mL, LoA ±{1.96 * sd:.1f}")
        ax.set_xlabel("mean of mismatch volumes (mL)")
        ax.set_ylabel("predicted − true mismatch (mL)")
    fig.suptitle("Mismatch volume (Tmax>6 s − core), Bland-Altman — SYNTHETIC data", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(
    model: str,
    data_dir: str | Path,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    samples: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Run the evaluation; writes per_case.csv, summary.json and bland_altman.png into out_dir."""
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    synth = TmaxSynthesizer.load(model, device=device)
    cases = list_cases(data_dir, require=("dwi", "flair", "core", "tmax", "brain"))
    if limit:
        cases = cases[:limit]
    out = Path(out_dir) if out_dir else Path(synth.source).parent / "eval" / Path(data_dir).name
    out.mkdir(parents=True, exist_ok=True)
    it = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="evaluating", unit="case")
    t0 = time.perf_counter()
    rows = [evaluate_case(synth, c, steps, samples, seed) for c in it]
    summary = summarise(rows)
    summary.update(
        {
            "weights": synth.source,
            "model_info": synth.info,
            "data": str(data_dir),
            "steps": steps or synth.cfg.sample.steps,
            "samples": samples or synth.cfg.sample.samples,
            "seconds_total": round(time.perf_counter() - t0, 1),
        }
    )
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "case", k))
    with open(out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if rows:
        bland_altman(rows, out / "bland_altman.png")
    summary["out_dir"] = str(out)
    return summary


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _method_lines(label: str, s: dict) -> list[str]:
    lines = []
    for m in METHODS:
        if m in s:
            r = s[m]
            d10 = _fmt(s.get("model_dice10"), ".3f") if m == "model" else "-"
            dice6 = f"{r['dice6_mean']:.3f} ({r['dice6_median']:.3f})"
            lines.append(
                f"{label:<10} {s['cases']:>5}  {m:<10} {dice6:<15}  {d10:>7}  {_fmt(r['vol6_abs_err_ml'], '>10.1f')}  "
                f"{_fmt(r['vol6_bias_ml'], '>+9.1f')}  {r['defuse3_agreement']:.2f}"
            )
    return lines


def _no_stroke_lines(label: str, s: dict) -> list[str]:
    ns = s.get("no_stroke") or {}
    n = ns.get("cases", 0)
    return [f"{label:<10} {n:>5}  {m:<10} {ns[m]['false_tmax6_ml_median']:>15.1f}  {ns[m]['false_tmax6_ml_max']:>7.1f}  "
            f"{ns[m]['defuse3_yes']}/{n}" for m in METHODS if n and m in ns]


def format_summary(s: dict) -> str:
    """The printed table: overall and per-family rows for every method, then the no-stroke studies."""
    groups = [("all", s)] + sorted((s.get("per_family") or {}).items())
    lines = [
        f"cases {s['cases']}, steps {s['steps']}, samples {s['samples']}, {s.get('seconds') or 0:.1f} s/case",
        f"model: MAE {s['mae_s']:.2f} s, PSNR {s['psnr_db']:.1f} dB, SSIM {s['ssim']:.3f}, Dice>10 {s['model_dice10']:.3f}",
        f"{'family':<10} {'cases':>5}  {'method':<10} {'Dice>6 (median)':<15}  {'Dice>10':>7}  {'|vol6 err|':>10}  "
        f"{'vol6 bias':>9}  DEFUSE-3 agreement   (volumes in mL)",
    ]
    for label, g in groups:
        lines += _method_lines(label, g)
    ns_lines = [ln for label, g in groups for ln in _no_stroke_lines(label, g)]
    if ns_lines:
        lines.append(f"{'no-stroke':<10} {'cases':>5}  {'method':<10} {'false T>6 med':>15}  {'max':>7}  DEFUSE-3 yes")
        lines += ns_lines
    return "\n".join(lines)
