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
By default every method is given the truth core (the paper's protocol), so a method's mismatch-volume
error equals its Tmax>6 s volume error; it is not reported twice (the Bland-Altman plot shows the
mismatch volumes themselves). ``condition_on`` names one of the ``core_methods`` instead: the model is
then conditioned on that core, and the methods' DEFUSE-3 calls, the baselines and the confidence use it,
as the service does with its own core rule - the end-to-end figure that an independent generator
scoring ``synthperf process`` sees. The truth call always uses the truth core.
``input_mask`` "brain_served" likewise gives the model the brain mask the service makes from the b0
(``synthperf dataset served-masks``) instead of the true brain, and counts its calls and confidence
inside that mask, as the service does; the truth stays inside the true brain.
The family is read from the JSON, not from phantom/, which models must not import.

Knowing when it does not know (issue 15 item 4): every case also gets the per-study confidence the
service computes (models.confidence, with the input reference stored beside the weights), and the
summary gives the area under the ROC curve of low confidence against a bad case: Tmax>6 s Dice < 0.5
on a stroke study, or more than 15 mL of Tmax>6 s called on a no-stroke study. On no-stroke studies
Dice is not the criterion (it is 1 for an empty call and 0 for any call at all).

Core on unfamiliar data (item 5): the caller may pass ``core_methods`` - name -> function of
(case folder, images, spacing) returning a core mask - and each is scored against the truth core
(Dice on cases with a core, volumes on all). models/ holds no core rule (the rule lives in the
worker); ``synthperf evaluate`` passes the worker's rule before and after the partial-volume step.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from models.confidence import ConfidenceParams, assess, auroc, load_reference
from models.tmax_ddpm.config import check_input_mask
from models.tmax_ddpm.data import list_cases, load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import defuse3, dice, mae, psnr, ssim, volume_ml

METHODS = ("model", "core", "territory")
SAMPLE_CUTS_S = (6.0, 10.0)  # the clinical Tmax cuts whose volume evaluate keeps per sample
#: the family of a case whose truth.json has no ``family`` key (written before families existed)
DEFAULT_FAMILY = "geometric"
#: a case is "bad" (the positive class of the confidence AUROC) below this Tmax>6 s Dice on a stroke
#: study, or above this false Tmax>6 s volume (mL) on a no-stroke study
BAD_DICE6 = 0.5
BAD_FALSE_ML = 15.0

#: name -> f(case folder, images by name, spacing (z, y, x) mm) -> core mask (bool, z y x)
CoreMethod = Callable[[Path, Mapping[str, np.ndarray], tuple[float, float, float]], np.ndarray]


def is_bad(row: Mapping) -> bool:
    """The failure the confidence score should predict (module docstring)."""
    if row.get("no_stroke"):
        return float(row["model_tmax6_ml"]) > BAD_FALSE_ML
    return float(row["model_dice6"]) < BAD_DICE6


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


def _check_condition_on(condition_on: str, core_methods: Mapping[str, CoreMethod] | None) -> None:
    """The conditioning core must be the truth or one of the core methods scored in the same run."""
    if condition_on != "truth" and condition_on not in (core_methods or {}):
        raise ValueError(f"condition_on must be 'truth' or one of the core methods {sorted(core_methods or {})}, "
                         f"got {condition_on!r}")


def evaluate_case(synth: TmaxSynthesizer, case_dir: Path, steps: int | None, samples: int | None, seed: int,
                  reference: Mapping | None = None, core_methods: Mapping[str, CoreMethod] | None = None,
                  maps_dir: Path | None = None, condition_on: str = "truth", input_mask: str = "brain") -> dict:
    """One case's row; with ``maps_dir`` its mean and SD maps are also kept there (``<case>.npz``, float16 s),
    so later analyses (a threshold, a confidence part) need no second round of sampling. ``condition_on``:
    "truth" or a name in ``core_methods``, the core the model and the calls are given; ``input_mask``: the
    brain mask it is given, the true brain or the service's "brain_served" (module docstring)."""
    _check_condition_on(condition_on, core_methods)
    case = load_case(case_dir)
    im = case.images
    brain = case.brain
    if check_input_mask(input_mask) not in im:
        raise FileNotFoundError(f"{case_dir}: no {input_mask}.nii.gz; write it with `synthperf dataset served-masks`")
    given = im[input_mask] > 0  # the mask the model gets and the calls are counted in
    true_core = (im["core"] > 0.5) & brain
    voxel_ml = float(np.prod(case.spacing_zyx)) / 1000.0
    segmented = {name: np.asarray(fn(case_dir, im, case.spacing_zyx), dtype=bool) & brain
                 for name, fn in (core_methods or {}).items()}
    core = true_core if condition_on == "truth" else segmented[condition_on]
    truth = np.clip(np.nan_to_num(im["tmax"]), 0, 20) * brain
    res = synth.synthesize(
        im["dwi"], im.get("flair"), core.astype(np.float32), given, adc=im.get("adc"),
        spacing_zyx=case.spacing_zyx, steps=steps, samples=samples, seed=seed, sample_cuts_s=SAMPLE_CUTS_S,
    )
    if maps_dir is not None:
        np.savez_compressed(maps_dir / f"{case.case_id}.npz", mean=res.mean.astype(np.float16),
                            sd=res.sd.astype(np.float16), spacing_zyx=np.asarray(case.spacing_zyx))
    t6, t10 = (truth > 6) & brain, (truth > 10) & brain
    p6, p10 = (res.mean > 6) & given, (res.mean > 10) & given
    true_core_ml = volume_ml(true_core, voxel_ml)
    core_ml = volume_ml(core, voxel_ml)  # the core the calls use: the truth's, or the given method's
    true6_ml = volume_ml(t6, voxel_ml)
    row: dict = {
        "case": case.case_id,
        "family": case_family(case.truth),
        "vendor": case.truth.get("vendor") or case.truth.get("vendor_style") or "",
        "case_type": case.truth.get("case_type") or case.truth.get("occlusion") or "",
        "seconds": round(res.seconds, 2),
        "core_ml": true_core_ml,
        "condition_on": condition_on,
        "input_mask": input_mask,
        "given_core_ml": core_ml,
        "true_tmax6_ml": true6_ml,
        "true_tmax10_ml": volume_ml(t10, voxel_ml),
        "mae_s": mae(res.mean, truth, brain),
        "psnr_db": psnr(res.mean, truth, brain),
        "ssim": ssim(res.mean, truth),
        "mean_sd_in_hypo_s": float(res.sd[t6].mean()) if t6.any() else float("nan"),
    }
    ref = defuse3(true_core_ml, true6_ml)
    row["no_stroke"] = true6_ml == 0 and true_core_ml == 0
    row["true_mismatch_ml"] = ref["mismatch_ml"]
    row["true_defuse3"] = ref["target"]
    terr = territory_baseline(im.get("territory"), core)
    preds6 = {"model": p6, "core": core, "territory": terr}
    for name, m6 in preds6.items():
        if m6 is None:
            continue
        m6 = m6 & given
        v = volume_ml(m6, voxel_ml)
        d = defuse3(core_ml, v)
        row[f"{name}_dice6"] = dice(m6, t6)
        row[f"{name}_tmax6_ml"] = v
        row[f"{name}_vol6_err_ml"] = v - true6_ml
        row[f"{name}_mismatch_ml"] = d["mismatch_ml"]
        row[f"{name}_defuse3"] = d["target"]
        row[f"{name}_defuse3_agree"] = d["target"] == ref["target"]
    # the call each sample makes on its own (the mean map's call hides how many samples disagree)
    sample6 = res.sample_ml.get(6.0, ())
    if sample6:
        row["model_sample_tmax6_ml"] = ";".join(f"{v:.1f}" for v in sample6)
        row["model_defuse3_share"] = sum(defuse3(core_ml, v)["target"] for v in sample6) / len(sample6)
    row["model_dice10"] = dice(p10, t10)
    row["model_tmax10_ml"] = volume_ml(p10, voxel_ml)
    row["model_vol10_err_ml"] = row["model_tmax10_ml"] - row["true_tmax10_ml"]
    conf = assess(res.mean, res.sd, core, given, case.spacing_zyx, dwi=im["dwi"], flair=im.get("flair"),
                  adc=im.get("adc"), reference=reference, params=ConfidenceParams())
    row["confidence"] = round(conf.score, 4)
    row["confidence_low"] = conf.low
    row.update({f"confidence_{k}": v for k, v in conf.parts.items()})
    row["confidence_reasons"] = "; ".join(conf.reasons)
    row["bad"] = is_bad(row)
    for name, m in segmented.items():
        row[f"coreseg_{name}_ml"] = volume_ml(m, voxel_ml)
        if true_core.any():
            row[f"coreseg_{name}_dice"] = dice(m, true_core)
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
    if "model" in out and any("confidence_low" in r for r in ns):
        # what the service would say: a low-confidence study's call is withheld (worker/pipeline/confidence.py)
        out["model"]["defuse3_yes_served"] = int(sum(bool(r["model_defuse3"]) and not r.get("confidence_low", False)
                                                     for r in ns))
    return out


def confidence_summary(rows: list[dict]) -> dict:
    """AUROC of low confidence for a bad case, and how the cases split at the threshold."""
    rows = [r for r in rows if "confidence" in r]
    if not rows:
        return {}
    bad = [bool(r["bad"]) for r in rows]
    conf = [float(r["confidence"]) for r in rows]
    low = [bool(r["confidence_low"]) for r in rows]
    high = [r for r in rows if not r["confidence_low"]]
    return {
        "auroc": auroc([-c for c in conf], bad),
        "cases": len(rows),
        "bad": int(sum(bad)),
        "low": int(sum(low)),
        "bad_and_low": int(sum(b and lo for b, lo in zip(bad, low, strict=True))),
        "good_and_low": int(sum((not b) and lo for b, lo in zip(bad, low, strict=True))),
        "confidence_median": float(np.median(conf)),
        "high_confidence_model_dice6_mean": _mean(high, "model_dice6"),
        "high_confidence_defuse3_agreement": (float(np.mean([r["model_defuse3_agree"] for r in high]))
                                              if high else None),
    }


def core_summary(rows: list[dict]) -> dict:
    """Core Dice (cases with a truth core) and absolute volume error of each core method."""
    names = sorted({k[len("coreseg_"):-len("_ml")] for r in rows for k in r
                    if k.startswith("coreseg_") and k.endswith("_ml")})
    out: dict = {}
    for n in names:
        d = [r[f"coreseg_{n}_dice"] for r in rows if f"coreseg_{n}_dice" in r]
        err = [r[f"coreseg_{n}_ml"] - r["core_ml"] for r in rows if f"coreseg_{n}_ml" in r]
        out[n] = {"cases_with_core": len(d), "dice_mean": float(np.mean(d)) if d else None,
                  "dice_median": float(np.median(d)) if d else None,
                  "vol_abs_err_ml": float(np.mean(np.abs(err))) if err else None,
                  "vol_bias_ml": float(np.mean(err)) if err else None}
    return out


def core_visible(core_ml: float) -> bool:
    """Whether a study's core is big enough to anchor the hypoperfusion to
    (>= ``ConfidenceParams.anchor_ok_ml``): the split every no-core figure uses."""
    return float(core_ml) >= ConfidenceParams().anchor_ok_ml


def _stroke_strata(rows: list[dict], key: str) -> dict:
    """Mean of ``key`` over stroke studies (the issue's measure; a healthy brain's empty-vs-empty Dice
    of 1 is left out), and split by whether the core is visible (>= ConfidenceParams.anchor_ok_ml):
    without a core the inputs carry little of the hypoperfusion, so the two strata tell a model that
    misses what it could see from one that misses what nothing shows."""
    stroke = [r for r in rows if not r.get("no_stroke") and key in r]
    with_core = [r for r in stroke if core_visible(r.get("core_ml", 0.0))]
    return {
        "dice6_mean_stroke": _mean(stroke, key),
        "dice6_mean_core_visible": _mean(with_core, key),
        "dice6_mean_no_core": _mean([r for r in stroke if not core_visible(r.get("core_ml", 0.0))], key),
        "stroke_cases": len(stroke),
        "core_visible_cases": len(with_core),
    }


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
            **_stroke_strata(rows, f"{m}_dice6"),
            "vol6_abs_err_ml": _abs_mean(rows, f"{m}_vol6_err_ml"),
            "vol6_bias_ml": _mean(rows, f"{m}_vol6_err_ml"),
            "defuse3_agreement": float(np.mean([r[f"{m}_defuse3_agree"] for r in rows if f"{m}_defuse3_agree" in r])),
        }
    s["model_vol10_abs_err_ml"] = _abs_mean(rows, "model_vol10_err_ml")
    s["true_defuse3_rate"] = float(np.mean([r["true_defuse3"] for r in rows])) if rows else None
    s["no_stroke"] = no_stroke_summary(rows)
    s["confidence"] = confidence_summary(rows)
    s["core_rule"] = core_summary(rows)  # not "core": that key is the core baseline's
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
    core_methods: Mapping[str, CoreMethod] | None = None,
    save_maps: bool = False,
    condition_on: str = "truth",
    input_mask: str = "brain",
) -> dict:
    """Run the evaluation; writes per_case.csv, summary.json and bland_altman.png into out_dir.

    ``core_methods``: core segmentations to score against the truth core (module docstring).
    ``save_maps``: also keep every case's mean and SD maps in out_dir/maps (evaluate_case).
    ``condition_on``: "truth" or a name in ``core_methods``: the core the model is given; ``input_mask``:
    "brain" or "brain_served", the brain mask it is given (module docstring)."""
    _check_condition_on(condition_on, core_methods)
    check_input_mask(input_mask)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    synth = TmaxSynthesizer.load(model, device=device)
    cases = list_cases(data_dir, require=tuple(dict.fromkeys(("dwi", "flair", "core", "tmax", "brain", input_mask))))
    if limit:
        cases = cases[:limit]
    out = Path(out_dir) if out_dir else Path(synth.source).parent / "eval" / Path(data_dir).name
    out.mkdir(parents=True, exist_ok=True)
    it = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="evaluating", unit="case")
    t0 = time.perf_counter()
    reference = load_reference(synth.source)
    maps_dir = out / "maps" if save_maps else None
    if maps_dir is not None:
        maps_dir.mkdir(exist_ok=True)
    rows = [evaluate_case(synth, c, steps, samples, seed, reference, core_methods, maps_dir, condition_on, input_mask)
            for c in it]
    summary = summarise(rows)
    summary.update(
        {
            "weights": synth.source,
            "model_info": synth.info,
            "data": str(data_dir),
            "steps": steps or synth.cfg.sample.steps,
            "samples": samples or synth.cfg.sample.samples,
            "seconds_total": round(time.perf_counter() - t0, 1),
            "input_reference": bool(reference),
            "condition_on": condition_on,
            "input_mask": input_mask,
            "confidence_threshold": ConfidenceParams().threshold,
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
        f"cases {s['cases']}, steps {s['steps']}, samples {s['samples']}, {s.get('seconds') or 0:.1f} s/case, "
        f"core given: {s.get('condition_on', 'truth')}, brain mask given: {s.get('input_mask', 'brain')}",
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
    conf = [(label, g["confidence"]) for label, g in groups if g.get("confidence")]
    if conf:
        lines.append(f"confidence (threshold {s.get('confidence_threshold', 0.5)}; bad = Dice>6 < {BAD_DICE6} or false "
                     f"Tmax>6 > {BAD_FALSE_ML:.0f} mL on no-stroke){'' if s.get('input_reference', True) else '; NO input reference stored with the model'}")
        lines.append(f"{'family':<10} {'cases':>5}  {'bad':>4}  {'low':>4}  {'bad&low':>7}  {'good&low':>8}  {'AUROC':>6}  "
                     "Dice>6 / DEFUSE-3 agreement of high-confidence cases")
        for label, c in conf:
            lines.append(f"{label:<10} {c['cases']:>5}  {c['bad']:>4}  {c['low']:>4}  {c['bad_and_low']:>7}  "
                         f"{c['good_and_low']:>8}  {_fmt(c['auroc'], '>6.3f')}  "
                         f"{_fmt(c['high_confidence_model_dice6_mean'], '.3f')} / "
                         f"{_fmt(c['high_confidence_defuse3_agreement'], '.2f')}")
    core = [(label, g["core_rule"]) for label, g in groups if g.get("core_rule")]
    if core:
        lines.append(f"{'core':<10} {'cases':>5}  {'method':<14} {'Dice (median)':<15}  {'|vol err|':>9}  {'vol bias':>8}")
        for label, c in core:
            for name, r in c.items():
                lines.append(f"{label:<10} {r['cases_with_core']:>5}  {name:<14} "
                             f"{_fmt(r['dice_mean'], '.3f')} ({_fmt(r['dice_median'], '.3f')})  "
                             f"{_fmt(r['vol_abs_err_ml'], '>9.1f')}  {_fmt(r['vol_bias_ml'], '>+8.1f')}")
    return "\n".join(lines)


def read_rows(per_case_csv: str | Path) -> list[dict]:
    """per_case.csv back into rows as evaluate_case made them (numbers, booleans; empty cells left out),
    so an earlier evaluation can be summarised again with today's summary without sampling again."""
    rows = []
    with open(per_case_csv, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict = {}
            for k, v in raw.items():
                if v == "":
                    continue
                if v in ("True", "False"):
                    row[k] = v == "True"
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def per_case_table(rows: list[dict]) -> str:
    """One evaluation case by case, as markdown: what a reader checks a summary against (issue 15 asks for
    per-case tables). DEFUSE-3 reads truth -> model; a low-confidence study's call is not served."""
    head = ("| case | family | type | core mL | true Tmax>6 mL | model Tmax>6 mL | Dice>6 | DEFUSE-3 truth -> model | "
            "confidence | bad |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    yes = {True: "yes", False: "no"}
    for r in rows:
        conf = r.get("confidence")
        conf_txt = "-" if conf is None else f"{float(conf):.2f}{' low' if r.get('confidence_low') else ''}"
        lines.append(
            f"| {r['case']} | {r.get('family', DEFAULT_FAMILY)} | {r.get('case_type') or '-'} | {r['core_ml']:.1f} | "
            f"{r['true_tmax6_ml']:.1f} | {r['model_tmax6_ml']:.1f} | {r['model_dice6']:.2f} | "
            f"{yes[bool(r['true_defuse3'])]} -> {yes[bool(r['model_defuse3'])]} | {conf_txt} | "
            f"{'bad' if r.get('bad') else ''} |")
    return "\n".join(lines)


def comparison_table(evals: Mapping[str, dict]) -> str:
    """Several models' evaluations of the same held-out cases as one markdown table, a row per model and
    test family: the cross-family table (issue 15) when the models were trained on one family each.

    ``evals`` maps a model's name (e.g. the family it was trained on) to its summary (summarise()).
    Dice columns are means over stroke studies; the baselines need no training, so their columns are
    the same for every model on one family: shown to make that visible rather than taken on trust.
    """
    head = ("| model -> tested on | cases | Dice>6, stroke studies | ... core visible | ... no core | core baseline | "
            "territory baseline | Dice>10 | DEFUSE-3 agreement | no-stroke: median false T>6 mL, 'yes' | "
            "confidence AUROC |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in evals.items():
        for fam, f in sorted((s.get("per_family") or {"all": s}).items()):
            m, c, t = f.get("model", {}), f.get("core", {}), f.get("territory", {})
            ns = (f.get("no_stroke") or {}).get("model")
            ns_txt = "-" if not ns else f"{ns['false_tmax6_ml_median']:.1f}, {ns['defuse3_yes']} of {f['no_stroke']['cases']}"
            lines.append(
                f"| {name} -> {fam} | {f['cases']} ({m.get('stroke_cases', '-')} stroke, "
                f"{m.get('core_visible_cases', '-')} with core) | {_fmt(m.get('dice6_mean_stroke'), '.3f')} | "
                f"{_fmt(m.get('dice6_mean_core_visible'), '.3f')} | {_fmt(m.get('dice6_mean_no_core'), '.3f')} | "
                f"{_fmt(c.get('dice6_mean_stroke'), '.3f')} | {_fmt(t.get('dice6_mean_stroke'), '.3f')} | "
                f"{_fmt(f.get('model_dice10'), '.3f')} | "
                f"{_fmt(m.get('defuse3_agreement'), '.2f')} | {ns_txt} | {_fmt((f.get('confidence') or {}).get('auroc'), '.3f')} |"
            )
    return "\n".join(lines)
