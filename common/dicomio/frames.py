"""One record per 2D image frame, the same for classic and enhanced multi-frame DICOM.

A classic series stores one frame per file; an enhanced multi-frame object stores every frame in one
file with its geometry and diffusion parameters in functional groups. Downstream code (classifier,
volume assembly, the DICOM encoder that references source instances) only ever sees ``FrameInfo``:
which file, which frame in it, where it sits in space and what diffusion weighting it carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from common.dicomio import headers as h

#: b-values at or below this are b0 (Philips writes 0.001 for its "b0" repeats).
DEFAULT_B0_MAX = 50.0


@dataclass(frozen=True)
class FrameInfo:
    """Where one frame lives and what it is.

    ``frame`` is the 0-based frame index inside a multi-frame file, or None for a single-frame file.
    ``b_value`` is the first b-value found in priority order (standard then private);
    ``b_source`` names where it came from so the classifier can cite it.
    """

    path: Path
    frame: int | None
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    rows: int
    columns: int
    b_value: float | None = None
    b_source: str | None = None
    gradient: tuple[float, float, float] | None = None
    directionality: str | None = None
    temporal_index: int | None = None
    acquisition_number: int | None = None
    instance_number: int | None = None
    frame_type: tuple[str, ...] = ()
    acquisition_contrast: str | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    rescale: tuple[float, float] = (1.0, 0.0)
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


def _f(v) -> float | None:
    return h.first_number(v)


def _i(v) -> int | None:
    n = h.first_number(v)
    return int(n) if n is not None else None


def _vec(v, n: int) -> tuple[float, ...] | None:
    nums = h._numbers(v)  # noqa: SLF001 - same package
    return tuple(nums[:n]) if len(nums) >= n else None


def _classic_b(ds: Dataset) -> tuple[float | None, str | None]:
    b = _f(ds.get("DiffusionBValue"))
    if b is not None:
        return b, "DiffusionBValue (0018,9087)"
    item = h.seq_item(ds, "MRDiffusionSequence")
    if item is not None and "DiffusionBValue" in item:
        return _f(item.DiffusionBValue), "MRDiffusionSequence"
    for getter, name in (
        (h.siemens_b_value, "Siemens (0019,100C)"),
        (h.ge_b_value, "GE (0043,1039)"),
        (h.philips_b_value, "Philips (2001,1003)"),
    ):
        b = getter(ds)
        if b is not None:
            return b, name
    return None, None


def _classic_gradient(ds: Dataset) -> tuple[float, float, float] | None:
    g = _vec(ds.get("DiffusionGradientOrientation"), 3)
    if g is not None:
        return g  # type: ignore[return-value]
    vals = h.private_vector(ds, h.SIEMENS_GRADIENT, "d")
    if len(vals) >= 3:
        return (vals[0], vals[1], vals[2])
    parts = [h.first_number(h._raw(ds, t)) for t in h.GE_GRADIENT]  # noqa: SLF001
    if all(p is not None for p in parts):
        return (parts[0], parts[1], parts[2])  # type: ignore[return-value]
    return None


def classic_frames(ds: Dataset, path: Path) -> list[FrameInfo]:
    b, b_src = _classic_b(ds)
    directionality = None
    item = h.seq_item(ds, "MRDiffusionSequence")
    if item is not None:
        directionality = item.get("DiffusionDirectionality")
    directionality = directionality or h.private_text(ds, h.SIEMENS_DIRECTIONALITY)
    if not directionality:
        pdir = (h.private_text(ds, h.PHILIPS_DIRECTIONALITY) or "").upper()
        directionality = {"I": "ISOTROPIC", "N": "NONE"}.get(pdir, "DIRECTIONAL" if pdir else None)
    pos = _vec(ds.get("ImagePositionPatient"), 3)
    ori = _vec(ds.get("ImageOrientationPatient"), 6)
    ps = _vec(ds.get("PixelSpacing"), 2)
    return [
        FrameInfo(
            path=path,
            frame=None,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            position=pos,  # type: ignore[arg-type]
            orientation=ori,  # type: ignore[arg-type]
            pixel_spacing=ps,  # type: ignore[arg-type]
            slice_thickness=_f(ds.get("SliceThickness")),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            b_value=b,
            b_source=b_src,
            gradient=_classic_gradient(ds),
            directionality=str(directionality) if directionality else None,
            temporal_index=_i(ds.get("TemporalPositionIdentifier")),
            acquisition_number=_i(ds.get("AcquisitionNumber")),
            instance_number=_i(ds.get("InstanceNumber")),
            frame_type=h.tokens(ds.get("ImageType")),
            acquisition_contrast=None,
            echo_time=_f(ds.get("EchoTime")),
            inversion_time=_f(ds.get("InversionTime")),
            rescale=(_f(ds.get("RescaleSlope")) or 1.0, _f(ds.get("RescaleIntercept")) or 0.0),
        )
    ]


def enhanced_frames(ds: Dataset, path: Path) -> list[FrameInfo]:
    shared = h.seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    n = int(ds.get("NumberOfFrames", len(per_frame)) or len(per_frame) or 1)
    out: list[FrameInfo] = []
    top_slope = _f(ds.get("RescaleSlope"))
    top_icpt = _f(ds.get("RescaleIntercept"))
    for i in range(n):
        pf = per_frame[i] if i < len(per_frame) else None
        groups = (pf, shared)
        b = _f(h.group_value(groups, "MRDiffusionSequence", "DiffusionBValue"))
        b_src = "MRDiffusionSequence" if b is not None else None
        directionality = h.group_value(groups, "MRDiffusionSequence", "DiffusionDirectionality")
        grad = None
        for grp in groups:
            d = h.seq_item(grp, "MRDiffusionSequence")
            gseq = h.seq_item(d, "DiffusionGradientDirectionSequence")
            if gseq is not None and "DiffusionGradientOrientation" in gseq:
                grad = _vec(gseq.DiffusionGradientOrientation, 3)
                break
        ftype = h.group_value(groups, "MRImageFrameTypeSequence", "FrameType")
        contrast = h.group_value(groups, "MRImageFrameTypeSequence", "AcquisitionContrast")
        slope = _f(h.group_value(groups, "PixelValueTransformationSequence", "RescaleSlope"))
        icpt = _f(h.group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept"))
        out.append(
            FrameInfo(
                path=path,
                frame=i,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                position=_vec(h.group_value(groups, "PlanePositionSequence", "ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_vec(  # type: ignore[arg-type]
                    h.group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
                ),
                pixel_spacing=_vec(h.group_value(groups, "PixelMeasuresSequence", "PixelSpacing"), 2),  # type: ignore[arg-type]
                slice_thickness=_f(h.group_value(groups, "PixelMeasuresSequence", "SliceThickness")),
                rows=int(ds.get("Rows", 0) or 0),
                columns=int(ds.get("Columns", 0) or 0),
                b_value=b,
                b_source=b_src,
                gradient=grad,  # type: ignore[arg-type]
                directionality=str(directionality) if directionality else None,
                temporal_index=_i(h.group_value(groups, "FrameContentSequence", "TemporalPositionIndex")),
                acquisition_number=_i(h.group_value(groups, "FrameContentSequence", "FrameAcquisitionNumber"))
                or _i(ds.get("AcquisitionNumber")),
                instance_number=_i(ds.get("InstanceNumber")),
                frame_type=h.tokens(ftype) or h.tokens(ds.get("ImageType")),
                acquisition_contrast=str(contrast) if contrast else None,
                echo_time=_f(h.group_value(groups, "MREchoSequence", "EffectiveEchoTime")),
                inversion_time=_f(h.group_value(groups, "MRModifierSequence", "InversionTimes"))
                or _f(h.group_value(groups, "MRModifierSequence", "InversionTime")),
                rescale=(
                    slope if slope is not None else (top_slope or 1.0),
                    icpt if icpt is not None else (top_icpt or 0.0),
                ),
            )
        )
    return out


def is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def frames_of(ds: Dataset, path: Path) -> list[FrameInfo]:
    """Every frame of one file. Multi-frame files without functional groups (e.g. Hyperfine-style
    legacy multi-frame) get one FrameInfo per frame with the top-level geometry stepped along the normal.
    """
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return enhanced_frames(ds, path)
    frames = classic_frames(ds, path)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n <= 1:
        return frames
    base = frames[0]
    step = _f(ds.get("SpacingBetweenSlices")) or base.slice_thickness or 1.0
    out = []
    for i in range(n):
        pos = base.position
        if pos is not None and base.orientation is not None:
            from common.dicomio.geometry import normal_of

            nrm = normal_of(base.orientation)
            pos = tuple(p + i * step * c for p, c in zip(pos, nrm, strict=True))  # type: ignore[assignment]
        out.append(FrameInfo(**{**base.__dict__, "frame": i, "position": pos}))
    return out


def normalised_b(b: float | None, b0_max: float = DEFAULT_B0_MAX) -> float | None:
    """Round a b-value for grouping; anything at or below ``b0_max`` is b0."""
    if b is None:
        return None
    return 0.0 if b <= b0_max else float(round(b))
