"""``synthperf dataset build STUDIES_DIR --out DATA [--jobs N]``: a site's own training set from its
studies with DWI, FLAIR and DSC (worker/dataset_build.py), in the layout ``synthperf train`` reads,
with a QC report that excludes bad cases with their reason. Resumable: re-run to continue.

``synthperf dataset pack DATA... --out FILE.npz``: those cases on the model grid, 8-bit, in one file
(models/tmax_ddpm/pack.py; about 80 KB a phantom case instead of 5 MB), for training on a machine
that can neither generate nor hold the NIfTI folders. ``synthperf train FILE.npz`` reads it.

``synthperf dataset served-masks DATA...``: beside each case, the brain mask the service itself makes
from the case's b0 (worker/served_masks.py), for ``train.input_mask: brain_served``: training as served."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("dataset", help="training sets: build from DSC studies, pack, service masks (research)",
                              description=__doc__)
    sub = p.add_subparsers(dest="dataset_command", required=True)
    b = sub.add_parser("build", help="studies with DWI, FLAIR and DSC -> training cases + QC report")
    b.add_argument("studies", type=Path, help="folder with one sub-folder of DICOM files per study "
                   "(the spool folder works as it is)")
    b.add_argument("--out", required=True, type=Path, help="training data folder (<case>/{dwi,adc,flair,core,"
                   "tmax,brain}.nii.gz, qc/, qc_report.json, qc_report.csv)")
    b.add_argument("--jobs", type=int, default=1, help="studies processed in parallel (default 1)")
    b.add_argument("--min-coverage", type=float, default=None, help="exclude below this fraction of the brain "
                   "with a measured DSC bolus (default 0.7)")
    b.add_argument("--config", help="settings YAML (thresholds, core parameters)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run)
    k = sub.add_parser("pack", help="cases (folders or packs) -> one compact training pack on the model grid")
    k.add_argument("sources", nargs="+", type=Path, help="folders of training cases and/or packs to merge")
    k.add_argument("--out", required=True, type=Path, help="the pack to write (name ends in .npz)")
    k.add_argument("--grid", type=int, default=None, help="model grid (default: the default model's, 64)")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=run_pack)
    m = sub.add_parser("served-masks", help="write the service's own brain mask (from b0) beside each case")
    m.add_argument("data", nargs="+", type=Path, help="folders of training cases with b0.nii.gz")
    m.add_argument("--overwrite", action="store_true", help="remake masks that exist (default: skip them)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=run_served_masks)


def run_served_masks(args: argparse.Namespace) -> int:
    from worker.served_masks import summary_line, write_served_masks

    progress = None if args.no_progress else _progress("cases", "case")
    try:
        report = write_served_masks(args.data, args.overwrite, progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_line(report))
    if report.no_b0:
        print(f"  without b0.nii.gz (phantom cases written before b0 was kept?): {', '.join(report.no_b0[:10])}"
              + (" ..." if len(report.no_b0) > 10 else ""), file=sys.stderr)
    return 0 if report.written or report.already_done else 2


def _progress(desc: str, unit: str) -> Callable[[Iterable[Any], int], Iterable[Any]]:
    """A tqdm progress bar, in the form the dataset builders take."""
    from tqdm import tqdm

    def progress(it: Iterable[Any], n: int) -> Iterable[Any]:
        return tqdm(it, total=n, desc=desc, unit=unit)

    return progress


def run_pack(args: argparse.Namespace) -> int:
    from models.tmax_ddpm.config import ModelConfig
    from models.tmax_ddpm.pack import write_pack

    grid = args.grid or ModelConfig().grid
    try:
        info = write_pack(args.sources, grid, args.out, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{info['cases']} cases on the {grid} grid -> {info['path']} ({info['bytes'] / 1e6:.1f} MB)")
    return 0


def run(args: argparse.Namespace) -> int:
    from common.config import load_settings
    from worker.dataset_build import QcLimits, build_dataset

    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        limits = QcLimits() if args.min_coverage is None else QcLimits(min_coverage=args.min_coverage)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = None if args.no_progress else _progress("studies", "study")
    try:
        report = build_dataset(args.studies, args.out, load_settings(args.config), args.jobs, limits, progress)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['included']} of {report['studies']} studies are training cases in {args.out} "
          f"({report['skipped_as_done']} were done before); QC report: {args.out / 'qc_report.json'}")
    for ex in report["excluded"]:
        print(f"  excluded {ex['case_id']}: {'; '.join(ex['reasons'])}")
    return 0
