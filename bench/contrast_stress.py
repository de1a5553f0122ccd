"""A cortex more contrasted than training drew: what each model calls on it, healthy brains and strokes.

Why: on the independent generator's healthy brains the model called 92-104 mL of Tmax>6 s along the
cortical ribbon of both hemispheres, and 2 of the 39 healthy brains of A-F whose grey-white ratio sits at
the top of the drawn range get 36-107 mL (docs/model-card.md, Limits). That is an appearance shortcut:
a cortex brighter than white matter read as delayed perfusion. This stretches the grey-minus-white
signal of b0 (so DWI) and FLAIR by K (``synthperf phantom --grey-contrast K``), everything else of each
case as drawn. Over 3 000 draws the FLAIR grey/white ratio has median 1.33, 95th percentile 1.72 and
maximum 1.92 (the table prints it afresh); K = 2 takes the median case to 1.66 and K = 3 to 1.99, beyond
anything trained on,
and scores each model on the same cases at each K: on healthy brains the false Tmax>6 s volume, the raw
DEFUSE-3 "yes" (15 mL or more with no core) and what the service says (a low-confidence call is
withheld); on strokes the Tmax>6 s Dice (truth core, true brain, as ``synthperf evaluate --no-core``).

``--visibility`` also asks whether the service could see the stretch: per run-time grey-white statistic
(percentile ratios and an Otsu two-tissue ratio over normal-appearing brain), how many stretched cases
leave the range of the cases as drawn. ``--contrast-in dwi`` or ``flair`` stretches that sequence alone
(the cases at K = 1 are shared, the rows kept apart), to tell which one a model reads.

References, side by side in one run: K = 1 (the cases as drawn) for each model, and the first model
for the others. In-family: these are our own phantom's families. Quality, not speed: no timing.

    python -m bench.contrast_stress --models demo runs/ft/NAME/export --healthy 12 --strokes 8 \\
        --contrast 1 2 3 --out runs/stress --workers 2

Without arguments (as ``make bench`` runs it): the shipped model, 2 healthy brains and 1 stroke per
family at K = 1 and 3, in a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FAMILIES = ("geometric", "template")
SEED_BASE = 700_000  # clear of the training (0..6 039) and held-out sets (200 000..339 999)


def pick_seeds(n_healthy: int, n_strokes: int, base: int = SEED_BASE) -> dict[str, list[int]]:
    """The first ``n_healthy`` no-stroke and ``n_strokes`` stroke seeds of the randomised mix from ``base``.

    The case type comes from the seed alone (phantom.randomise.case_scenario), so the same seeds give
    the same kinds of case in both families."""
    from phantom.randomise import case_scenario

    out: dict[str, list[int]] = {"healthy": [], "stroke": []}
    seed = base
    while len(out["healthy"]) < n_healthy or len(out["stroke"]) < n_strokes:
        kind = "healthy" if case_scenario(seed)["case_type"] == "no-stroke" else "stroke"
        if len(out[kind]) < (n_healthy if kind == "healthy" else n_strokes):
            out[kind].append(seed)
        seed += 1
    return out


def stretched_in(k: float, sequences: str) -> str:
    """The sequences a stretch by ``k`` reaches: none at K = 1, so those cases are shared by every choice."""
    return "both" if round(k, 3) == 1 else sequences


def set_dir(out: Path, k: float, family: str, sequences: str = "both") -> Path:
    """One family's cases at one K (and stretched sequences): separate folders, since a seed's case id is
    the same in each."""
    seqs = stretched_in(k, sequences)
    return out / (f"k{k:.2f}" if seqs == "both" else f"k{k:.2f}-{seqs}") / family


def _write_case(job: tuple[int, str, float, str, str]) -> str:
    seed, family, k, out, sequences = job
    from phantom.api import case_id_for, make_case, write_training_case

    d = set_dir(Path(out), k, family, sequences)
    if (d / case_id_for(seed) / "truth.json").is_file():
        return str(d / case_id_for(seed))
    return str(write_training_case(make_case(seed, family=family, randomise=True, grey_contrast=k,
                                             grey_contrast_in=stretched_in(k, sequences)), d))


def write_sets(out: Path, seeds: list[int], contrasts: list[float], workers: int, sequences: str = "both") -> list[Path]:
    """Each seed in each family at each K (kept: a second run reuses them). Returns the case folders."""
    jobs = [(s, f, k, str(out), sequences) for k in contrasts for f in FAMILIES for s in seeds]
    if workers <= 1:
        return [Path(p) for p in map(_write_case, jobs)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from common.procs import spawned_pool

    with spawned_pool(workers) as pool:
        return [Path(p) for p in pool.map(_write_case, jobs, chunksize=1)]


STANDARDISE = "+std"  # model spec suffix: the same weights, inputs standardised to the training landmarks


def standardising(synth, reference: dict) -> None:
    """Make ``synth`` standardise DWI and FLAIR to the median training study's landmarks before sampling.

    The landmarks are the input reference's medians (over the training cases) of the 5th, 25th, 75th
    and 95th percentiles of normal-appearing brain (the core grown by two voxels left out, as the
    confidence's input part takes them). Experimental, bench only: the service does not do it."""
    from models.confidence import normal_appearing
    from models.tmax_ddpm.preprocess import standardise_landmarks

    feats = reference["features"]
    targets = {name: {q: feats[f"{name}_p{q:02d}"]["q50"] + 1.0 for q in (5, 25, 75, 95)} for name in ("dwi", "flair")}
    sample = synth.synthesize

    def synthesize(dwi, flair, core, brain, **kw):
        brain_b = np.asarray(brain) > 0
        normal = normal_appearing(brain_b, None if core is None else np.asarray(core) > 0.5)
        dwi = standardise_landmarks(dwi, brain_b, normal, targets["dwi"])
        flair = None if flair is None else standardise_landmarks(flair, brain_b, normal, targets["flair"])
        return sample(dwi, flair, core, brain, **kw)

    synth.synthesize = synthesize


def load_model(spec: str):
    """The synthesizer and its input reference for a model spec (a name or folder, ``+std`` suffix allowed)."""
    from models.confidence import load_reference
    from models.tmax_ddpm.inference import TmaxSynthesizer

    weights = spec.removesuffix(STANDARDISE)
    synth = TmaxSynthesizer.load(weights, device="cpu")
    reference = load_reference(synth.source)
    if spec.endswith(STANDARDISE):
        if reference is None:
            raise ValueError(f"{weights}: no input reference beside the weights to standardise to")
        standardising(synth, reference)
    return synth, reference


def rows_file(out: Path, model: str) -> Path:
    """Where one model's rows are kept, so a later run with another model reuses them."""
    return out / f"rows_{model.strip('/').replace('/', '_')}.json"


def _row_key(row: dict) -> tuple:
    """A scored case: its family, case id, K and stretched sequences (rows from before session 23: both)."""
    return row["family_set"], row["case"], row["contrast"], row.get("contrast_in", "both")


def score(model: str, case_dirs: list[Path], out: Path | None = None) -> list[dict]:
    """One row per case, as ``synthperf evaluate --no-core`` scores it, plus its K and drawn ratios.

    With ``out``, rows already scored for ``model`` on these cases are read back instead of sampled
    again (the cases are kept too), and new ones written there."""

    cached = {}
    if out is not None and rows_file(out, model).is_file():
        cached = {_row_key(r): r for r in json.loads(rows_file(out, model).read_text())}
    from models.evaluate import evaluate_case

    loaded = None  # the weights are loaded only when a case is not read back
    rows = []
    for i, d in enumerate(case_dirs):
        dom = json.loads((d / "truth.json").read_text())["domain"]
        key = _row_key({"family_set": d.parent.name, "case": d.name, "contrast": dom["grey_contrast"],
                        "contrast_in": dom.get("grey_contrast_in", "both")})
        if key in cached:
            rows.append(cached[key])
            continue
        if loaded is None:
            loaded = load_model(model)
        synth, reference = loaded
        row = evaluate_case(synth, d, None, None, 0, reference=reference)
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}  # JSON-safe
        row.update(model=model, family_set=d.parent.name, contrast=dom["grey_contrast"], contrast_in=key[3],
                   flair_gm_wm=dom["gm_wm_ratio"]["flair"], s0_gm_wm=dom["gm_wm_ratio"]["s0"])
        rows.append(row)
        what = "healthy" if row["no_stroke"] else f"stroke Dice {row['model_dice6']:.3f}"
        print(f"  [{i + 1}/{len(case_dirs)}] {model} K {row['contrast']:.2f} {row['family_set']} {row['case']} "
              f"{what}: Tmax>6 {row['model_tmax6_ml']:.1f} mL{', low confidence' if row['confidence_low'] else ''}",
              flush=True)
    if out is not None:  # keep what earlier runs scored on other K too
        cached.update({_row_key(r): r for r in rows})
        rows_file(out, model).write_text(json.dumps(list(cached.values())))
    return rows


def _paired(a: list[float], b: list[float]) -> str:
    d = np.asarray(b) - np.asarray(a)
    if len(d) < 2:
        return f"{d.mean():+.3f}" if len(d) else "-"
    return f"{d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.3f})"


def drawn_ratios(n: int = 1000) -> str:
    """The grey/white ratios the randomised phantom draws (the training distribution), for scale."""
    from phantom.anatomy import GM, WM
    from phantom.randomise import DomainParams

    parts = []
    for seq, name in (("s0", "b0"), ("flair", "FLAIR")):
        r = np.array([(tb := DomainParams.sample(s).tables[seq])[GM] / tb[WM] for s in range(n)])
        parts.append(f"{name} median {np.median(r):.2f}, 95th percentile {np.percentile(r, 95):.2f}, max {r.max():.2f}")
    return f"grey/white ratio drawn over {n} randomised cases: " + "; ".join(parts)


def otsu_ratio(values: np.ndarray, bins: int = 128) -> float:
    """Mean of the upper class over the lower one, split where Otsu's between-class variance peaks.

    A two-tissue estimate of grey over white without a segmentation: what a run-time check could use."""
    v = np.asarray(values, dtype=float).ravel()
    if v.size < 2 or v.min() == v.max():
        raise ValueError("values: need at least two distinct values")
    h, edges = np.histogram(v, bins)
    c = (edges[:-1] + edges[1:]) / 2
    w0, s0 = np.cumsum(h)[:-1], np.cumsum(h * c)[:-1]
    w1, s1 = h.sum() - w0, (h * c).sum() - s0
    ok = (w0 > 0) & (w1 > 0)
    m0, m1 = np.where(ok, s0 / np.maximum(w0, 1), 0), np.where(ok, s1 / np.maximum(w1, 1), 0)
    i = int(np.argmax(np.where(ok, w0 * w1 * (m1 - m0) ** 2, -1)))
    return float(m1[i] / m0[i])


def contrast_statistics(case_dir: Path) -> dict[str, float]:
    """Grey-white contrast as the service could estimate it, per sequence, from a case folder.

    Over normal-appearing brain (the core grown by two voxels left out, as the confidence's input part
    takes it), the image over its brain median: 75th over 25th percentile, their difference, 90th over
    50th, and the Otsu ratio of the voxels between 0.5 and 2.5 times the median (CSF and the brightest
    vessels left out). Session 23 asked whether any of them could flag a stretched cortex."""
    from models.confidence import normal_appearing
    from models.tmax_ddpm.data import load_case
    from models.tmax_ddpm.preprocess import normalise_image

    c = load_case(case_dir)
    brain = c.brain
    normal = normal_appearing(brain, c.images["core"] > 0.5)
    out = {}
    for name in ("dwi", "flair"):
        v = normalise_image(c.images[name], brain, name)[normal] + 1.0
        p25, p50, p75, p90 = np.percentile(v, [25, 50, 75, 90])
        out[f"{name}_p75_over_p25"] = float(p75 / p25)
        out[f"{name}_p75_minus_p25"] = float(p75 - p25)
        out[f"{name}_p90_over_p50"] = float(p90 / p50)
        out[f"{name}_otsu_ratio"] = otsu_ratio(v[(v > 0.5) & (v < 2.5)])
    return out


def visibility(case_dirs: list[Path], contrasts: list[float]) -> list[str]:
    """Markdown: for each run-time contrast statistic, how many cases at the last K lie beyond the range
    of the cases as drawn (the first K), and in how many the same case's statistic rose."""
    stats, truth = {}, {}
    for d in case_dirs:
        domain = json.loads((d / "truth.json").read_text())["domain"]
        key = (d.parent.name, d.name, domain["grey_contrast"])
        stats[key], truth[key] = contrast_statistics(d), domain["gm_wm_ratio"]
    k0, k1 = round(contrasts[0], 3), round(contrasts[-1], 3)
    pairs = [(key, (key[0], key[1], k1)) for key in stats if key[2] == k0 and (key[0], key[1], k1) in stats]
    lines = [f"Run-time contrast statistics, the same {len(pairs)} case(s) at K = {k0:g} and {k1:g}:", "",
             f"| statistic | range at K = {k0:g} | median at K = {k1:g} | K = {k1:g} cases beyond the K = {k0:g} range "
             "| same case rose |", "|---|---|---|---|---|"]
    truth_rows = [("drawn FLAIR grey/white ratio (truth, not visible)", "flair"), ("drawn b0 grey/white ratio (truth)", "s0")]
    table_rows = [(label, [truth[a][seq] for a, _ in pairs], [truth[b][seq] for _, b in pairs]) for label, seq in truth_rows]
    table_rows += [(name, [stats[a][name] for a, _ in pairs], [stats[b][name] for _, b in pairs])
                   for name in next(iter(stats.values()))]
    for label, lo, hi in table_rows:
        lo_a, hi_a = np.asarray(lo), np.asarray(hi)
        lines.append(f"| {label} | {lo_a.min():.3f}-{lo_a.max():.3f} | {np.median(hi_a):.3f} | "
                     f"{int(np.sum(hi_a > lo_a.max()))} of {len(hi_a)} | {int(np.sum(hi_a > lo_a))} of {len(hi_a)} |")
    return lines


def table(rows: list[dict], models: list[str], contrasts: list[float]) -> list[str]:
    """Markdown: per model and K, healthy false volume and calls, stroke Dice, paired against K = 1."""
    contrasts = [round(k, 3) for k in contrasts]  # as truth.json records them
    lines = [drawn_ratios(),
             "", "| model | K | FLAIR GM/WM median | healthy: false Tmax>6 s mean / median / max mL | raw \"yes\" | "
             "served \"yes\" | low confidence | strokes: Dice>6 | Dice vs K=1 (paired) | healthy mL vs K=1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    key = {(r["model"], r["family_set"], r["case"], r["contrast"]): r for r in rows}
    k0 = contrasts[0]
    for m in models:
        for k in contrasts:
            rs = [r for r in rows if r["model"] == m and r["contrast"] == k]
            h, s = [r for r in rs if r["no_stroke"]], [r for r in rs if not r["no_stroke"]]
            hv = [r["model_tmax6_ml"] for r in h]
            raw = sum(bool(r["model_defuse3"]) for r in h)
            served = sum(bool(r["model_defuse3"]) and not r["confidence_low"] for r in h)
            base_h = [key[(m, r["family_set"], r["case"], k0)]["model_tmax6_ml"] for r in h]
            base_s = [key[(m, r["family_set"], r["case"], k0)]["model_dice6"] for r in s]
            lines.append(
                f"| {m} | {k:g} | {np.median([r['flair_gm_wm'] for r in rs]):.3f} | "
                f"{np.mean(hv):.1f} / {np.median(hv):.1f} / {max(hv):.1f} ({len(h)}) | {raw} | {served} | "
                f"{sum(bool(r['confidence_low']) for r in rs)} of {len(rs)} | "
                f"{np.mean([r['model_dice6'] for r in s]):.3f} ({len(s)}) | "
                f"{'reference' if k == k0 else _paired(base_s, [r['model_dice6'] for r in s])} | "
                f"{'reference' if k == k0 else _paired(base_h, hv)} |")
    ref = models[0]
    for m in models[1:]:
        for k in contrasts:
            pairs = [(key[(ref, r['family_set'], r['case'], k)], r) for r in rows if r["model"] == m and r["contrast"] == k]
            h = [(a["model_tmax6_ml"], b["model_tmax6_ml"]) for a, b in pairs if b["no_stroke"]]
            s = [(a["model_dice6"], b["model_dice6"]) for a, b in pairs if not b["no_stroke"]]
            lines.append(f"- {m} against {ref} at K {k:g}: healthy false mL {_paired(*zip(*h, strict=True))}, "
                         f"stroke Dice {_paired(*zip(*s, strict=True))}")
    return lines


def picture(models: list[str], rows: list[dict], out: Path, contrasts: list[float], png: Path,
            sequences: str = "both") -> Path:
    """The healthy brain whose false Tmax>6 s grew most from the first K to the last under the first model:
    FLAIR and each model's Tmax at both K, on the slice with the most false Tmax>6 s at the last K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.tmax_ddpm.data import load_case

    k0, k1 = round(contrasts[0], 3), round(contrasts[-1], 3)
    first = {(r["family_set"], r["case"], r["contrast"]): r["model_tmax6_ml"] for r in rows
             if r["model"] == models[0] and r["no_stroke"]}
    fam, case = max(((f, c) for f, c, k in first if k == k1 and (f, c, k0) in first),
                    key=lambda fc: first[(*fc, k1)] - first[(*fc, k0)])
    cases = {k: load_case(set_dir(out, k, fam, sequences) / case) for k in (k0, k1)}
    maps: dict[tuple[str, float], np.ndarray] = {}
    for m in models:
        synth, _ = load_model(m)
        for k, c in cases.items():
            im = c.images
            maps[(m, k)] = synth.synthesize(im["dwi"], im["flair"], (im["core"] > 0.5).astype(np.float32), c.brain,
                                            adc=im["adc"], spacing_zyx=c.spacing_zyx, seed=0).mean
    z = int(np.argmax(((maps[(models[0], k1)] > 6) & cases[k1].brain).sum(axis=(1, 2))))
    cols = 1 + len(models)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.6))
    for i, k in enumerate((k0, k1)):
        fl = cases[k].images["flair"][z]
        axes[i, 0].imshow(np.flipud(fl), cmap="gray", vmin=0, vmax=np.percentile(fl[cases[k].brain[z]], 99.5))
        axes[i, 0].set_title(f"FLAIR, grey contrast x{k:g}", fontsize=8)
        for j, m in enumerate(models):
            t = maps[(m, k)][z]
            ax = axes[i, 1 + j]
            ax.imshow(np.flipud(t), cmap="magma", vmin=0, vmax=12)
            ax.contour(np.flipud(t > 6), levels=[0.5], colors="cyan", linewidths=0.7)
            vol = ((maps[(m, k)] > 6) & cases[k].brain).sum() * float(np.prod(cases[k].spacing_zyx)) / 1000
            ax.set_title(f"Tmax, {m}: {vol:.0f} mL > 6 s", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"SYNTHETIC PHANTOM, not for diagnosis.\nHealthy brain {fam} {case}, its grey-white contrast "
                 f"as drawn and x{k1:g};\nTmax 0-12 s, false Tmax>6 s outlined in cyan", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo"],
                    help="registry names or weights folders, first = reference; NAME+std: the same weights with "
                         "DWI and FLAIR standardised to the training landmarks (experimental)")
    ap.add_argument("--healthy", type=int, default=2, help="healthy brains per family")
    ap.add_argument("--strokes", type=int, default=1, help="strokes per family")
    ap.add_argument("--contrast", type=float, nargs="+", default=[1.0, 3.0], help="K values; the first is the reference")
    ap.add_argument("--contrast-in", choices=("both", "dwi", "flair"), default="both",
                    help="stretch both sequences (default), or the DWI (its b0) or FLAIR alone: which one does a model read?")
    ap.add_argument("--seed-base", type=int, default=SEED_BASE)
    ap.add_argument("--out", type=Path, help="where the cases and rows.csv go (default: a temporary folder)")
    ap.add_argument("--workers", type=int, default=2, help="processes writing the cases")
    ap.add_argument("--picture", type=Path, help="also draw the healthy brain that changed most (PNG)")
    ap.add_argument("--visibility", action="store_true",
                    help="also tabulate run-time grey-white contrast statistics: could a check see the stretch?")
    args = ap.parse_args(argv)
    if args.healthy < 1 or args.strokes < 1:
        ap.error("--healthy and --strokes must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        seeds = pick_seeds(args.healthy, args.strokes, args.seed_base)
        print(f"seeds: healthy {seeds['healthy']}, strokes {seeds['stroke']}; K {args.contrast} in {args.contrast_in}; "
              f"-> {out}", flush=True)
        dirs = write_sets(out, seeds["healthy"] + seeds["stroke"], args.contrast, args.workers, args.contrast_in)
        rows = [r for m in args.models for r in score(m, dirs, args.out)]
        with open(out / "rows.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
        print("\n".join(table(rows, args.models, args.contrast)))
        if args.visibility:
            print("\n".join(visibility(dirs, args.contrast)))
        if args.picture:
            print(f"picture: {picture(args.models, rows, out, args.contrast, args.picture, args.contrast_in)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
