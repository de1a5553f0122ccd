"""`synthperf evaluate RUN_DIR DATA`: the paper's table on held-out cases, with two baselines, overall and per
phantom family (cross-generator validation), plus false hypoperfusion on no-stroke studies."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model (run folder, weights folder or name) on held-out cases")
    p.add_argument("model", help="training run folder, exported weights folder, or registry name (demo)")
    p.add_argument("data", help="folder of held-out cases (same layout as training; territory.nii.gz for the atlas "
                   "baseline); may mix phantom families: truth.json 'family', 'geometric' when absent")
    p.add_argument("--out", help="output folder (default: <weights>/../eval/<data name>)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's sampling default)")
    p.add_argument("--samples", type=int, help="samples per case (default: the model's sampling default)")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate, format_summary

    try:
        s = evaluate(args.model, args.data, args.out, steps=args.steps, samples=args.samples, limit=args.limit,
                     seed=args.seed, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(s))
    print(f"written to {s['out_dir']} (per_case.csv with a family column, summary.json with per_family and "
          "no_stroke, bland_altman.png)")
    return 0
