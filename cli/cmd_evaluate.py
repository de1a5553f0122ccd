"""`synthperf evaluate RUN_DIR DATA`: the paper's table on held-out cases, with two baselines, overall and per
phantom family (cross-generator validation), plus false hypoperfusion on no-stroke studies, the per-study
confidence and its AUROC for a bad case, and core Dice of the core rule before and after its partial-volume
step (issue 15)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained model (run folder, weights folder or name) on held-out cases")
    p.add_argument("model", nargs="?", help="training run folder, exported weights folder, or registry name (demo)")
    p.add_argument("data", nargs="?", help="folder of held-out cases (same layout as training; territory.nii.gz for the atlas "
                   "baseline); may mix phantom families: truth.json 'family', 'geometric' when absent")
    p.add_argument("--out", help="output folder (default: <weights>/../eval/<data name>)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's sampling default)")
    p.add_argument("--samples", type=int, help="samples per case (default: the model's sampling default)")
    p.add_argument("--limit", type=int, help="evaluate only the first N cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-core", action="store_true", help="skip scoring the core rule against the truth core "
                   "(before and after its partial-volume step; needs adc.nii.gz)")
    p.add_argument("--condition-on", choices=("truth", "rule", "rule_strict"), default="truth",
                   help="the core the model is conditioned on and the DEFUSE-3 calls use: the phantom's truth core "
                   "(default, the paper's protocol) or the service's core rule (rule: with its partial-volume step, "
                   "as `synthperf process` runs it; the end-to-end figure)")
    p.add_argument("--input-mask", choices=("brain", "brain_served"), default="brain",
                   help="the brain mask the model is given and its calls are counted in: the phantom's true brain "
                   "(default) or the mask the service makes from the b0 (brain_served.nii.gz, written by `synthperf "
                   "dataset served-masks`), as `synthperf process` does")
    p.add_argument("--save-maps", action="store_true", help="also keep each case's mean and SD Tmax maps "
                   "(OUT/maps/<case>.npz, float16 seconds) for analyses that should not sample again")
    p.add_argument("--compare", nargs="+", metavar="EVAL_DIR", help="instead of evaluating: one markdown table "
                   "(a row per model and family) from earlier evaluations' per_case.csv of the same cases, "
                   "each named by its folder, e.g. the cross-family table of models trained on one family each")
    p.add_argument("--per-case", action="store_true", help="with --compare: also each evaluation's cases as a "
                   "markdown table (type, volumes, Dice, DEFUSE-3, confidence)")
    p.set_defaults(func=run)


def core_methods() -> dict:
    """The worker's core rule as evaluate scores it: with its partial-volume step (``rule``, what the
    service reports) and without (``rule_strict``, the rule before issue 15). The direction comes from
    the NIfTI affine (RAS) turned into SimpleITK's LPS convention."""
    from pathlib import Path

    import numpy as np

    from models.tmax_ddpm.data import lps_direction
    from worker.pipeline.core import CoreParams, segment_core

    def make(params: CoreParams):
        def fn(case_dir: Path, im: dict, spacing: tuple[float, float, float]) -> np.ndarray:
            if "adc" not in im:
                raise ValueError(f"{case_dir}: no adc.nii.gz for the core rule; pass --no-core")
            return segment_core(im["adc"], im["dwi"], im["brain"] > 0, spacing, params,
                                direction=lps_direction(case_dir / "dwi.nii.gz")).mask
        return fn

    return {"rule": make(CoreParams()), "rule_strict": make(CoreParams(pv_iterations=0))}


def compare(dirs: list[str], per_case: bool = False) -> int:
    from pathlib import Path

    from models.evaluate import comparison_table, per_case_table, read_rows, summarise

    evals, rows = {}, {}
    for d in dirs:
        f = Path(d) / "per_case.csv"
        if not f.is_file():
            print(f"error: --compare {d}: no per_case.csv there (run synthperf evaluate --out {d} first)", file=sys.stderr)
            return 2
        rows[Path(d).name] = read_rows(f)
        evals[Path(d).name] = summarise(rows[Path(d).name])
    print(comparison_table(evals))
    for name, r in rows.items() if per_case else ():
        print(f"\n{name}, case by case:\n{per_case_table(r)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate, format_summary

    if args.compare:
        return compare(args.compare, args.per_case)
    if not args.model or not args.data:
        print("error: give MODEL and DATA (or --compare EVAL_DIR...)", file=sys.stderr)
        return 2

    if args.no_core and args.condition_on != "truth":
        print(f"error: --condition-on {args.condition_on} needs the core rule, which --no-core skips", file=sys.stderr)
        return 2
    try:
        s = evaluate(args.model, args.data, args.out, steps=args.steps, samples=args.samples, limit=args.limit,
                     seed=args.seed, device=args.device, core_methods=None if args.no_core else core_methods(),
                     save_maps=args.save_maps, condition_on=args.condition_on, input_mask=args.input_mask)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(s))
    print(f"written to {s['out_dir']} (per_case.csv with family, confidence and core columns, summary.json with "
          "per_family, no_stroke, confidence and core, bland_altman.png)")
    return 0
