"""Where to cut the synthetic mean Tmax map: Dice, volume bias and DEFUSE-3 agreement against the cut.

Not a timing benchmark and not run by ``make bench``. The served map is the voxelwise *mean* of the
samples. A mean shrinks towards the middle wherever the model is unsure (a boundary, a penumbra it
half sees), so cutting it at the clinical 6 s can under-call the Tmax>6 s region even when each sample
is right on average. This reads evaluations made with ``synthperf evaluate --save-maps`` and the cases
they scored, and gives, for each cut of the mean map, the figures evaluate gives at 6 s (and 10 s):
mean Dice over stroke studies (split by a visible core), volume bias, DEFUSE-3 agreement and the false
volume on healthy brains. The cut is chosen on the first evaluation only (a calibration set drawn from
the training distribution); the others are read at that cut, held out.

``--no-core-only`` moves the 6 s cut only on studies without a visible core (healthy brains included),
where the model is least sure and under-calls most; studies with a core keep 6 s. That cut is chosen for
the DEFUSE-3 call (``choose_no_core``), not for Dice, which a lower cut always raises there while the
healthy brains fill with false hypoperfusion.

    .venv/bin/python -m bench.tmax_cut runs/ev/calib:runs/eval-data/calib runs/ev/setA:runs/eval-data/setA
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.evaluate import core_visible, read_rows
from models.tmax_ddpm.data import load_case
from models.tmax_ddpm.metrics import defuse3, dice, volume_ml

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "synthperf evaluate --save-maps output folders and the cases they scored"

CUTS_6 = tuple(np.round(np.arange(4.0, 7.01, 0.25), 2))
CUTS_10 = tuple(np.round(np.arange(7.0, 11.01, 0.5), 2))


def case_scores(maps: Path, case_dir: Path, cuts6: tuple[float, ...], cuts10: tuple[float, ...]) -> dict:
    """Per cut: Dice and volume (mL) of the mean map cut there against the truth at 6 s (and 10 s)."""
    c = load_case(case_dir, ("tmax", "brain", "core"))
    brain = c.images["brain"] > 0
    truth = np.clip(np.nan_to_num(c.images["tmax"]), 0, 20) * brain
    core = (c.images["core"] > 0.5) & brain
    mean = np.load(maps / f"{c.case_id}.npz")["mean"].astype(np.float32)
    voxel_ml = float(np.prod(c.spacing_zyx)) / 1000.0
    t6, t10 = (truth > 6) & brain, (truth > 10) & brain
    out = {"core_ml": volume_ml(core, voxel_ml), "true6_ml": volume_ml(t6, voxel_ml), "d6": {}, "v6": {}, "d10": {}}
    for cut in cuts6:
        p = (mean > cut) & brain
        out["d6"][cut], out["v6"][cut] = dice(p, t6), volume_ml(p, voxel_ml)
    for cut in cuts10:
        out["d10"][cut] = dice((mean > cut) & brain, t10)
    return out


def _is_stroke(c: dict) -> bool:
    """evaluate's split: a no-stroke study has neither a true Tmax>6 s region nor a core."""
    return c["true6_ml"] > 0 or c["core_ml"] > 0


def summarise(cases: list[dict], cut6: float, cut10: float, no_core_only: bool = False) -> dict:
    """evaluate's figures at one pair of cuts (with ``no_core_only``, on the studies without a visible
    core only; the others at 6 and 10 s)."""
    def at(c: dict, cut: float, clinical: float) -> float:
        return cut if not no_core_only or not core_visible(c["core_ml"]) else clinical

    d6 = {id(c): c["d6"][at(c, cut6, 6.0)] for c in cases}
    v6 = {id(c): c["v6"][at(c, cut6, 6.0)] for c in cases}
    stroke = [c for c in cases if _is_stroke(c)]
    healthy = [c for c in cases if not _is_stroke(c)]
    agree = [defuse3(c["core_ml"], v6[id(c)])["target"] == defuse3(c["core_ml"], c["true6_ml"])["target"]
             for c in cases]
    with_core = [d6[id(c)] for c in stroke if core_visible(c["core_ml"])]
    no_core = [d6[id(c)] for c in stroke if not core_visible(c["core_ml"])]
    return {
        "dice6_stroke": float(np.mean([d6[id(c)] for c in stroke])) if stroke else float("nan"),
        "dice6_core": float(np.mean(with_core)) if with_core else float("nan"),
        "dice6_no_core": float(np.mean(no_core)) if no_core else float("nan"),
        "dice10_stroke": float(np.mean([c["d10"][at(c, cut10, 10.0)] for c in stroke])) if stroke else float("nan"),
        "bias6_ml": float(np.mean([v6[id(c)] - c["true6_ml"] for c in cases])),
        "defuse3": float(np.mean(agree)),
        "healthy_false_ml_median": float(np.median([v6[id(c)] for c in healthy])) if healthy else float("nan"),
        "healthy_yes": int(sum(defuse3(0.0, v6[id(c)])["target"] for c in healthy)),
        "n": len(cases), "stroke": len(stroke),
    }


def choose(cases: list[dict]) -> tuple[float, float]:
    """The cuts with the highest mean Dice over the stroke studies (Tmax>6 s and >10 s apart)."""
    stroke = [c for c in cases if _is_stroke(c)]
    c6 = max(stroke[0]["d6"], key=lambda t: np.mean([c["d6"][t] for c in stroke]))
    c10 = max(stroke[0]["d10"], key=lambda t: np.mean([c["d10"][t] for c in stroke]))
    return float(c6), float(c10)


def choose_no_core(cases: list[dict], healthy_ml: float = 5.0) -> float:
    """The no-core cut with the highest DEFUSE-3 agreement over all studies, among the cuts that keep the
    healthy brains' median false Tmax>6 s within ``healthy_ml`` (issue 15's line) and call "yes" on no
    more of them than 6 s does; ties go to the higher no-core Dice, then to 6 s."""
    base = summarise(cases, 6.0, 10.0)
    best, best_key = 6.0, (base["defuse3"], base["dice6_no_core"], 1)
    for cut in cases[0]["d6"]:
        s = summarise(cases, cut, 10.0, no_core_only=True)
        if s["healthy_false_ml_median"] > healthy_ml or s["healthy_yes"] > base["healthy_yes"]:
            continue
        key = (s["defuse3"], s["dice6_no_core"], int(cut == 6.0))
        if key > best_key:
            best, best_key = float(cut), key
    return best


def _row(name: str, cut: str, s: dict) -> str:
    return (f"| {name} | {cut} | {s['n']} ({s['stroke']}) | {s['dice6_stroke']:.3f} | {s['dice6_core']:.3f} | "
            f"{s['dice6_no_core']:.3f} | {s['dice10_stroke']:.3f} | {s['bias6_ml']:+.1f} | {s['defuse3']:.2f} | "
            f"{s['healthy_false_ml_median']:.1f}, {s['healthy_yes']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="EVAL_DIR:DATA_DIR (evaluate --save-maps output : the cases it scored); "
                    "the first is the calibration set")
    ap.add_argument("--sweep", action="store_true", help="also print every cut on the calibration set")
    ap.add_argument("--no-core-only", action="store_true", help="move the 6 s cut only on studies without a "
                    "visible core, chosen for the DEFUSE-3 call (choose_no_core)")
    args = ap.parse_args(argv)
    sets = []
    for pair in args.pairs:
        ev, data = (Path(p) for p in pair.split(":", 1))
        rows = read_rows(ev / "per_case.csv")
        sets.append((ev.name, [case_scores(ev / "maps", data / r["case"], CUTS_6, CUTS_10) for r in rows]))
    only = args.no_core_only
    if only:
        cut6, cut10 = choose_no_core(sets[0][1]), 10.0
        print(f"no-core cut chosen on {sets[0][0]} (highest DEFUSE-3 agreement keeping its healthy brains within "
              f"the lines): Tmax>6 s at {cut6} s of the mean map on studies without a visible core")
    else:
        cut6, cut10 = choose(sets[0][1])
        print(f"cuts chosen on {sets[0][0]} (highest mean Dice over its stroke studies): Tmax>6 s at {cut6} s, "
              f">10 s at {cut10} s of the mean map")
    if args.sweep:
        print("| cut (s) | Dice>6 stroke | core | no core | bias mL | DEFUSE-3 | healthy: median false T>6 mL, 'yes' |")
        print("|---|---|---|---|---|---|---|")
        for t in CUTS_6:
            s = summarise(sets[0][1], t, cut10, no_core_only=only)
            print(f"| {t} | {s['dice6_stroke']:.3f} | {s['dice6_core']:.3f} | {s['dice6_no_core']:.3f} | "
                  f"{s['bias6_ml']:+.1f} | {s['defuse3']:.2f} | {s['healthy_false_ml_median']:.1f}, "
                  f"{s['healthy_yes']} |")
    print("| set | cuts (s) | cases (stroke) | Dice>6 stroke | ... core visible | ... no core | Dice>10 stroke | "
          "vol6 bias mL | DEFUSE-3 agreement | healthy: median false T>6 mL, 'yes' |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cases in sets:
        print(_row(name, "6 / 10", summarise(cases, 6.0, 10.0)))
        print(_row(name, f"{cut6} / {cut10}" + (" (no core)" if only else ""),
                   summarise(cases, cut6, cut10, no_core_only=only)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
