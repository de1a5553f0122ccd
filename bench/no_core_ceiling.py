"""How much a Tmax>6 s map can get right on stroke studies without a visible core (issue 15's ceiling).

Not a timing benchmark and not run by ``make bench``: it reads an evaluation (``synthperf evaluate``'s
per_case.csv) and the held-out phantom cases it scored, and for the stroke studies whose core is under
1 mL compares the model with an **oracle**: the whole vascular territory (territory.nii.gz) of every
FLAIR vessel hyperintensity the phantom drew (fvh.nii.gz, the truth, which no model sees). It then says
what Dice the no-core studies would need for a mean over all stroke studies of ``--target`` if the
studies with a core scored ``--with-core``.

The same for the DEFUSE-3 call (issue 15 asks 90 % agreement over all studies): on a study without a core
the call is "yes" exactly when 15 mL or more is hypoperfused, so it rests on the same missing evidence.
The ceiling counts every study with a core and every healthy brain as called right, and a no-core study
as right when the model's call or the oracle's (the vessel signs' territories as the Tmax>6 s volume) is:
an upper bound for a method that reads what the inputs show. A second, nearer bound keeps the model's own
calls on the studies with a core and the healthy brains and takes the better of the two on the no-core
ones: what a perfect no-core method would add to this model. ``--signs`` lists how bright the drawn
vessel signs of the no-core "yes" studies are against the brain's own bright tail, at full resolution
and on the model grid, and (from ``evaluate --save-maps``'s maps) how much of their hypoperfusion lies
in slices whose 2.5D window holds a sign and how much of it the model finds there: whether the model's
misses are signs it cannot see (out of its window, blurred by its grid) or signs it sees and does not use.

    .venv/bin/python -m bench.no_core_ceiling runs/eval/demo runs/data/heldout96 [EVAL_DIR DATA ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.confidence import ConfidenceParams, auroc
from models.evaluate import read_rows
from models.tmax_ddpm.config import ModelConfig
from models.tmax_ddpm.data import Case, load_case
from models.tmax_ddpm.metrics import defuse3, dice, volume_ml
from models.tmax_ddpm.preprocess import Geometry, normalise_image, to_grid

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "synthperf evaluate output folders and the cases they scored"


class OracleCall(NamedTuple):
    dice: float  # evaluate's Dice (metrics.dice) against the true Tmax>6 s
    sign_voxels: int  # voxels of true vessel sign
    called_ml: float  # the oracle's Tmax>6 s volume


#: every image the tables here read, loaded once per case (each function also takes a case folder)
CASE_IMAGES = ("tmax", "brain", "territory", "fvh", "flair")


def _loaded(case: Path | Case, names: tuple[str, ...]) -> Case:
    return case if isinstance(case, Case) else load_case(case, names)


def fvh_territory_oracle(case: Path | Case) -> OracleCall:
    """'The territories holding the true vessel signs' as a Tmax>6 s call, scored against the truth."""
    c = _loaded(case, ("tmax", "brain", "territory", "fvh"))
    brain = c.images["brain"] > 0
    truth = (c.images["tmax"] > 6) & brain
    fvh = c.images["fvh"] > 0
    terr = c.images["territory"].astype(int)
    labels = np.unique(terr[fvh & (terr > 0)])
    pred = np.isin(terr, labels) & brain if labels.size else np.zeros_like(brain)
    return OracleCall(dice(pred, truth), int(fvh.sum()), volume_ml(pred, float(np.prod(c.spacing_zyx)) / 1000.0))


class SignContrast(NamedTuple):
    sign_median: float  # median FLAIR of the true vessel-sign voxels, over the brain median
    brain_p99: float  # the brain's 99th FLAIR percentile, over the brain median


def sign_contrast(case: Path | Case, grid: int | None = None) -> SignContrast | None:
    """How bright the drawn vessel signs are against the brain's own bright tail (None without a sign): a sign
    no brighter than the top 1 % of the brain is hard to tell from the brain's own bright voxels (look-alikes,
    noise) by its intensity alone. At full resolution, or on the model's in-plane ``grid`` (the images
    area-averaged as the model gets them; a sign voxel is one at least half covered by the drawn sign)."""
    c = _loaded(case, ("flair", "brain", "fvh"))
    brain, fvh = c.images["brain"] > 0, c.images["fvh"] > 0
    if not fvh.any():
        return None
    flair = normalise_image(c.images["flair"], brain, "flair") + 1.0
    if grid is not None:
        geo = Geometry.for_shape(brain.shape[1], brain.shape[2], grid)
        flair, cover, share = (to_grid(a.astype(np.float32), geo, background=0.0).numpy() for a in (flair, brain, fvh))
        brain, fvh = cover > 0.5, (share >= 0.5) & (cover > 0.5)
        if not fvh.any():
            return None
    return SignContrast(float(np.median(flair[fvh])), float(np.percentile(flair[brain], 99)))


class SignReach(NamedTuple):
    hypo_slices: int  # slices with true Tmax>6 s
    in_window: int  # ... whose 2.5D window (the model's k slices around it) holds a drawn sign
    truth_voxels: int  # true Tmax>6 s voxels in those windowed slices
    found_voxels: int  # ... that the model's map calls too


def sign_reach(case: Path | Case, mean_map: np.ndarray, k: int) -> SignReach:
    """Whether the vessel signs lie within the model's reach of the hypoperfused slices, and what it found there."""
    c = _loaded(case, ("tmax", "brain", "fvh"))
    brain = c.images["brain"] > 0
    truth = (c.images["tmax"] > 6) & brain
    nz, half = truth.shape[0], k // 2
    signed = (c.images["fvh"] > 0).reshape(nz, -1).any(1)
    window = np.array([signed[max(0, z - half): z + half + 1].any() for z in range(nz)])
    hypo = truth.reshape(nz, -1).any(1)
    found = truth & (mean_map > 6)
    return SignReach(int(hypo.sum()), int((hypo & window).sum()), int(truth[window].sum()), int(found[window].sum()))


def _sign_kind(sc: SignContrast | None) -> str:
    return "none" if sc is None else ("clear" if sc.sign_median > sc.brain_p99 else "faint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path, nargs="+", metavar="EVAL_DIR DATA",
                    help="a synthperf evaluate output folder (per_case.csv) and the held-out cases it scored (with "
                         "fvh.nii.gz, territory.nii.gz); more pairs are pooled")
    ap.add_argument("--target", type=float, default=0.75, help="mean Dice over all stroke studies to reach")
    ap.add_argument("--with-core", type=float, default=0.85, help="assumed Dice on studies with a visible core")
    ap.add_argument("--defuse3-target", type=float, default=0.90, help="DEFUSE-3 agreement over all studies to reach")
    ap.add_argument("--signs", action="store_true", help="also list each no-core study that is truly 'yes' with how "
                    "bright its vessel signs are against the brain's 99th FLAIR percentile, and what the model finds "
                    "within reach of them (needs evaluate --save-maps)")
    ap.add_argument("--grid", type=int, default=ModelConfig().grid, help="the model's in-plane grid, for --signs")
    ap.add_argument("--slices", type=int, default=ModelConfig().slices, help="the model's 2.5D window, for --signs")
    args = ap.parse_args(argv)
    visible = ConfidenceParams().anchor_ok_ml
    if len(args.pairs) % 2:
        ap.error("give EVAL_DIR DATA pairs")
    every, data_of, eval_of = [], {}, {}
    for ev, data in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        for r in read_rows(ev / "per_case.csv"):
            every.append(r)
            data_of[r["case"]], eval_of[r["case"]] = data, ev
    rows = [r for r in every if not r.get("no_stroke")]
    cases = {r["case"]: load_case(data_of[r["case"]] / r["case"], CASE_IMAGES) for r in no_core_strokes(rows, visible)}
    oracle_of = {name: fvh_territory_oracle(c) for name, c in cases.items()}
    print(f"{' + '.join(str(e) for e in args.pairs[::2])}: stroke studies without a visible core (< {visible} mL); oracle = the territories "
          "of the true FLAIR vessel signs")
    print("| family | stroke | no core | ... with signs | model | oracle | best of both | needed for the target |")
    print("|---|---|---|---|---|---|---|---|")
    for fam in sorted({r["family"] for r in rows}):
        stroke = [r for r in rows if r["family"] == fam]
        no_core = no_core_strokes(stroke, visible)
        if not no_core:
            continue
        scored = [(r["model_dice6"], *oracle_of[r["case"]]) for r in no_core]
        model, oracle = np.array([s[0] for s in scored]), np.array([s[1] for s in scored])
        with_signs = sum(s[2] > 0 for s in scored)
        n, m = len(stroke), len(no_core)
        needed = (args.target * n - args.with_core * (n - m)) / m
        print(f"| {fam} | {n} | {m} | {with_signs} | {model.mean():.3f} | {oracle.mean():.3f} | "
              f"{np.maximum(model, oracle).mean():.3f} | {needed:.3f} |")
    print("\nDEFUSE-3 agreement over all studies; no-core stroke studies called by the model, by the oracle, and the "
          "ceiling (every other study right, a no-core one right if either call is)")
    print("| family | studies | no-core stroke | ... truth 'yes' | model, all studies | no-core: model | ... oracle | "
          "ceiling, all studies | this model elsewhere, best of both on no-core |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fam in sorted({r["family"] for r in every}) + ["all"]:
        studies = [r for r in every if fam in ("all", r["family"])]
        b = defuse3_bounds(studies, {c: o.called_ml for c, o in oracle_of.items()}, visible)
        print(f"| {fam} | {len(studies)} | {b.no_core} | {b.no_core_yes} | {b.model:.2f} | {b.model_no_core} | "
              f"{b.oracle_no_core} | {b.ceiling:.2f} | {b.nearer:.2f} |")
    print(f"\nWhat the {len(oracle_of)} no-core stroke studies show of their true "
          "DEFUSE-3 call (on a study without a core: 15 mL or more hypoperfused)")
    print("| evidence | AUROC | share called right |")
    print("|---|---|---|")
    for line in evidence_lines(every, {c: o.sign_voxels for c, o in oracle_of.items()}, visible, args.defuse3_target):
        print(line)
    if args.signs:
        print("\nNo-core stroke studies whose true call is 'yes': the drawn vessel signs' median FLAIR against the "
              "brain's 99th percentile (both over the brain median, full resolution)")
        print("| case | true Tmax>6 mL | model mL | sign voxels | sign median | brain p99 | sign above p99 | "
              f"... on the {args.grid} grid |")
        print("|---|---|---|---|---|---|---|---|")
        kinds: dict[tuple[str, str], list[bool]] = {}
        reach: dict[str, list[SignReach]] = {}
        for r in no_core_strokes(rows, visible):
            if not r["true_defuse3"]:
                continue
            case = cases[r["case"]]
            sc, sc_grid = sign_contrast(case), sign_contrast(case, args.grid)
            cells = ("-", "-", "no sign drawn") if sc is None else (
                f"{sc.sign_median:.2f}", f"{sc.brain_p99:.2f}", "yes" if sc.sign_median > sc.brain_p99 else "no")
            print(f"| {r['case']} | {r['true_tmax6_ml']:.0f} | {r['model_tmax6_ml']:.0f} | "
                  f"{oracle_of[r['case']].sign_voxels} | " + " | ".join(cells) + f" | {_sign_kind(sc_grid)} |")
            kinds.setdefault((_sign_kind(sc), _sign_kind(sc_grid)), []).append(r["model_tmax6_ml"] >= 15)
            maps = eval_of[r["case"]] / "maps" / f"{r['case']}.npz"
            if maps.exists():
                reach.setdefault(_sign_kind(sc), []).append(
                    sign_reach(case, np.load(maps)["mean"].astype(np.float32), args.slices))
        print(f"\nThe same studies by sign, at full resolution and on the {args.grid} grid")
        print("| signs | on the model grid | studies | model 'yes' (15 mL or more) |")
        print("|---|---|---|---|")
        for (full, on_grid), yes in sorted(kinds.items()):
            print(f"| {full} | {on_grid} | {len(yes)} | {sum(yes)} |")
        if reach:
            print(f"\nWithin the model's reach ({args.slices}-slice window holding a sign): hypoperfused slices and "
                  "the true Tmax>6 s voxels there that the model's mean map calls")
            print("| signs | studies | hypoperfused slices | ... with a sign in the window | found in those slices |")
            print("|---|---|---|---|---|")
            for kind, rs in sorted(reach.items()):
                hypo, win = sum(x.hypo_slices for x in rs), sum(x.in_window for x in rs)
                found = sum(x.found_voxels for x in rs) / max(1, sum(x.truth_voxels for x in rs))
                print(f"| {kind} | {len(rs)} | {hypo} | {win} ({win / max(1, hypo):.0%}) | {found:.2f} |")
    return 0


def no_core_strokes(studies: list[dict], visible: float) -> list[dict]:
    """The stroke studies without a visible core (under ``visible`` mL): those every table here is about."""
    return [r for r in studies if not r.get("no_stroke") and r["core_ml"] < visible]


class Defuse3Bounds(NamedTuple):
    no_core: int  # no-core stroke studies
    no_core_yes: int  # ... whose true call is "yes"
    model_no_core: int  # ... the model calls right
    oracle_no_core: int  # ... the oracle calls right
    model: float  # the model's agreement over all studies
    ceiling: float  # every other study right, a no-core one right if either call is
    nearer: float  # the model's own calls elsewhere, a no-core one right if either call is


def defuse3_bounds(studies: list[dict], oracle_ml: dict[str, float], visible: float) -> Defuse3Bounds:
    """DEFUSE-3 agreement of the model and the two bounds (module docstring) over ``studies`` (evaluate rows);
    ``oracle_ml`` is the oracle's Tmax>6 s volume of each no-core stroke study."""
    no_core = no_core_strokes(studies, visible)
    truth = [bool(r["true_defuse3"]) for r in no_core]
    model = [bool(r["model_defuse3"]) == t for r, t in zip(no_core, truth, strict=True)]
    oracle = [defuse3(r["core_ml"], oracle_ml[r["case"]])["target"] == t for r, t in zip(no_core, truth, strict=True)]
    either = sum(m or o for m, o in zip(model, oracle, strict=True))
    right = sum(bool(r["model_defuse3_agree"]) for r in studies)
    n = len(studies)
    return Defuse3Bounds(len(no_core), sum(truth), sum(model), sum(oracle), right / n,
                         (n - len(no_core) + either) / n, (right - sum(model) + either) / n)


def best_threshold_accuracy(values: list[float], labels: list[bool]) -> tuple[float, float]:
    """(accuracy, threshold) of the best rule "value >= threshold -> yes" on these very studies
    (chosen in-sample, so an upper bound for that one number); calling every study "no" is a candidate."""
    v, y = np.asarray(values, float), np.asarray(labels, bool)
    best = (float(np.mean(~y)), float("inf"))
    for th in np.unique(v):
        acc = float(np.mean((v >= th) == y))
        if acc > best[0]:
            best = (acc, float(th))
    return best


def needed_no_core_share(studies: list[dict], visible: float, target: float) -> float:
    """Share of the no-core stroke studies that must be called right for DEFUSE-3 agreement ``target``
    over all ``studies``, keeping the model's own calls on every other study."""
    no_core = no_core_strokes(studies, visible)
    others_right = (sum(bool(r["model_defuse3_agree"]) for r in studies)
                    - sum(bool(r["model_defuse3_agree"]) for r in no_core))
    return (target * len(studies) - others_right) / len(no_core) if no_core else float("nan")


def evidence_lines(studies: list[dict], sign_voxels: dict[str, int], visible: float, target: float) -> list[str]:
    """How well the no-core stroke studies' true call can be told from the model's Tmax>6 s volume and
    from the count of drawn vessel-sign voxels (the truth mask: more than any model sees), as AUROC and as
    the best single threshold on these studies, against what ``target`` over all studies needs."""
    no_core = no_core_strokes(studies, visible)
    if not no_core:
        return []
    truth = [bool(r["true_defuse3"]) for r in no_core]
    model_ml = [float(r["model_tmax6_ml"]) for r in no_core]
    signs = [float(sign_voxels[r["case"]]) for r in no_core]
    served = float(np.mean([bool(r["model_defuse3"]) == t for r, t in zip(no_core, truth, strict=True)]))
    lines = []
    for name, values, at_rule in (("model's Tmax>6 s volume", model_ml, f"{served:.3f} at 15 mL (the served rule)"),
                                  ("drawn vessel-sign voxels (truth)", signs, "")):
        acc, th = best_threshold_accuracy(values, truth)
        lines.append(f"| {name} | {auroc(values, truth):.3f} | {at_rule} |")
        lines.append(f"| {name}, best single threshold here | | {acc:.3f} at {th:.4g} |")
    lines.append(f"| needed for {target:.0%} over all {len(studies)} studies | | "
                 f"{needed_no_core_share(studies, visible, target):.3f} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
