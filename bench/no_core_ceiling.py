"""How much a Tmax>6 s map can get right on stroke studies without a visible core (issue 15's ceiling).

Not a timing benchmark and not run by ``make bench``: it reads an evaluation (``synthperf evaluate``'s
per_case.csv) and the held-out phantom cases it scored, and for the stroke studies whose core is under
1 mL compares the model with an **oracle**: the whole vascular territory (territory.nii.gz) of every
FLAIR vessel hyperintensity the phantom drew (fvh.nii.gz, the truth, which no model sees). It then says
what Dice the no-core studies would need for a mean over all stroke studies of ``--target`` if the
studies with a core scored ``--with-core``.

    .venv/bin/python -m bench.no_core_ceiling runs/eval/demo runs/data/heldout96
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.confidence import ConfidenceParams
from models.evaluate import read_rows
from models.tmax_ddpm.data import load_case
from models.tmax_ddpm.metrics import dice


def fvh_territory_oracle(case_dir: Path) -> tuple[float, int]:
    """Dice (evaluate's, metrics.dice) of 'the territories holding the true vessel signs' against the true
    Tmax>6 s; and the sign's voxels."""
    c = load_case(case_dir, ("tmax", "brain", "territory", "fvh"))
    brain = c.images["brain"] > 0
    truth = (c.images["tmax"] > 6) & brain
    fvh = c.images["fvh"] > 0
    terr = c.images["territory"].astype(int)
    labels = np.unique(terr[fvh & (terr > 0)])
    pred = np.isin(terr, labels) & brain if labels.size else np.zeros_like(brain)
    return dice(pred, truth), int(fvh.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a synthperf evaluate output folder (per_case.csv)")
    ap.add_argument("data", type=Path, help="the held-out cases it scored (with fvh.nii.gz, territory.nii.gz)")
    ap.add_argument("--target", type=float, default=0.75, help="mean Dice over all stroke studies to reach")
    ap.add_argument("--with-core", type=float, default=0.85, help="assumed Dice on studies with a visible core")
    args = ap.parse_args(argv)
    visible = ConfidenceParams().anchor_ok_ml
    rows = [r for r in read_rows(args.eval_dir / "per_case.csv") if not r.get("no_stroke")]
    print(f"{args.eval_dir}: stroke studies without a visible core (< {visible} mL); oracle = the territories "
          "of the true FLAIR vessel signs")
    print("| family | stroke | no core | ... with signs | model | oracle | best of both | needed for the target |")
    print("|---|---|---|---|---|---|---|---|")
    for fam in sorted({r["family"] for r in rows}):
        stroke = [r for r in rows if r["family"] == fam]
        no_core = [r for r in stroke if r["core_ml"] < visible]
        if not no_core:
            continue
        scored = [(r["model_dice6"], *fvh_territory_oracle(args.data / r["case"])) for r in no_core]
        model, oracle = np.array([s[0] for s in scored]), np.array([s[1] for s in scored])
        with_signs = sum(s[2] > 0 for s in scored)
        n, m = len(stroke), len(no_core)
        needed = (args.target * n - args.with_core * (n - m)) / m
        print(f"| {fam} | {n} | {m} | {with_signs} | {model.mean():.3f} | {oracle.mean():.3f} | "
              f"{np.maximum(model, oracle).mean():.3f} | {needed:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
