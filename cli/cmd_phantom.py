"""``synthperf phantom``: generate synthetic stroke studies (DICOM + truth) or the training fast path.

Case i of ``--cases N --seed S`` uses seed S + i and lands in ``<out>/case_<seed:06d>/``, so disjoint
seed ranges give disjoint training and held-out sets. Output is SYNTHETIC, not patient data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="generate synthetic stroke MRI studies with known truth (not patient data)",
        description="Generate physically grounded synthetic stroke studies: DWI/ADC/FLAIR (+DSC) with "
        "Tmax, core, brain and territory truth. Every output is SYNTHETIC and NOT FOR DIAGNOSTIC USE.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case; case i uses seed+i")
    p.add_argument("--matrix", type=int, default=128, choices=(128, 256), help="DWI in-plane matrix")
    p.add_argument("--vendor", default="mixed", choices=("siemens", "ge", "philips", "mixed"),
                   help="DICOM header style (mixed: chosen per case from its seed)")
    p.add_argument("--family", default="geometric", choices=("geometric", "template", "mixed"),
                   help="anatomy: geometric (analytic head), template (MNI ICBM152 brain warped per case) "
                   "or mixed (chosen per case from its seed)")
    p.add_argument("--randomise", action="store_true",
                   help="domain randomisation (contrasts, noise, resolution, pose, confounders, FVH and "
                   "look-alikes) and the balanced case mix; see docs/phantom.md")
    p.add_argument("--penumbral-cue", type=float, default=None, metavar="SCALE",
                   help="with --randomise: strength of the penumbral ADC decline and its slight DWI rise for "
                        "every case (0 = absent, 1 = the unrandomised phantom's; default: drawn per case). "
                        "All other draws stay as they were: a set with 0 shows what a model takes from that cue")
    p.add_argument("--grey-contrast", type=float, default=None, metavar="K",
                   help="with --randomise: multiply the grey-minus-white signal of b0 (so DWI) and FLAIR by K "
                        "in every case (1 = as drawn). A stress set: the drawn FLAIR grey/white ratio has median "
                        "1.33 and maximum 1.92, and K = 3 takes the median case to 1.99 (bench.contrast_stress)")
    p.add_argument("--grey-contrast-in", choices=("both", "dwi", "flair"), default="both",
                   help="with --grey-contrast: stretch both sequences (default), or the DWI (its b0) or FLAIR alone")
    p.add_argument("--texture", type=float, default=None, metavar="PCT",
                   help="with --randomise: give the brain voxel-scale texture of about PCT %% of the signal in b0 "
                        "(so DWI), ADC and FLAIR (as a 3 x 3 median residual reads it near noise-free). A stress "
                        "set, never drawn: the phantom reads 0.1-0.4 %%, a real EPI 4.2 %% (bench.noise_texture)")
    p.add_argument("--pin-acq", action="append", metavar="KEY=VALUE", default=None,
                   help="with --randomise: pin an acquisition draw in every case, e.g. dwi_bias=0.8 (repeatable; "
                        "keys: phantom.randomise.ACQ_PINNABLE). A stress set beyond the drawn ranges (docs/phantom.md)")
    p.add_argument("--with-dsc", action="store_true", help="also simulate a DSC-PWI series")
    p.add_argument("--preview", action="store_true", help="write a montage PNG per case")
    p.add_argument("--training-only", action="store_true",
                   help="fast path: training NIfTI volumes and truth only, no DICOM")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: all CPUs, at most the number of cases)")
    p.set_defaults(func=run)


def parse_acquisition_pins(items: list[str]) -> dict[str, float]:
    """``["dwi_bias=0.8", ...]`` -> ``{"dwi_bias": 0.8}``; ValueError naming the item that is not KEY=NUMBER."""
    pins: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value) if sep else None
        except ValueError:
            number = None
        if number is None:
            raise ValueError(f"{item!r} is not KEY=NUMBER")
        pins[key.strip()] = number
    return pins


def _one(job: tuple[int, dict]) -> tuple[int, str, float, dict]:
    seed, opts = job
    from phantom.api import make_case, write_dicom_study, write_training_case

    t0 = time.perf_counter()
    case = make_case(seed, matrix=opts["matrix"], with_dsc=opts["with_dsc"], family=opts["family"],
                     randomise=opts["randomise"], penumbral_scale=opts["penumbral_cue"],
                     grey_contrast=opts["grey_contrast"], grey_contrast_in=opts["grey_contrast_in"],
                     acquisition=opts["acquisition"], texture=opts["texture"])
    if opts["vendor"] != "mixed":
        case.vendor = opts["vendor"]
        case.truth["vendor"] = opts["vendor"]
    out = Path(opts["out"])
    case_dir = write_training_case(case, out) if opts["training_only"] else out / case.case_id
    if not opts["training_only"]:
        write_training_case(case, out)
        write_dicom_study(case, case_dir / "dicom", case.vendor)
    if opts["preview"]:
        from phantom.preview import montage

        montage(case, case_dir / "preview.png")
    t = case.truth
    summary = {k: t[k] for k in ("occlusion", "side", "collaterals", "onset_h", "core_ml", "tmax6_ml", "family")}
    return seed, str(case_dir), time.perf_counter() - t0, summary


def run(args: argparse.Namespace) -> int:
    if args.cases < 1:
        print("error: --cases must be at least 1", file=sys.stderr)
        return 2
    if args.seed < 0:
        print("error: --seed must be non-negative", file=sys.stderr)
        return 2
    from phantom.api import check_pins

    for option, pin in (("--penumbral-cue", {"penumbral_scale": args.penumbral_cue}),
                        ("--grey-contrast", {"grey_contrast": args.grey_contrast}),
                        ("--texture", {"texture": args.texture}),
                        ("--grey-contrast-in", {"grey_contrast": args.grey_contrast,
                                                "grey_contrast_in": args.grey_contrast_in})):
        try:
            check_pins(args.randomise, **pin)
        except ValueError as e:
            print(f"error: {option}: needs --grey-contrast ({e})" if option == "--grey-contrast-in"
                  else f"error: {option}: {e}", file=sys.stderr)
            return 2
    acquisition = None
    if args.pin_acq:
        try:
            acquisition = parse_acquisition_pins(args.pin_acq)
            check_pins(args.randomise, acquisition=acquisition)
        except ValueError as e:
            print(f"error: --pin-acq: {e}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    opts = {"matrix": args.matrix, "with_dsc": args.with_dsc, "vendor": args.vendor, "out": str(args.out),
            "training_only": args.training_only, "preview": args.preview, "family": args.family,
            "randomise": args.randomise, "penumbral_cue": args.penumbral_cue,
            "grey_contrast": args.grey_contrast, "grey_contrast_in": args.grey_contrast_in,
            "acquisition": acquisition, "texture": args.texture}
    jobs = [(args.seed + i, opts) for i in range(args.cases)]
    workers = args.workers or min(os.cpu_count() or 1, args.cases)
    t0 = time.perf_counter()
    print(f"SYNTHETIC phantom: {args.cases} case(s), seeds {args.seed}..{args.seed + args.cases - 1}, "
          f"{workers} process(es) -> {args.out}", flush=True)
    done = 0
    if workers <= 1:
        results = map(_one, jobs)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from common.procs import spawned_pool

        pool = spawned_pool(workers)
        results = pool.map(_one, jobs, chunksize=1)
    try:
        for seed, case_dir, dt, s in results:
            done += 1
            print(f"[{done}/{args.cases}] seed {seed} {s['family']} {s['occlusion']} {s['side']} {s['collaterals']} "
                  f"onset {s['onset_h']} h core {s['core_ml']:.1f} mL Tmax>6 {s['tmax6_ml']:.1f} mL "
                  f"({dt:.1f} s) {case_dir}", flush=True)
    finally:
        if workers > 1:
            pool.shutdown()
    print(f"done: {done} case(s) in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
