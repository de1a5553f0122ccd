"""Slice geometry: sort along the slice normal and check the stack before trusting it.

Each check produces either a warning (the volume is still usable, e.g. a small gantry tilt) or an
:class:`common.errors.InvalidInputError` that says what is wrong and what to do (e.g. resend a series
with missing slices). The thresholds are module constants so tests and callers can see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import InvalidInputError

ORIENTATION_TOL = 1e-3  # max abs difference between direction cosines of "the same" orientation
POSITION_TOL_MM = 0.05  # two frames closer than this along the normal are the same slice position
UNEVEN_SPACING_REL = 0.05  # spacing deviating more than this fraction from the median is uneven
TILT_WARN_DEG = 0.5  # slice positions off the normal by more than this: gantry tilt / sheared stack


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise InvalidInputError("ImageOrientationPatient row and column vectors are parallel")
    return n / norm


@dataclass
class StackGeometry:
    """The result of checking a stack of slice positions (one per slice, already de-duplicated)."""

    order: list[int]  # indices into the input, sorted along the normal
    distances: np.ndarray  # sorted distances along the normal (mm)
    spacing: float  # slice spacing along the normal (mm)
    direction: np.ndarray  # 3x3, columns = row dir, column dir, slice dir
    origin: np.ndarray  # position of the first sorted slice
    warnings: list[str]


def check_orientations(orientations: Sequence[Sequence[float] | None], what: str) -> np.ndarray:
    present = [o for o in orientations if o is not None]
    if not present:
        raise InvalidInputError(f"{what}: no ImageOrientationPatient in any slice; cannot build a volume")
    ref = np.asarray(present[0], dtype=float)
    for o in present[1:]:
        if np.max(np.abs(np.asarray(o, dtype=float) - ref)) > ORIENTATION_TOL:
            raise InvalidInputError(
                f"{what}: mixed slice orientations ({_fmt(ref)} vs {_fmt(o)}); the series holds more than "
                "one stack (e.g. a localizer). Send a single axial stack."
            )
    return ref


def _fmt(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"


def sort_stack(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    what: str,
    slice_thickness: float | None = None,
) -> StackGeometry:
    """Sort unique slice positions along the normal and check spacing, gaps and tilt."""
    if not positions:
        raise InvalidInputError(f"{what}: no slices")
    pos = np.asarray(positions, dtype=float)
    n = normal_of(orientation)
    dist = pos @ n
    order = list(np.argsort(dist, kind="stable"))
    d_sorted = dist[order]
    warnings: list[str] = []
    if len(d_sorted) > 1:
        steps = np.diff(d_sorted)
        if np.any(steps < POSITION_TOL_MM):
            raise InvalidInputError(
                f"{what}: two slices share one position; the volume holds several acquisitions "
                "(b-values, echoes or time points) that were not separated"
            )
        spacing = float(np.median(steps))
        rel = np.abs(steps - spacing) / spacing
        if np.any(rel > UNEVEN_SPACING_REL):
            ratios = steps / spacing
            gaps = [(i, r) for i, r in enumerate(ratios) if r > 1 + UNEVEN_SPACING_REL]
            near_int = all(abs(r - round(r)) < 0.1 and round(r) >= 2 for _, r in gaps) and gaps
            if near_int and np.all(ratios > 1 - UNEVEN_SPACING_REL):
                missing = int(sum(round(r) - 1 for _, r in gaps))
                where = ", ".join(f"after {d_sorted[i]:.1f} mm" for i, _ in gaps)
                raise InvalidInputError(
                    f"{what}: {missing} slice(s) missing ({where}; spacing {spacing:.2f} mm). "
                    "Resend the complete series."
                )
            worst = float(np.max(rel))
            msg = (
                f"{what}: uneven slice spacing (median {spacing:.2f} mm, steps {steps.min():.2f}-"
                f"{steps.max():.2f} mm, {worst:.0%} off)"
            )
            if worst > 0.5:
                raise InvalidInputError(msg + "; cannot place the slices on one grid. Resend a single stack.")
            warnings.append(msg + "; using the median spacing")
        # Tilt: the line through the slice origins should run along the normal.
        span = pos[order[-1]] - pos[order[0]]
        length = float(np.linalg.norm(span))
        if length > 0:
            cosang = abs(float(span @ n)) / length
            tilt = float(np.degrees(np.arccos(min(1.0, cosang))))
            if tilt > TILT_WARN_DEG:
                warnings.append(
                    f"{what}: gantry tilt / sheared stack of {tilt:.1f} degrees; slices are placed along "
                    "the normal, so positions off-centre are shifted by up to "
                    f"{length * np.sin(np.radians(tilt)):.1f} mm"
                )
    else:
        spacing = float(slice_thickness or 1.0)
        warnings.append(f"{what}: a single slice; slice spacing taken from SliceThickness ({spacing} mm)")
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    direction = np.stack([row / np.linalg.norm(row), col / np.linalg.norm(col), n], axis=1)
    return StackGeometry(
        order=[int(i) for i in order],
        distances=d_sorted,
        spacing=spacing,
        direction=direction,
        origin=pos[order[0]],
        warnings=warnings,
    )


def cluster_positions(distances: Sequence[float], tol: float = POSITION_TOL_MM) -> list[list[int]]:
    """Group indices whose distance along the normal agrees within ``tol`` (same slice position)."""
    d = np.asarray(distances, dtype=float)
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = []
    last = None
    for i in order:
        if last is None or d[i] - last > tol:
            groups.append([int(i)])
        else:
            groups[-1].append(int(i))
        last = d[i]
    return groups
