"""`synthperf train DATA --out RUN_DIR [--config FILE]`: train (or resume) the Tmax diffusion model.

Re-running the same command resumes from RUN_DIR/checkpoint.pt. ``--export DIR`` copies the run's
latest EMA weights (safetensors + config + sha256) to DIR without training, e.g. models/weights/demo.
On several processes or machines it runs under torchrun with DDP (models/train.py), e.g.
``torchrun --nproc_per_node 2 -m cli.main train DATA --out RUN_DIR``; rank 0 writes the run folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or resume the Tmax diffusion model on a folder of NIfTI cases")
    p.add_argument("data", help="folder of cases: <case>/{dwi,flair,core,tmax,brain}.nii.gz (+adc), "
                   "a training pack made by `synthperf dataset pack` (.npz), or a folder of packs")
    p.add_argument("--out", required=True, help="run folder (checkpoints, EMA export, loss.png); re-run to resume")
    p.add_argument("--config", help="JSON/YAML config overriding the defaults (model/train/sample sections, ablation)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start a new run from exported weights (a registry name such as demo, or a folder) "
                        "and their step count; ignored when RUN_DIR already has a checkpoint")
    p.add_argument("--export", metavar="DIR", help="only export the run's latest EMA weights to DIR and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.tmax_ddpm.config import Config

    run_dir = Path(args.out)
    if args.export:
        src = run_dir / "export"
        if not (src / "model.safetensors").exists():
            print(f"error: {src} has no exported weights yet; train first (checkpoints export them)", file=sys.stderr)
            return 2
        from models.tmax_ddpm.checkpoint import load_weights

        load_weights(src)  # verify before copying
        dest = Path(args.export)
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".tmp"):
                shutil.copy2(f, dest / f.name)
        load_weights(dest)
        print(f"exported {src} -> {dest}")
        return 0
    cfg = None
    if args.config:
        try:
            cfg = Config.load(args.config)
        except (OSError, ValueError) as exc:
            print(f"error: --config {args.config}: {exc}", file=sys.stderr)
            return 2
    from models.train import train

    try:
        summary = train(args.data, run_dir, cfg, device=args.device, max_minutes=args.max_minutes,
                        progress=not args.no_progress, init_from=args.init_from)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
