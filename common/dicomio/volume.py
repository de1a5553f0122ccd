"""Frames -> one SimpleITK volume, with the source reference of every slice kept.

``build_volume`` takes the frames of one 3D volume (already selected: one b-value, one echo...), puts
frames at the same slice position together (diffusion directions or repeats; combined by mean or
geometric mean), sorts slices along the normal, checks the stack, decodes pixels and returns a
SimpleITK image whose origin/spacing/direction match the DICOM patient coordinate system (LPS), plus,
per image slice, which file and frame it came from (the encoder references those instances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from common.dicomio.frames import FrameInfo
from common.dicomio.geometry import check_orientations, cluster_positions, normal_of, sort_stack
from common.dicomio.pixels import PixelCache
from common.errors import InvalidInputError

Combine = Literal["mean", "geomean", "single"]


@dataclass(frozen=True)
class SliceRef:
    """The source of one output slice: representative file/frame plus every frame combined into it."""

    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file; None for single-frame files
    sop_instance_uid: str
    position: tuple[float, float, float]
    contributors: tuple[FrameInfo, ...] = field(default=(), compare=False, repr=False)

    def dataset(self, stop_before_pixels: bool = True) -> Dataset:
        """The source pydicom dataset (header only by default)."""
        return pydicom.dcmread(str(self.path), stop_before_pixels=stop_before_pixels)


@dataclass
class Volume:
    image: sitk.Image
    slices: list[SliceRef]
    warnings: list[str]


def _combine(stack: list[np.ndarray], how: Combine, what: str) -> np.ndarray:
    if len(stack) == 1:
        return stack[0]
    if how == "single":
        raise InvalidInputError(f"{what}: {len(stack)} images at one slice position where one was expected")
    arr = np.stack(stack).astype(np.float32)
    if how == "geomean":
        return np.exp(np.mean(np.log(np.maximum(arr, 1e-3)), axis=0)).astype(np.float32)
    return arr.mean(axis=0)


def build_volume(
    frames: Sequence[FrameInfo],
    what: str,
    combine: Combine = "mean",
    cache: PixelCache | None = None,
) -> Volume:
    """Assemble frames into a volume. ``what`` names the volume in every error and warning."""
    if not frames:
        raise InvalidInputError(f"{what}: no images")
    missing = [f for f in frames if f.position is None or f.orientation is None]
    if missing:
        raise InvalidInputError(
            f"{what}: {len(missing)} image(s) lack ImagePositionPatient/ImageOrientationPatient "
            f"(e.g. {missing[0].path.name}); cannot place them in space"
        )
    if any("MOSAIC" in f.frame_type for f in frames):
        raise InvalidInputError(
            f"{what}: Siemens mosaic images (all slices tiled in one image) are not supported; "
            "send the series as one image per slice (mosaic off / 'interoperability' export)"
        )
    orientation = check_orientations([f.orientation for f in frames], what)
    n = normal_of(orientation)
    dist = [float(np.asarray(f.position) @ n) for f in frames]
    groups = cluster_positions(dist)
    reps = [frames[g[0]] for g in groups]
    shapes = {(f.rows, f.columns) for f in frames}
    if len(shapes) != 1:
        raise InvalidInputError(f"{what}: images of different sizes {sorted(shapes)} in one volume")
    spacings = {tuple(round(v, 4) for v in f.pixel_spacing) for f in frames if f.pixel_spacing}
    if len(spacings) > 1:
        raise InvalidInputError(f"{what}: different pixel spacings {sorted(spacings)} in one volume")
    if not spacings:
        raise InvalidInputError(f"{what}: no PixelSpacing; cannot size the voxels")
    ps = next(iter(spacings))
    geo = sort_stack([f.position for f in reps], orientation, what, reps[0].slice_thickness)  # type: ignore[misc]
    warnings = list(geo.warnings)
    counts = {len(g) for g in groups}
    if max(counts) > 1 and combine != "single":
        op = "geometric mean" if combine == "geomean" else "mean"
        warnings.append(f"{what}: {max(counts)} images per slice position combined by {op}")
    if len(counts) > 1:
        warnings.append(f"{what}: uneven number of images per slice position ({sorted(counts)})")
    cache = cache or PixelCache()
    planes: list[np.ndarray] = []
    refs: list[SliceRef] = []
    for gi in geo.order:
        members = [frames[i] for i in groups[gi]]
        planes.append(_combine([cache.frame(f.path, f.frame, f.rescale) for f in members], combine, what))
        rep = members[0]
        refs.append(
            SliceRef(
                path=rep.path,
                frame=rep.frame,
                sop_instance_uid=rep.sop_instance_uid,
                position=tuple(float(v) for v in rep.position),  # type: ignore[arg-type]
                contributors=tuple(members),
            )
        )
    img = sitk.GetImageFromArray(np.stack(planes).astype(np.float32))
    img.SetSpacing((float(ps[1]), float(ps[0]), float(geo.spacing)))
    img.SetOrigin(tuple(float(v) for v in geo.origin))
    img.SetDirection(tuple(float(v) for v in geo.direction.flatten()))
    return Volume(image=img, slices=refs, warnings=warnings)
