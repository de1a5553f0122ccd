"""The core rule's smallest-lesion floor (``CoreParams.min_component_ml``) and noise support
(``CoreParams.low_support``) on phantom sets and ISLES'22.

Why: issue 15 item 5 asks for core Dice per family, and what holds the randomised means below 0.85 are
the sub-millilitre cores (lacunes), some of them under the rule's 0.1 mL floor. A lower floor finds
more of them, and also keeps more specks of noise, on a real scan as well as on the phantom. This
scores each floor side by side on the same cases: core Dice per family over the cases with a core,
the sub-1-mL cores (mean Dice, how many found nothing), false cores on the cases without one (healthy
brains and strokes without a core apart), and the number and volume of components on the real
ISLES'22 case (no truth mask there: more components are not known to be more lesions).

The noise support (session 28) asks each low-ADC voxel for low neighbours; ``--supports 2 0`` scores the
rule with and without it at every floor, so the price on small lesions and the gain on noise sit side by
side on the same cases.

Reference: the shipped rule, ``CoreParams()``'s floor and support. Quality, not speed: no timing.

    python -m bench.core_floor --data runs/data/af12 [--data ...] [--floors 0.1 0.05 0.03 0] [--supports 2 0]

Without ``--data`` (as ``make bench`` runs it) it scores the first 8 cases of each family of set A
(randomised, template seeds 200000.., geometric seeds 210000..), written to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from bench.core_rule import REALDATA
from models.evaluate import case_family
from models.tmax_ddpm.data import list_cases, load_case, lps_direction
from models.tmax_ddpm.metrics import dice, volume_ml
from worker.pipeline.core import CoreParams, segment_core

SUB_ML = 1.0  # a core under this is "sub-millilitre"
CASE_FILES = ("dwi", "adc", "core", "tmax", "brain")  # what a case needs to be scored


Variant = tuple[float, int]  # (min_component_ml, low_support)


def _params(v: Variant) -> CoreParams:
    return CoreParams(min_component_ml=v[0], low_support=v[1])


def _name(v: Variant) -> str:
    return f"floor {v[0]:g} support {v[1]}"


def score_case(case_dir: Path, floors: tuple[Variant, ...]) -> dict:
    """Truth core volume, family, whether the study has hypoperfusion, and each variant's core volume and Dice."""
    case = load_case(case_dir, CASE_FILES)
    im, spacing = case.images, case.spacing_zyx
    ml = float(np.prod(spacing)) / 1000.0
    truth = im["core"] > 0
    row: dict = {"case": case.case_id, "family": case_family(case.truth), "core_ml": volume_ml(truth, ml),
                 "hypo": bool((im["tmax"] > 6.0).any())}
    direction = lps_direction(case_dir / "dwi.nii.gz")
    for f in floors:
        mask = segment_core(im["adc"], im["dwi"], case.brain, spacing, _params(f), direction=direction).mask
        row[f] = (volume_ml(mask, ml), dice(mask, truth))  # Dice is read only where there is a truth core
    return row


def summarise(rows: list[dict], floor: Variant) -> dict[str, float]:
    """One variant's figures over the scored cases (see the module docstring)."""
    with_core = [r for r in rows if r["core_ml"] > 0]
    out: dict[str, float] = {"all": float(np.mean([r[floor][1] for r in with_core]))}
    by_family: dict[str, list[float]] = defaultdict(list)
    for r in with_core:
        by_family[r["family"]].append(r[floor][1])
    out.update({fam: float(np.mean(d)) for fam, d in sorted(by_family.items())})
    sub = [r[floor][1] for r in with_core if r["core_ml"] < SUB_ML]
    out["sub_ml_dice"] = float(np.mean(sub)) if sub else float("nan")
    out["sub_ml_missed"] = float(sum(d == 0.0 for d in sub))
    for name, keep in (("healthy", lambda r: not r["hypo"]), ("no_core_stroke", lambda r: r["hypo"])):
        free = [r[floor][0] for r in rows if r["core_ml"] == 0 and keep(r)]
        out[f"false_{name}"] = float(sum(v > 0 for v in free))
        out[f"false_{name}_max_ml"] = max(free, default=0.0)
    return out


def write_set_a(out: Path, per_family: int = 8) -> Path:
    """The first cases of set A, as `synthperf phantom --randomise --training-only` writes them."""
    from phantom.api import make_case, write_training_case

    for family, seed in (("template", 200000), ("geometric", 210000)):
        for i in range(per_family):
            write_training_case(make_case(seed + i, family=family, randomise=True), out)
    return out


def isles_components(floors: tuple[Variant, ...]) -> dict[Variant, tuple[float, int]] | None:
    """Core volume (mL) and number of components on the real ISLES'22 case, per variant; None without it."""
    if not (REALDATA / "isles22").is_dir():
        return None
    from tests.unit.test_core_isles import load_isles

    d = load_isles(REALDATA)
    ml = float(np.prod(d["spacing"])) / 1000.0
    out = {}
    for f in floors:
        mask = segment_core(d["adc"], d["dwi"], d["brain"], d["spacing"], _params(f), direction=d["direction"]).mask
        out[f] = (volume_ml(mask, ml), int(ndi.label(mask, np.ones((3, 3, 3), bool))[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", help="phantom NIfTI set with adc.nii.gz (repeatable; default: "
                   "the first 8 cases of each family of set A, made here)")
    p.add_argument("--floors", type=float, nargs="+", default=[0.1, 0.05, 0.03, 0.0])
    p.add_argument("--supports", type=int, nargs="+", default=[CoreParams().low_support],
                   help="noise supports to score at every floor (low in-plane neighbours a low voxel needs)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    shipped = CoreParams()
    ref = (shipped.min_component_ml, shipped.low_support)
    floors = tuple(dict.fromkeys([ref, *((f, k) for k in args.supports for f in args.floors)]))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or [str(write_set_a(Path(tmp)))]
        return report(data, floors, ref, args.workers)


def report(data: list[str], floors: tuple[Variant, ...], ref: Variant, workers: int) -> int:
    """Score every variant on the cases under ``data`` and print the table against the reference."""
    cases = [c for d in data for c in list_cases(d, CASE_FILES)]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        rows = list(pool.map(score_case, cases, [floors] * len(cases)))
    n_core = sum(r["core_ml"] > 0 for r in rows)
    n_sub = sum(0 < r["core_ml"] < SUB_ML for r in rows)
    print(f"{len(rows)} cases from {', '.join(data)}: {n_core} with a core ({n_sub} under {SUB_ML:g} mL); "
          f"reference: the shipped rule, {_name(ref)}")
    sums = {f: summarise(rows, f) for f in floors}
    keys = list(sums[ref])
    print(f"{'variant':24s}" + "  ".join(f"{k:>14s}" for k in keys))
    for f in floors:
        print(f"{_name(f):24s}" + "  ".join(f"{sums[f][k]:14.3f}" for k in keys))
    for f in floors:
        if f != ref:
            print(f"{_name(f)} - reference: " + ", ".join(
                f"{k} {sums[f][k] - sums[ref][k]:+.3f}" for k in keys if not k.endswith("_max_ml")))
    isles = isles_components(floors)
    if isles is not None:
        print("ISLES'22 sub-strokecase0001 (real, no truth mask): "
              + "; ".join(f"{_name(f)}: {v:.2f} mL in {n} components" for f, (v, n) in isles.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
