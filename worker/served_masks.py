"""The service's own brain mask beside each training case: ``brain_served.nii.gz`` from ``b0.nii.gz``.

Why: the phantom writes its true brain, and a model trained inside it sees at inference, inside the
mask the service makes from the b0 (``worker.pipeline.load.brain_mask``, a median 1.1x the true brain,
up to 2.3x on the training mix), a rim of CSF and skull it never saw. That rim carries about half of
the false hypoperfusion the service called on 18 healthy phantom DICOM studies, a fifth on the 39
healthy brains of sets A-F (docs/benchmarks.md, "Training as served"). With
this mask beside each case, ``train.input_mask: brain_served`` trains the model as it is served. A
site's own cases (worker/dataset_build.py) already hold the service's mask as their brain and need
nothing. Resumable: a case that has the file is skipped unless ``overwrite``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from models.tmax_ddpm.data import list_cases
from worker.pipeline.load import brain_mask

SERVED_MASK = "brain_served.nii.gz"


@dataclass
class ServedMaskReport:
    """What a run did, case by case (names only; the volumes are in the folders)."""

    written: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    no_b0: list[str] = field(default_factory=list)
    # per written case: the served mask's size over the true brain's, so a run shows how far apart they are
    size_ratio: dict[str, float] = field(default_factory=dict)


def write_served_mask(case_dir: Path) -> float:
    """Write ``brain_served.nii.gz`` for one case from its b0 on the b0's grid; return its size over the
    true brain's. Raises FileNotFoundError without a b0, ValueError when the b0 and brain grids differ."""
    b0_file = case_dir / "b0.nii.gz"
    if not b0_file.exists():
        raise FileNotFoundError(f"{case_dir.name}: no b0.nii.gz, so no service mask can be made")
    b0 = sitk.ReadImage(str(b0_file))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "brain.nii.gz"))) > 0
    mask = brain_mask(b0)
    arr = sitk.GetArrayFromImage(mask) > 0
    if arr.shape != truth.shape:
        raise ValueError(f"{case_dir.name}: b0 grid {arr.shape} differs from brain grid {truth.shape}")
    tmp = case_dir / ("tmp-" + SERVED_MASK)
    sitk.WriteImage(sitk.Cast(mask, sitk.sitkUInt8), str(tmp), True)
    tmp.replace(case_dir / SERVED_MASK)
    return float(arr.sum() / max(int(truth.sum()), 1))


def write_served_masks(roots: Iterable[Path], overwrite: bool = False,
                       progress: Callable[[Iterable[Path], int], Iterable[Path]] | None = None) -> ServedMaskReport:
    """``write_served_mask`` for every case under ``roots``; cases without a b0 are listed, not fatal."""
    cases = [case for root in roots for case in list_cases(root, require=("brain",))]
    report = ServedMaskReport()
    for case_dir in progress(cases, len(cases)) if progress else cases:
        if (case_dir / SERVED_MASK).exists() and not overwrite:
            report.already_done.append(case_dir.name)
            continue
        try:
            report.size_ratio[case_dir.name] = write_served_mask(case_dir)
        except FileNotFoundError:
            report.no_b0.append(case_dir.name)
            continue
        report.written.append(case_dir.name)
    return report


def summary_line(report: ServedMaskReport) -> str:
    """One line for the console: counts and the served / true size spread of the cases written."""
    ratios = np.array(list(report.size_ratio.values()))
    spread = (f"; served mask / true brain median {np.median(ratios):.2f}x (max {ratios.max():.2f}x)"
              if ratios.size else "")
    return (f"{len(report.written)} written, {len(report.already_done)} already had one, "
            f"{len(report.no_b0)} without a b0{spread}")
