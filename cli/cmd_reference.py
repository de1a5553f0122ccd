"""`synthperf reference DATA --out FILE`: the input statistics of a model's training cases, stored with
the model so the per-study confidence can tell a study unlike its training data (issue 15).

Put the file beside the weights as ``input_reference.json`` (``--model DIR`` does that); a model
without one still runs, and its confidence score says the input check is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="compute a model's input reference (training-data statistics) for "
                       "the confidence score", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="the training folder (<case>/{dwi,flair,adc,brain}.nii.gz)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, help="where to write the JSON")
    dest.add_argument("--model", type=Path, help="an exported weights folder: writes <model>/input_reference.json")
    p.add_argument("--input-mask", choices=("brain", "brain_served"), default="brain",
                   help="the mask the statistics are taken in: the one the model was trained in (train.input_mask)")
    p.add_argument("--limit", type=int, help="use only the first N cases (sorted by name)")
    p.add_argument("--note", default="", help="a line recorded as the reference's source (default: the folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.confidence import REFERENCE_FILE, reference_from_folder

    if args.limit is not None and args.limit < 5:
        print("error: --limit must be at least 5 (quantiles of fewer cases mean little)", file=sys.stderr)
        return 2
    out = args.out if args.out else args.model / REFERENCE_FILE
    if args.model and not (args.model / "model.safetensors").is_file():
        print(f"error: {args.model} holds no model.safetensors; pass an exported weights folder", file=sys.stderr)
        return 2
    try:
        ref = reference_from_folder(args.data, limit=args.limit, progress=True, input_mask=args.input_mask)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.note:
        ref["source"] = args.note
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref, indent=1) + "\n")
    tmp.replace(out)
    print(f"input reference of {ref['cases']} cases ({len(ref['features'])} features) written to {out}")
    return 0
