"""`synthperf classify PATH... [--json] [--rules FILE]`: show the role the rules give every series.

One line per series (or one JSON object per line with --json): folder, SeriesInstanceUID,
SeriesDescription, role, b-values, confidence and the evidence that decided it. With ``--select``
it also prints which series the pipeline would use, or why it would stop.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify the DICOM series under folders/files (DWI, ADC, FLAIR, DSC, OTHER)")
    p.add_argument("paths", nargs="+", help="DICOM files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="one JSON object per series, one per line")
    p.add_argument("--rules", help="rules YAML (default: settings.rules_file, else the packaged rules)")
    p.add_argument("--select", action="store_true", help="also show the inputs the pipeline would choose")
    p.set_defaults(func=run)


def _line(c) -> str:
    b = ",".join(f"{v:g}" for v in c.b_values) or "-"
    ev = "; ".join(f"{r}: {f}={v}" for r, f, v in c.evidence if not r.startswith(("supports:", "conflicts:")))
    return (
        f"{c.folder}\t{c.series_uid}\t{c.description or '(no description)'}\t{c.role}\tb={b}"
        f"{' trace' if c.is_trace else ''}\tconf={c.confidence:.2f}\t{ev}"
    )


def run(args: argparse.Namespace) -> int:
    from common.config import SettingsError, load_settings
    from common.errors import InputMissingError
    from worker.pipeline.classify import classify_folder, select_inputs
    from worker.rules import RulesError, load_rules

    try:
        rules_file = args.rules or load_settings().rules_file
        rules = load_rules(rules_file)
    except (RulesError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = classify_folder(args.paths, rules)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not result:
        print("no DICOM images found under " + " ".join(args.paths), file=sys.stderr)
        return 1
    for c in result:
        print(json.dumps(c.to_dict()) if args.json else _line(c))
    if args.select:
        try:
            sel = select_inputs(result, rules.b0_max)
        except InputMissingError as exc:
            print(json.dumps({"selection": None, "error": str(exc)}) if args.json else f"selection: {exc}")
            return 3
        print(json.dumps({"selection": sel.to_dict()}) if args.json else "selection: " + json.dumps(sel.to_dict()))
    return 0
