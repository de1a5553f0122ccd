"""Loading + registering + masking a 25-slice 128x128 study, side by side with two references.

Candidate: ``worker.pipeline.load.load_study`` (read DWI b0/b1000, ADC and FLAIR from DICOM, sort and
check geometry, brain mask, multi-resolution Euler3D Mattes-MI registration, resample FLAIR onto the
DWI grid).
References, measured in the same process, rounds interleaved:
  (a) the same stage with SINGLE-resolution registration (shrink 1, no smoothing) - what the pyramid buys;
  (b) a plain pydicom read of the same files (dcmread + pixel_array, no geometry, no registration) -
      the I/O floor.
Both registrations are also scored against the phantom's known FLAIR motion, so speed is not bought
with accuracy. ``python -m bench.load_register [rounds]`` (default 3). Target: < 10 s on 2 cores.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from phantom.api import make_case, write_dicom_study
from worker.pipeline.classify import classify_folder, select_inputs
from worker.pipeline.load import load_study

SEEDS = range(0, 40)  # the first seed whose DWI grid has 25 slices is used


def find_case(nz: int = 25):
    for seed in SEEDS:
        case = make_case(seed, matrix=128)
        if case.grid.shape[0] == nz:
            return case
    raise RuntimeError(f"no phantom seed in {SEEDS} gives {nz} slices")


def motion_error(case, reg: dict) -> tuple[float, float]:
    truth = np.asarray(case.flair_motion["matrix_dwi_to_flair_world"])
    est = np.asarray(reg["matrix_dwi_to_flair"])
    r = truth[:3, :3].T @ est[:3, :3]
    ang = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))
    c = np.asarray(case.flair_motion["center_lps"])
    return ang, float(np.linalg.norm((truth[:3, :3] - est[:3, :3]) @ c + truth[:3, 3] - est[:3, 3]))


def grid_image(arr, grid):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    sz, sy, sx = grid.spacing
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(grid.direction).flatten()))
    return img


def sweep(seeds) -> None:
    """Registration alone on more phantom cases (any slice count): accuracy and CPU, both variants."""
    from worker.pipeline.load import register_rigid

    variants = {"multi-res 4/2/1 (default)": {}, "single-resolution": {"shrink": (1,), "smoothing": (0.0,)}}
    res: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in variants}
    for seed in seeds:
        case = make_case(seed, matrix=128)
        b0, fl = grid_image(case.b0, case.grid), grid_image(case.flair, case.flair_grid)
        for name, kw in variants.items():
            (_, info), w, c = timed(lambda kw=kw, b0=b0, fl=fl: register_rigid(b0, fl, **kw))
            res[name].append((*motion_error(case, info), w, c))
    print(f"registration sweep over phantom seeds {list(seeds)} (DWI 128^2 vs FLAIR 256^2, known motion):")
    print(f"{'':30s} {'max rot err':>12s} {'max mm err':>11s} {'mean wall s':>12s} {'mean cpu s':>11s}")
    for name, rows in res.items():
        a = np.asarray(rows)
        print(f"{name:30s} {a[:, 0].max():12.2f} {a[:, 1].max():11.2f} {a[:, 2].mean():12.2f} {a[:, 3].mean():11.2f}")


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def plain_read(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        n += int(np.asarray(pydicom.dcmread(p).pixel_array).size)
    return n


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    case = find_case()
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    study = write_dicom_study(case, tmp / "study", "siemens", enhanced=False, split_b=False)
    (sel, t_cls, _) = timed(lambda: select_inputs(classify_folder(study)))
    files = sorted({f.path for f in sel.high_b_frames() + sel.b0_frames() + sel.adc.frames + sel.flair.frames})
    print(f"study: seed {case.seed}, DWI {case.grid.shape[::-1]} (x,y,z), FLAIR {case.flair_grid.shape[::-1]}, "
          f"{len(files)} files read by the stage; classify+select {t_cls:.2f} s")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows: dict[str, list[tuple[float, float]]] = {"candidate": [], "single-res": [], "pydicom": []}
    acc: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        st, w, c = timed(lambda: load_study(sel))
        rows["candidate"].append((w, c))
        acc["candidate"] = motion_error(case, st.registration)
        st1, w, c = timed(lambda: load_study(sel, registration_options={"shrink": (1,), "smoothing": (0.0,)}))
        rows["single-res"].append((w, c))
        acc["single-res"] = motion_error(case, st1.registration)
        _, w, c = timed(lambda: plain_read(files))
        rows["pydicom"].append((w, c))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in rows.items()}
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'':38s} {'wall s':>8s} {'cpu s':>8s} {'rot err':>8s} {'mm err':>8s}")
    names = {"candidate": "load_study (multi-res 4/2/1)", "single-res": "reference: single-resolution reg",
             "pydicom": "reference: plain pydicom read"}
    for k, (w, c) in med.items():
        a = acc.get(k)
        extra = f"{a[0]:8.2f} {a[1]:8.2f}" if a else f"{'-':>8s} {'-':>8s}"
        print(f"{names[k]:38s} {w:8.2f} {c:8.2f} {extra}")
    cw = med["candidate"][0]
    print(f"ratio single-res / candidate (wall): {med['single-res'][0] / cw:.2f}x; "
          f"candidate / plain read: {cw / med['pydicom'][0]:.1f}x")
    print(f"stage timings (last candidate run): {st.timings_s}")
    sweep(range(1, 7))
    ok = cw < 10.0
    print(f"target < 10 s: {'met' if ok else 'NOT met'} ({cw:.2f} s wall median of {rounds})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
