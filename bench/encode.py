"""Encode benchmark: the full output set of a 25-slice 128x128 study, side by side with a reference.

Ours: every object synthperf writes (3 parametric maps, SEG, SR, 25 overlay SCs, summary page).
Reference ("pydicom dcmwrite"): writing the same Tmax frames as 25 plain single-frame pydicom
datasets — the floor cost of putting those pixels on disk as DICOM with no metadata work.
Both run alternately in one process, several rounds; the median is reported.

    python -m bench.encode [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from worker.pipeline.encode import EncodeInput, Geometry, encode_outputs

SHAPE = (25, 128, 128)
SPACING = (1.8, 1.8, 5.0)


def make_inputs() -> EncodeInput:
    """Sources and maps built in memory: synthetic, shaped like a real stroke study."""
    from tests.unit.test_encode_sources import make_study  # the same builder the encode tests use

    high, _all, flair, origin = make_study(SHAPE, SPACING)
    geo = Geometry(origin=tuple(map(float, origin)), spacing=SPACING, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
                   shape_zyx=SHAPE)
    z, y, x = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    rng = np.random.default_rng(0)
    brain = ((y - 64) ** 2 / 52**2 + (x - 64) ** 2 / 44**2) < 1
    tmax = np.where(brain, 1 + 13 * np.exp(-((y - 60) ** 2 + (x - 40) ** 2 + 9 * (z - 12) ** 2) / 500.0), 0)
    tmax = (tmax + rng.normal(0, 0.2, SHAPE) * brain).clip(0).astype(np.float32)
    core = brain & (((y - 60) ** 2 + (x - 40) ** 2) < 80) & (abs(z - 12) < 4)
    vml = float(np.prod(SPACING)) / 1000
    t6, t10 = (tmax > 6) & brain, (tmax > 10) & brain
    m = {"core_ml": core.sum() * vml, "tmax6_ml": t6.sum() * vml, "tmax10_ml": t10.sum() * vml}
    m.update(mismatch_ml=m["tmax6_ml"] - m["core_ml"], mismatch_ratio=m["tmax6_ml"] / m["core_ml"],
             hir=m["tmax10_ml"] / m["tmax6_ml"], defuse3=True, extend=True, side="right")
    return EncodeInput(
        study_uid=high[0].StudyInstanceUID, job_version=1, geometry=geo, dwi_sources=high, flair_sources=flair,
        dwi=brain * (500.0 + rng.normal(0, 30, SHAPE)) + core * 500, tmax=tmax, tmax_sd=(0.1 * tmax),
        core=core, brain=brain, measures=m, software_version="bench", model_name="demo", model_version="bench",
        samples=3,
    )


def reference_write(inp: EncodeInput, out: Path) -> int:
    """pydicom dcmwrite of the same Tmax frames, one plain dataset per slice."""
    out.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    for k in range(inp.tmax.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = inp.study_uid
        ds.SeriesInstanceUID = series
        ds.Modality = "MR"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = inp.tmax.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 0.01
        ds.RescaleIntercept = 0
        ds.PixelData = np.round(inp.tmax[k] * 100).astype(np.uint16).tobytes()
        ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
    return inp.tmax.shape[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    inp = make_inputs()
    ours, ref, parts = [], [], []
    n_objects = 0
    with tempfile.TemporaryDirectory() as tmp:
        encode_outputs(inp, Path(tmp) / "warm")  # fonts, colour table, imports
        for r in range(args.rounds):
            t = time.perf_counter()
            res = encode_outputs(inp, Path(tmp) / f"ours{r}")
            ours.append(time.perf_counter() - t)
            parts.append(res.timings_s)
            n_objects = len(res.objects)
            t = time.perf_counter()
            reference_write(inp, Path(tmp) / f"ref{r}")
            ref.append(time.perf_counter() - t)
    med_ours, med_ref = statistics.median(ours), statistics.median(ref)
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    print(f"encode full output set, {SHAPE[0]} slices {SHAPE[1]}x{SHAPE[2]}: {n_objects} objects")
    print(f"  synthperf encode_outputs : {med_ours:6.3f} s  (median of {args.rounds}; target < 5 s)")
    print(f"  pydicom dcmwrite ref     : {med_ref:6.3f} s  ({SHAPE[0]} plain frames)")
    print(f"  ratio ours/reference     : {med_ours / med_ref:6.1f}x")
    print("  breakdown (s): " + ", ".join(f"{k} {v:.3f}" for k, v in breakdown.items()))
    return {"ours_s": med_ours, "reference_s": med_ref, "objects": n_objects, "breakdown": breakdown}


if __name__ == "__main__":
    main()
