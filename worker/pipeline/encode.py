"""Encode the synthetic results as DICOM objects a PACS stores and a viewer shows.

One call, :func:`encode_outputs`, turns arrays on the DWI grid plus the source DWI/FLAIR headers
into files under ``out_dir``:

===========  ==========================================  ===================================
series no.   object                                       why
===========  ==========================================  ===================================
901          Parametric Map, Tmax float32 in s            the quantitative map (RWVM unit s)
902          Parametric Map, Tmax SD float32 in s         the model's own uncertainty
903          Parametric Map, Tmax uint16 (0.1 s/unit)     viewers that ignore the RWVM (below)
904          Segmentation BINARY: core, Tmax>6, Tmax>10   contours in any SEG-aware viewer
905          Secondary Capture RGB, one per slice         overlays every PACS can show
906          Secondary Capture RGB, summary page          the one picture a stroke team reads
907          Comprehensive 3D SR, TID 1500                volumes and flags, machine-readable
===========  ==========================================  ===================================

Every object joins the original study as a new series whose description starts with
"SYNTHETIC", names synthperf (and the model) as manufacturer/software, and references the
DWI and FLAIR it came from. UIDs derive from (study UID, job version, object) so re-encoding the
same job gives the same UIDs (a PACS then replaces rather than duplicates), while a new job
version gives new ones.

Two choices are made for viewers rather than for the standard, without leaving it
(docs/conformance.md, "Objects we create"):

- Parametric Maps store their frames in ascending order along the slice normal (row x column
  direction), whatever order the DWI grid had (:func:`store_frames_ascending`): OHIF 3.13 stacks
  Parametric Map frames in file order, so descending frames showed the map flipped head-foot over
  the DWI. The SEG keeps highdicom's order: viewers place SEG frames by their positions.
- The integer Tmax map stores Tmax in tenths of a second, at most 327 (32.7 s): a viewer that
  ignores the Real World Value Mapping shows 62 for 6.2 s (the series description says so), and
  OHIF, which multiplies stored values by 100 into a signed 16-bit range, stays below 32 767
  instead of wrapping into garbage as it did with 0.01 s units. Tmax above 32.7 s (none in a DSC
  acquisition of normal length) saturates there; the float map keeps the exact value.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.errors import InvalidInputError
from worker.pipeline import render

SOFTWARE_NAME = "synthperf"
MANUFACTURER = "synthperf"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes them unique and stable
WARNING = render.WARNING_TEXT

SERIES = {
    "tmax": (901, "SYNTHETIC Tmax (s) - NOT FOR DIAGNOSTIC USE"),
    "tmax_sd": (902, "SYNTHETIC Tmax SD (s) - NOT FOR DIAGNOSTIC USE"),
    "tmax_int": (903, "SYNTHETIC Tmax in 0.1 s units - NOT FOR DIAGNOSTIC USE"),
    "seg": (904, "SYNTHETIC core/Tmax>6/Tmax>10 SEG - NOT FOR DIAGNOSTIC USE"),
    "overlay": (905, "SYNTHETIC Tmax overlay on DWI - NOT FOR DIAGNOSTIC USE"),
    "summary": (906, "SYNTHETIC perfusion summary - NOT FOR DIAGNOSTIC USE"),
    "sr": (907, "SYNTHETIC perfusion measurements SR"),
}
TMAX_INT_SLOPE = 0.1  # seconds per stored unit of the integer map (module docstring says why)
TMAX_INT_MAX = 327  # largest stored value: x100 (OHIF) still fits a signed 16-bit value

# Coded concepts (SNOMED CT / DICOM) for the segments and measurements.
SCT_INFARCT = Code("55641003", "SCT", "Infarct")
SCT_ISCHEMIA = Code("52674009", "SCT", "Ischemia")
SCT_BRAIN = codes.SCT.Brain
DCM_TMAX = codes.DCM.Tmax
LOCAL_SCHEME = "99SYNTHPERF"
CODE_MISMATCH_VOLUME = Code("MISMATCH_VOL", LOCAL_SCHEME, "Perfusion-diffusion mismatch volume")
CODE_MISMATCH_RATIO = Code("MISMATCH_RATIO", LOCAL_SCHEME, "Perfusion-diffusion mismatch ratio")
CODE_HIR = Code("HIR", LOCAL_SCHEME, "Hypoperfusion intensity ratio")
CODE_DEFUSE3 = Code("DEFUSE3", LOCAL_SCHEME, "DEFUSE-3 target mismatch profile")
CODE_EXTEND = Code("EXTEND", LOCAL_SCHEME, "EXTEND target mismatch profile")
PROCEDURE_MRI = Code("25056-3", "LN", "MRI unspecified body region")
CODE_SYNTHETIC = Code("SYNTHETIC", LOCAL_SCHEME, "Synthetic perfusion - not for diagnostic use")
# issue 15: the per-study confidence score (0..1) and whether it fell below the threshold; a low
# confidence study carries no DEFUSE-3/EXTEND evaluation
CODE_CONFIDENCE = Code("CONFIDENCE", LOCAL_SCHEME, "Synthetic perfusion confidence score")
CODE_LOW_CONFIDENCE = Code("LOW_CONFIDENCE", LOCAL_SCHEME, "Low confidence - no mismatch profile call")

SEGMENTS = (
    # number, label, category, type, modifier, key in masks
    (1, "Infarct core ADC<620", codes.SCT.MorphologicallyAbnormalStructure, SCT_INFARCT, None, "core"),
    (2, "Hypoperfusion Tmax>6s", codes.SCT.MorphologicallyAbnormalStructure, SCT_ISCHEMIA, None, "tmax6"),
    (3, "Severe hypoperf Tmax>10s", codes.SCT.MorphologicallyAbnormalStructure, SCT_ISCHEMIA,
     codes.SCT.Severe, "tmax10"),
)
# Recommended display colour of each segment (sRGB, stored as CIELab): the core in the overlay
# SC's magenta, Tmax>6 s yellow, Tmax>10 s orange. Without it OHIF picks its own colours and warns
# "RecommendedDisplayCIELabValue not found" over the image (issue 18). Viewers blend overlapping
# segments: these three stay coloured where they overlap (magenta over green blends to grey).
SEGMENT_RGB = {"core": render.CORE_RGB, "tmax6": (255, 220, 0), "tmax10": (255, 110, 0)}


@dataclass(frozen=True)
class Geometry:
    """The DWI grid in DICOM patient coordinates (LPS, mm), as SimpleITK describes it.

    ``direction`` is the row-major 3x3 matrix whose columns are the x (column), y (row) and
    z (slice) axes; ``spacing`` is (x, y, z); ``origin`` is the centre of voxel (0, 0, 0).
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    shape_zyx: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.origin) != 3 or len(self.spacing) != 3:
            raise InvalidInputError("geometry: origin and spacing need three values each")
        if len(self.direction) != 9:
            raise InvalidInputError("geometry: direction needs nine values (3x3, row-major)")
        if any(s <= 0 for s in self.spacing):
            raise InvalidInputError(f"geometry: spacing {self.spacing} must be positive")

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        size = image.GetSize()
        return cls(
            origin=tuple(float(v) for v in image.GetOrigin()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            direction=tuple(float(v) for v in image.GetDirection()),
            shape_zyx=(int(size[2]), int(size[1]), int(size[0])),
        )

    @property
    def axes(self) -> np.ndarray:
        """3x3 array whose rows are the unit x, y, z axes."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3).T

    def slice_position(self, k: int) -> np.ndarray:
        return np.asarray(self.origin) + k * self.spacing[2] * self.axes[2]

    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def plane_positions(self) -> list[hd.PlanePositionSequence]:
        return [
            hd.PlanePositionSequence(
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                image_position=[round(float(v), 6) for v in self.slice_position(k)],
            )
            for k in range(self.shape_zyx[0])
        ]

    def plane_orientation(self) -> hd.PlaneOrientationSequence:
        ax = self.axes
        return hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_orientation=[round(float(v), 6) for v in (*ax[0], *ax[1])],
        )

    def pixel_measures(self) -> hd.PixelMeasuresSequence:
        # DICOM PixelSpacing is (row spacing, column spacing) = (y, x)
        return hd.PixelMeasuresSequence(
            pixel_spacing=[float(self.spacing[1]), float(self.spacing[0])],
            slice_thickness=float(self.spacing[2]),
            spacing_between_slices=float(self.spacing[2]),
        )


@dataclass
class EncodeInput:
    """Everything encode needs. Arrays are (z, y, x) on the DWI grid described by ``geometry``.

    ``dwi_sources`` are the DWI datasets the grid came from (one per slice for classic
    single-frame series, or the enhanced multi-frame object); headers without pixel data are
    enough. ``flair_sources`` are referenced, not matched per frame.
    """

    study_uid: str
    job_version: int
    geometry: Geometry
    dwi_sources: Sequence[Dataset]
    flair_sources: Sequence[Dataset]
    dwi: np.ndarray
    tmax: np.ndarray
    tmax_sd: np.ndarray
    core: np.ndarray
    brain: np.ndarray
    measures: Mapping[str, Any]
    software_version: str
    model_name: str
    model_version: str
    tmax6: np.ndarray | None = None
    tmax10: np.ndarray | None = None
    thresholds_s: tuple[float, float] = (6.0, 10.0)
    samples: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.geometry.shape_zyx)
        for name in ("dwi", "tmax", "tmax_sd", "core", "brain"):
            arr = getattr(self, name)
            if tuple(np.shape(arr)) != shape:
                raise InvalidInputError(f"encode: {name} has shape {np.shape(arr)}, DWI grid is {shape}")
        if not self.dwi_sources:
            raise InvalidInputError("encode: dwi_sources is empty; outputs must reference the source DWI")
        if self.job_version < 1:
            raise InvalidInputError(f"encode: job_version {self.job_version} must be >= 1")
        if not np.all(np.isfinite(self.tmax)):
            raise InvalidInputError("encode: tmax contains NaN or infinite values")
        for src in self.dwi_sources:
            if src.StudyInstanceUID != self.study_uid:
                raise InvalidInputError(
                    f"encode: DWI source {src.SOPInstanceUID} belongs to study {src.StudyInstanceUID}, "
                    f"not {self.study_uid}"
                )
        brain = self.brain.astype(bool)
        lo, hi = self.thresholds_s
        if self.tmax6 is None:
            self.tmax6 = (self.tmax > lo) & brain
        if self.tmax10 is None:
            self.tmax10 = (self.tmax > hi) & brain


@dataclass
class EncodedObject:
    kind: str  # tmax | tmax_sd | tmax_int | seg | overlay | summary | sr
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    series_number: int
    series_description: str


@dataclass
class EncodeResult:
    objects: list[EncodedObject] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def manifest(self) -> list[dict[str, Any]]:
        return [asdict(o) for o in self.objects]


def output_uid(study_uid: str, job_version: int, *parts: object) -> str:
    """A UID that is the same for the same (study, job version, object) and different otherwise."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[study_uid, str(job_version), *map(str, parts)])


# --------------------------------------------------------------------------- common header work


def _model_label(inp: EncodeInput) -> str:
    """The model's name as shown in headers: a registry name, or the folder name of a weights path."""
    return Path(inp.model_name).name if "/" in inp.model_name else inp.model_name


def _software_versions(inp: EncodeInput) -> list[str]:
    """SoftwareVersions values (LO, at most 64 characters each)."""
    return [f"{SOFTWARE_NAME} {inp.software_version}"[:64], f"model {_model_label(inp)} {inp.model_version}"[:64]]


def _ref_item(ds: Dataset, frame: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def _referenced_series(sources: Sequence[Dataset]) -> list[Dataset]:
    by_series: dict[str, list[Dataset]] = {}
    for ds in sources:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    items = []
    for uid, members in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = uid
        s.ReferencedInstanceSequence = DicomSequence([_ref_item(m) for m in members])
        items.append(s)
    return items


def _mark_unpaired(ds: Dataset) -> None:
    """Image Laterality (0020,0062) U, "unpaired", on our SEGs: every one covers the brain.

    pixelmed's DicomInstanceValidator requires Series Laterality (0020,0060) unless Image or Frame
    Laterality is present; the standard requires Series Laterality only for a paired body part, and
    dciodvfy rejects it on the brain (docs/conformance.md section 11). Image Laterality is Type 3 in
    the General Image module, which the Segmentation IOD includes, with enumerated values R, L, U
    (unpaired) and B; U is true of the brain and satisfies both validators.
    """
    ds.ImageLaterality = "U"


def _finish_header(ds: Dataset, inp: EncodeInput, description: str) -> None:
    """What every object we write carries, whichever highdicom class made it."""
    ds.SeriesDescription = description[:64]
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = f"{SOFTWARE_NAME} Tmax DDPM"[:64]
    ds.SoftwareVersions = _software_versions(inp)
    src = inp.dwi_sources[0]
    body_part = str(src.get("BodyPartExamined", "") or "BRAIN")
    if "SR" not in ds.Modality:
        ds.BodyPartExamined = body_part[:16]
    if ds.Modality == "SEG":
        _mark_unpaired(ds)
    if "ImageComments" not in ds and ds.Modality != "SR":
        ds.ImageComments = WARNING
    for keyword in ("InstitutionName", "ReferringPhysicianName", "AccessionNumber", "StudyID"):
        if keyword in src and keyword not in ds:
            setattr(ds, keyword, src.get(keyword))


def _write(ds: Dataset, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def _obj(kind: str, ds: Dataset, path: Path) -> EncodedObject:
    return EncodedObject(
        kind=kind,
        path=str(path),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        series_number=int(ds.SeriesNumber),
        series_description=str(ds.SeriesDescription),
    )


def _source_images(inp: EncodeInput) -> list[Dataset]:
    """highdicom wants one multi-frame image or a list of single-frame images as sources."""
    srcs = list(inp.dwi_sources)
    multi = [s for s in srcs if int(s.get("NumberOfFrames", 1) or 1) > 1]
    if multi:
        return [multi[0]]
    return srcs


def _flair_further(inp: EncodeInput) -> list[Dataset]:
    return [f for f in inp.flair_sources if f.StudyInstanceUID == inp.study_uid]


# --------------------------------------------------------------------------- Parametric Maps


def _parametric_map(
    inp: EncodeInput, kind: str, pixels: np.ndarray, mapping: hd.pm.RealWorldValueMapping,
    content_label: str, content_description: str, window: tuple[float, float],
) -> hd.pm.ParametricMap:
    series_number, description = SERIES[kind]
    geo = inp.geometry
    pm = hd.pm.ParametricMap(
        source_images=_source_images(inp),
        pixel_array=pixels,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, 1),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{SOFTWARE_NAME} Tmax DDPM",
        software_versions=_software_versions(inp)[0],
        device_serial_number=inp.model_version[:64] or "0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=window[0], window_width=window[1])],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=content_description[:64],
        content_label=content_label,
        pixel_measures=geo.pixel_measures(),
        plane_orientation=geo.plane_orientation(),
        plane_positions=geo.plane_positions(),
        further_source_images=_flair_further(inp),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    _finish_header(pm, inp, description)
    store_frames_ascending(pm)
    return pm


def store_frames_ascending(ds: Dataset) -> None:
    """Put a single-dimension (position) multi-frame object's frames in ascending order along the
    slice normal, row direction x column direction, renumbering the position dimension index.

    highdicom sorts frames along the opposite normal (its volume convention), so an axial map is
    stored head first; OHIF stacks Parametric Map frames in file order and then shows it flipped.
    Only uncompressed pixel data of 8 bits or more per sample is reordered (all our maps).
    """
    frames = ds.PerFrameFunctionalGroupsSequence
    dims = ds.DimensionIndexSequence
    if len(dims) != 1 or dims[0].DimensionIndexPointer != 0x00200032:
        raise InvalidInputError("store_frames_ascending: the only dimension must be ImagePositionPatient")
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    along = [float(np.dot(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float), normal))
             for f in frames]
    order = [int(i) for i in np.argsort(along, kind="stable")]
    if order == list(range(len(frames))):
        return
    keyword = next(k for k in ("FloatPixelData", "DoubleFloatPixelData", "PixelData") if k in ds)
    data = bytes(getattr(ds, keyword))
    size = ds.Rows * ds.Columns * ds.get("SamplesPerPixel", 1) * ds.BitsAllocated // 8
    if ds.BitsAllocated < 8 or len(data) < size * len(frames):
        raise InvalidInputError("store_frames_ascending: needs uncompressed pixel data, 8+ bits per sample")
    setattr(ds, keyword, b"".join(data[i * size:(i + 1) * size] for i in order))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([frames[i] for i in order])
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        item.FrameContentSequence[0].DimensionIndexValues = n


def tmax_int_stored(tmax: np.ndarray) -> np.ndarray:
    """Stored values of the integer map: Tmax in 0.1 s units, 0..TMAX_INT_MAX (module docstring)."""
    return np.clip(np.round(np.clip(tmax, 0, None) / TMAX_INT_SLOPE), 0, TMAX_INT_MAX).astype(np.uint16)


def _encode_tmax_maps(inp: EncodeInput) -> list[tuple[str, Dataset]]:
    tmax = np.ascontiguousarray(inp.tmax, dtype=np.float32)
    sd = np.ascontiguousarray(np.clip(inp.tmax_sd, 0, None), dtype=np.float32)
    seconds = codes.UCUM.Second
    tmax_map = _parametric_map(
        inp, "tmax", tmax,
        hd.pm.RealWorldValueMapping(
            lut_label="TMAX_S", lut_explanation="Synthetic Tmax in seconds", unit=seconds,
            value_range=(float(min(tmax.min(), 0.0)), float(max(tmax.max(), 1.0))),
            slope=1.0, intercept=0.0, quantity_definition=DCM_TMAX,
        ),
        "TMAX", "Synthetic Tmax (DDPM mean) " + WARNING, (8.0, 16.0),
    )
    sd_map = _parametric_map(
        inp, "tmax_sd", sd,
        hd.pm.RealWorldValueMapping(
            lut_label="TMAX_SD_S", lut_explanation="Sample SD of synthetic Tmax in seconds", unit=seconds,
            value_range=(0.0, float(max(sd.max(), 1.0))),
            slope=1.0, intercept=0.0, quantity_definition=codes.SCT.StandardDeviation,
        ),
        "TMAX_SD", "Synthetic Tmax sample SD " + WARNING, (2.0, 4.0),
    )
    int_map = _parametric_map(
        inp, "tmax_int", tmax_int_stored(tmax),
        hd.pm.RealWorldValueMapping(
            lut_label="TMAX_S", lut_explanation=f"Synthetic Tmax, {TMAX_INT_SLOPE} s per unit", unit=seconds,
            value_range=(0, TMAX_INT_MAX), slope=TMAX_INT_SLOPE, intercept=0.0, quantity_definition=DCM_TMAX,
        ),
        "TMAX_INT", "Synthetic Tmax in 0.1 s units " + WARNING, (80.0, 160.0),
    )
    return [("tmax", tmax_map), ("tmax_sd", sd_map), ("tmax_int", int_map)]


# --------------------------------------------------------------------------- Segmentation


def _encode_seg(inp: EncodeInput) -> hd.seg.Segmentation:
    series_number, description = SERIES["seg"]
    geo = inp.geometry
    masks = {"core": inp.core.astype(bool), "tmax6": inp.tmax6, "tmax10": inp.tmax10}
    algo = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE_NAME, family=codes.DCM.ArtificialIntelligence,
        version=f"{inp.software_version} / {_model_label(inp)} {inp.model_version}"[:64],
    )
    descriptions = []
    for number, label, category, ptype, modifier, key in SEGMENTS:
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=category, segmented_property_type=ptype,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=output_uid(inp.study_uid, inp.job_version, "segment", number),
            tracking_id=label,
            anatomic_regions=[SCT_BRAIN],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_RGB[key]),
        )
        if modifier is not None:
            item = desc.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = DicomSequence([CodedConcept.from_code(modifier)])
        descriptions.append(desc)
    stack = np.stack([masks[s[5]] for s in SEGMENTS], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=_source_images(inp),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, "seg", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(inp.study_uid, inp.job_version, "seg", 1),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{SOFTWARE_NAME} Tmax DDPM",
        software_versions=_software_versions(inp)[0],
        device_serial_number=inp.model_version[:64] or "0",
        content_description="Synthetic core and hypoperfusion " + WARNING[:20],
        content_label="SYNTH_PERF",
        pixel_measures=geo.pixel_measures(),
        plane_orientation=geo.plane_orientation(),
        plane_positions=geo.plane_positions(),
        omit_empty_frames=False,
        # The SEG references the DWI series only (its frames' grid), not the FLAIR the Tmax model
        # read: OHIF 3.13 places a SEG on whichever referenced series it loaded first, and on an
        # oblique FLAIR it refuses the SEG (docs/conformance.md, "Known viewer defects", OHIF-2).
        # The Parametric Maps and the SR still cite the FLAIR.
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    _finish_header(seg, inp, description)
    return seg


# --------------------------------------------------------------------------- Secondary Captures


def _sc_common(sc: Dataset, inp: EncodeInput, description: str, refs: list[Dataset]) -> None:
    _finish_header(sc, inp, description)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"Synthetic Tmax from DWI+FLAIR by DDPM. {WARNING}"[:1024]
    if refs:
        sc.SourceImageSequence = DicomSequence(refs)
    # Frame of reference is not part of SC; position text is burned in instead.


def _sc_image(inp: EncodeInput, kind: str, pixels: np.ndarray, instance: int) -> hd.sc.SCImage:
    series_number, description = SERIES[kind]
    src = inp.dwi_sources[0]
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, instance),
        instance_number=instance,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(inp.geometry),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def _patient_orientation(geo: Geometry) -> tuple[str, str]:
    _, right, _, bottom = render.orientation_labels(geo.axes[0], geo.axes[1])
    return right, bottom


def _frame_orientation(ds: Dataset, item: Dataset | None) -> np.ndarray | None:
    for holder in (item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and "PlaneOrientationSequence" in holder:
            return np.asarray(holder.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    if "ImageOrientationPatient" in ds:
        return np.asarray(ds.ImageOrientationPatient, float)
    return None


def _positions(sources: Sequence[Dataset], normal: np.ndarray) -> list[tuple[float, Dataset]]:
    """(distance along ``normal``, source-image item) for every frame parallel to the DWI slices."""
    out: list[tuple[float, Dataset]] = []
    for ds in sources:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frames = list(enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)) if (
            n_frames > 1 and "PerFrameFunctionalGroupsSequence" in ds) else [(None, None)]
        for f, item in frames:
            try:
                ipp = item.PlanePositionSequence[0].ImagePositionPatient if item is not None else ds.ImagePositionPatient
            except (AttributeError, IndexError):
                continue
            iop = _frame_orientation(ds, item)
            if iop is None or abs(float(np.dot(np.cross(iop[:3], iop[3:]), normal))) < 0.999:
                continue  # not parallel to the DWI slices: no per-slice correspondence
            out.append((float(np.dot(np.asarray(ipp, float), normal)), _ref_item(ds, f)))
    return out


def _slice_refs(inp: EncodeInput, flair: bool = False) -> list[list[Dataset]]:
    """For each slice k, source-image items of the DWI instance(s)/frame(s) at that position and,
    with ``flair``, the FLAIR slice nearest to it (when FLAIR was acquired parallel to the DWI)."""
    geo = inp.geometry
    normal = geo.axes[2]
    positions = [float(np.dot(geo.slice_position(k), normal)) for k in range(geo.shape_zyx[0])]
    tol = max(geo.spacing[2] * 0.25, 1e-3)
    dwi = _positions(inp.dwi_sources, normal)
    flair_pos = _positions(_flair_further(inp), normal) if flair else []
    out = []
    for pos in positions:
        items = [item for p, item in dwi if abs(p - pos) <= tol]
        if flair_pos:
            p, item = min(flair_pos, key=lambda c: abs(c[0] - pos))
            if abs(p - pos) <= geo.spacing[2] / 2:
                items.append(item)
        out.append(items)
    return out


def _layers(inp: EncodeInput, grey: np.ndarray, k: int) -> render.SliceLayers:
    return render.SliceLayers(
        grey=grey[k], tmax=inp.tmax[k], brain=inp.brain[k].astype(bool),
        core=inp.core[k].astype(bool), tmax6=inp.tmax6[k],  # type: ignore[index]
    )


def key_slices(inp: EncodeInput, n: int = 4) -> list[int]:
    """The n slices with the largest Tmax>6 s area (core area breaks ties), in head-foot order."""
    area = inp.tmax6.reshape(inp.tmax6.shape[0], -1).sum(axis=1)  # type: ignore[union-attr]
    core = inp.core.reshape(inp.core.shape[0], -1).sum(axis=1)
    if area.max(initial=0) == 0 and core.max(initial=0) == 0:
        return []
    order = np.lexsort((-core, -area))
    chosen = [int(k) for k in order[:n] if area[k] > 0 or core[k] > 0]
    return sorted(chosen)


def _encode_overlays(inp: EncodeInput, grey: np.ndarray) -> list[Dataset]:
    geo = inp.geometry
    labels = render.orientation_labels(geo.axes[0], geo.axes[1])
    refs = _slice_refs(inp, flair=True)
    n = geo.shape_zyx[0]
    box = render.crop_box(inp.brain.astype(bool))
    out: list[Dataset] = []
    for k in range(n):
        pos = float(np.dot(geo.slice_position(k), geo.axes[2]))
        rgb = render.render_overlay_slice(_layers(inp, grey, k), k, n, pos, labels, box=box)
        if not out:
            sc = _sc_image(inp, "overlay", rgb, k + 1)
            _sc_common(sc, inp, SERIES["overlay"][1], refs[k])
        else:
            # Same series, same header: clone the first (highdicom's IOD checks cost ~40 ms each)
            # and change only what differs per slice.
            sc = copy.deepcopy(out[0])
            uid = output_uid(inp.study_uid, inp.job_version, "overlay", k + 1)
            sc.SOPInstanceUID = uid
            sc.file_meta.MediaStorageSOPInstanceUID = uid
            sc.InstanceNumber = k + 1
            sc.PixelData = np.ascontiguousarray(rgb).tobytes()
            if refs[k]:
                sc.SourceImageSequence = DicomSequence(refs[k])
            elif "SourceImageSequence" in sc:
                del sc.SourceImageSequence
        out.append(sc)
    return out


def _encode_summary(inp: EncodeInput, grey: np.ndarray) -> Dataset:
    geo = inp.geometry
    n = geo.shape_zyx[0]
    keys = key_slices(inp)
    tiles = []
    for k in keys:
        pos = float(np.dot(geo.slice_position(k), geo.axes[2]))
        tiles.append((_layers(inp, grey, k), f"slice {k + 1}/{n}  {pos:+.0f} mm"))
    src = inp.dwi_sources[0]
    date = str(src.get("StudyDate", "") or "")
    date_txt = f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else "unknown date"
    header = [
        f"Study {date_txt}   accession {src.get('AccessionNumber', '') or '-'}",
        "Tmax synthesised from DWI + FLAIR (no contrast agent given)",
        f"Model {_model_label(inp)} {inp.model_version}" + (f", {inp.samples} samples" if inp.samples else ""),
    ]
    footer = f"{SOFTWARE_NAME} {inp.software_version} - research software - {WARNING}"
    rgb = render.render_summary(inp.measures, tiles, header, footer, box=render.crop_box(inp.brain.astype(bool)))
    sc = _sc_image(inp, "summary", rgb, 1)
    refs = _slice_refs(inp, flair=True)
    flat = [item for k in keys for item in refs[k]]
    if not any(i.ReferencedSOPInstanceUID in {f.SOPInstanceUID for f in inp.flair_sources} for i in flat):
        flat += [_ref_item(f) for f in _flair_further(inp)[:1]]  # FLAIR oblique to DWI: cite the series
    _sc_common(sc, inp, SERIES["summary"][1], flat)
    return sc


# --------------------------------------------------------------------------- Structured Report


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if np.isfinite(f) else None


def _encode_sr(inp: EncodeInput, seg: hd.seg.Segmentation) -> hd.sr.Comprehensive3DSR:
    series_number, description = SERIES["sr"]
    m = inp.measures
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(inp.study_uid, inp.job_version, "device"),
            name=f"{SOFTWARE_NAME} {inp.software_version}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{_model_label(inp)} {inp.model_version}"[:64],
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    algo = hd.sr.AlgorithmIdentification(name=SOFTWARE_NAME, version=inp.software_version)
    volumes = {"core": m.get("core_ml"), "tmax6": m.get("tmax6_ml"), "tmax10": m.get("tmax10_ml")}
    groups: list[Any] = []
    for number, label, category, ptype, _modifier, key in SEGMENTS:
        value = _num(volumes[key])
        if value is None:
            continue
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=output_uid(inp.study_uid, inp.job_version, "segment", number), identifier=label,
                ),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number),
                finding_type=ptype,
                finding_category=category,
                algorithm_id=algo,
                finding_sites=[hd.sr.FindingSite(anatomic_location=SCT_BRAIN)],
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Volume, value=value,
                                      unit=Code("mL", "UCUM", "milliliter"), algorithm_id=algo)
                ],
            )
        )
    measurements = []
    for code, key, unit in (
        (CODE_MISMATCH_VOLUME, "mismatch_ml", Code("mL", "UCUM", "milliliter")),
        (CODE_MISMATCH_RATIO, "mismatch_ratio", codes.UCUM.Ratio),
        (CODE_HIR, "hir", codes.UCUM.Ratio),
    ):
        value = _num(m.get(key))
        if value is not None:
            measurements.append(hd.sr.Measurement(name=code, value=value, unit=unit, algorithm_id=algo))
    conf = m.get("confidence") if isinstance(m.get("confidence"), Mapping) else None
    low = bool(conf and conf.get("low"))
    if conf is not None and _num(conf.get("score")) is not None:
        measurements.append(hd.sr.Measurement(name=CODE_CONFIDENCE, value=_num(conf.get("score")),
                                              unit=Code("1", "UCUM", "no units"), algorithm_id=algo))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=code, value=codes.SCT.Yes if bool(m.get(key)) else codes.SCT.No)
        for code, key in ((CODE_DEFUSE3, "defuse3"), (CODE_EXTEND, "extend"))
        if m.get(key) is not None and not low
    ]
    if conf is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=CODE_LOW_CONFIDENCE,
                                                       value=codes.SCT.Yes if low else codes.SCT.No))
    evaluations.append(hd.sr.QualitativeEvaluation(name=CODE_SYNTHETIC, value=codes.SCT.Yes))
    # The mismatch profile is a TID 1411 group on the Tmax>6 s segment (the region it describes),
    # not a TID 1501 group without a region: pixelmed's TID 1500 check applies one template to
    # every group of "Imaging Measurements" and failed a 1501 group beside 1411 groups
    # (docs/conformance.md, validators).
    groups.append(
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=output_uid(inp.study_uid, inp.job_version, "profile"), identifier="Mismatch profile",
            ),
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=2),
            finding_type=codes.DCM.Perfusion,
            algorithm_id=algo,
            finding_sites=[hd.sr.FindingSite(anatomic_location=SCT_BRAIN)],
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        # from CID 100 (TID 1500 row 4 is DCID 100; DCM 126303 "Perfusion analysis by susceptibility
        # MR technique" extends it, which pixelmed reports as an error): the study is an MRI
        procedure_reported=PROCEDURE_MRI,
        imaging_measurements=groups,
    )
    # The SR lists as evidence what the SEG references (every DWI source) and the FLAIR the model
    # read (the SEG no longer cites it: OHIF-2).
    evidence = [seg, *inp.dwi_sources, *_flair_further(inp)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, "sr", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(inp.study_uid, inp.job_version, "sr", 1),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    _finish_header(sr, inp, description)
    declare_local_codes(sr)
    return sr


def declare_local_codes(ds: Dataset) -> None:
    """Name our private coding scheme (LOCAL_SCHEME) in the object, as PS3.3 C.12.1.1.3.1 asks of an
    SR that uses codes outside the standard schemes."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "synthperf local codes"
    scheme.CodingSchemeResponsibleOrganization = "synthperf"
    ds.CodingSchemeIdentificationSequence = DicomSequence([scheme])


# --------------------------------------------------------------------------- entry point


def encode_outputs(inp: EncodeInput, out_dir: str | Path) -> EncodeResult:
    """Write every output object under ``out_dir`` and return what was written, in push order.

    The summary page and the SR come first so a PACS that is slow to receive still shows the
    essentials early; overlays come last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = EncodeResult()
    t0 = time.perf_counter()
    grey = render._window(np.asarray(inp.dwi, dtype=np.float32), inp.brain.astype(bool))

    t = time.perf_counter()
    maps = _encode_tmax_maps(inp)
    result.timings_s["parametric_maps"] = time.perf_counter() - t
    t = time.perf_counter()
    seg = _encode_seg(inp)
    result.timings_s["seg"] = time.perf_counter() - t
    t = time.perf_counter()
    sr = _encode_sr(inp, seg)
    result.timings_s["sr"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = _encode_summary(inp, grey)
    overlays = _encode_overlays(inp, grey)
    result.timings_s["secondary_capture"] = time.perf_counter() - t

    t = time.perf_counter()
    result.objects.append(_obj("summary", summary, _write(summary, out, "summary.dcm")))
    result.objects.append(_obj("sr", sr, _write(sr, out, "sr.dcm")))
    for kind, ds in maps:
        result.objects.append(_obj(kind, ds, _write(ds, out, f"{kind}.dcm")))
    result.objects.append(_obj("seg", seg, _write(seg, out, "seg.dcm")))
    for k, sc in enumerate(overlays):
        result.objects.append(_obj("overlay", sc, _write(sc, out, f"overlay_{k + 1:03d}.dcm")))
    result.timings_s["write"] = time.perf_counter() - t
    result.timings_s["total"] = time.perf_counter() - t0
    (out / "manifest.json").write_text(json.dumps(result.manifest(), indent=1))
    return result


def warm_up() -> None:
    """Load once per process what the first encode would otherwise pay for (~1 s): highdicom's
    tables of the standard, the fonts and the colour table. Called after a worker forks."""
    try:
        from highdicom import _standard_utils as std  # private, so guarded: a cache warm-up only

        for name in ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map"):
            getattr(std, name, lambda: None)()
    except Exception:  # noqa: BLE001 - the first encode just pays for it
        pass
    render.tmax_lut()
    for size in (13, 14, 15, 17, 19, 20, 24):
        render.font(size)
        render.font(size, bold=True)
