"""DICOM object builders: classic MR Image Storage (one file per slice) and Enhanced MR Image Storage
(one multi-frame file per series), with geometry taken from :class:`phantom.geometry.Grid`.

Everything a header says about identity is synthetic and deterministic: UIDs derive from the case
seed and the object's role, so the same seed writes byte-identical studies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from phantom.dicom.vendors import SeriesStyle, VendorStyle
from phantom.geometry import Grid

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root for generated UIDs
SYNTHETIC_COMMENT = "SYNTHETIC PHANTOM - NOT PATIENT DATA - NOT FOR DIAGNOSTIC USE"


def det_uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the case seed and the object's role."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["synthperf-phantom", str(seed), *map(str, parts)])


@dataclass
class Acq:
    """Sequence parameters of one series."""

    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    tr_ms: float
    te_ms: float
    flip_deg: float = 90.0
    ti_ms: float | None = None
    etl: int = 1
    averages: float = 1.0
    bandwidth: float = 1000.0
    slice_thickness_mm: float = 5.0
    echo_planar: bool = False
    fat_sat: bool = False
    contrast: str = "T2"  # Enhanced MR AcquisitionContrast: DIFFUSION, FLUID_ATTENUATED, T1, T2, ...


@dataclass
class Study:
    """Study-level identity shared by all series of one case."""

    seed: int
    case_id: str
    style: VendorStyle
    model: str
    field_t: float
    date: str = "20260101"
    time: str = "080000"
    series_uids: dict[int, str] = field(default_factory=dict)

    @property
    def study_uid(self) -> str:
        return det_uid(self.seed, "study")

    @property
    def frame_of_reference_uid(self) -> str:
        return det_uid(self.seed, "frame-of-reference")


@dataclass
class SeriesSpec:
    number: int
    style: SeriesStyle
    acq: Acq
    grid: Grid
    role: str  # "dwi", "dwi_b0", "adc", "flair", "t1", "localizer", "dsc"
    description: str = ""


def _ds(v: float, ndigits: int = 6) -> str:
    s = f"{v:.{ndigits}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def to_uint16(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 65535).astype(np.uint16)


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "4.1"
    meta.ImplementationVersionName = "SYNTHPERF_PH1"
    return meta


def _common(study: Study, spec: SeriesSpec, sop_class: str, sop_uid: str) -> Dataset:
    """Patient, study, series, equipment, frame of reference and SOP common attributes."""
    st = study.style
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = study.time
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = f"{int(study.time[:2]):02d}{spec.number:02d}00"
    ds.ContentTime = ds.SeriesTime
    ds.AccessionNumber = f"SYN{study.seed:07d}"
    ds.Modality = "MR"
    ds.Manufacturer = st.manufacturer
    ds.InstitutionName = "SYNTHETIC PHANTOM SITE"
    ds.ReferringPhysicianName = ""
    ds.StationName = st.station
    ds.StudyDescription = "SYNTHETIC STROKE PHANTOM^MRI BRAIN"
    ds.SeriesDescription = spec.description or spec.style.description
    ds.ManufacturerModelName = study.model
    ds.PatientName = f"PHANTOM^{study.case_id.upper()}"
    ds.PatientID = f"SYN{study.seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = "BRAIN"
    ds.DeviceSerialNumber = f"{10000 + study.seed % 90000}"
    ds.SoftwareVersions = st.software
    ds.ProtocolName = spec.style.protocol or ds.SeriesDescription
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uids.setdefault(spec.number, det_uid(study.seed, "series", spec.number))
    ds.StudyID = "1"
    ds.SeriesNumber = spec.number
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageComments = SYNTHETIC_COMMENT
    ds.BurnedInAnnotation = "NO"
    return ds


def _mr_image_attrs(ds: Dataset, study: Study, acq: Acq) -> None:
    """Classic MR Image module acquisition attributes."""
    ds.ScanningSequence = list(acq.scanning_sequence)
    ds.SequenceVariant = list(acq.sequence_variant)
    ds.ScanOptions = list(acq.scan_options) if acq.scan_options else ""
    ds.MRAcquisitionType = "2D"
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds(acq.slice_thickness_mm)
    ds.RepetitionTime = _ds(acq.tr_ms)
    ds.EchoTime = _ds(acq.te_ms)
    if acq.ti_ms is not None:
        ds.InversionTime = _ds(acq.ti_ms)
    ds.NumberOfAverages = _ds(acq.averages)
    ds.ImagingFrequency = _ds(42.577478 * study.field_t)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(study.field_t)
    ds.EchoTrainLength = str(acq.etl)
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = _ds(acq.bandwidth)
    ds.FlipAngle = _ds(acq.flip_deg)
    ds.InPlanePhaseEncodingDirection = "COL"


def _pixel_module(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0


def _window(ds: Dataset, px: np.ndarray) -> None:
    lo, hi = (float(v) for v in np.percentile(px, [1, 99.5]))
    ds.WindowCenter = _ds((lo + hi) / 2, 1)
    ds.WindowWidth = _ds(max(hi - lo, 1.0), 1)


def _orientation(grid: Grid) -> list[str]:
    d = np.asarray(grid.direction)
    return [_ds(v, 8) for v in np.concatenate([d[:, 0], d[:, 1]])]


def _position(grid: Grid, k: int) -> list[str]:
    return [_ds(v, 5) for v in grid.slice_positions()[k]]


def _slice_location(grid: Grid, k: int) -> str:
    return _ds(float(np.dot(grid.slice_positions()[k], np.asarray(grid.direction)[:, 2])), 5)


def _classic_volume_dataset(study: Study, spec: SeriesSpec, sop: str, vi: int, info: dict,
                            n_temporal: int) -> Dataset:
    """The attributes every slice of one volume of a classic series shares."""
    grid = spec.grid
    ds = _common(study, spec, MR_IMAGE, sop)
    ds.ImageType = list(info.get("image_type", spec.style.image_type))
    if spec.style.sequence_name:
        ds.SequenceName = spec.style.sequence_name
    _mr_image_attrs(ds, study, spec.acq)
    ds.SpacingBetweenSlices = _ds(grid.spacing[0])
    ds.AcquisitionNumber = str(vi + 1)
    ds.AcquisitionDate = study.date
    ds.AcquisitionTime = ds.SeriesTime
    ds.ImageOrientationPatient = _orientation(grid)
    ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
    ds.AcquisitionMatrix = [grid.shape[2], 0, 0, grid.shape[1]]
    if "temporal_index" in info:
        ds.TemporalPositionIdentifier = str(info["temporal_index"])
        ds.NumberOfTemporalPositions = str(n_temporal)
        t = int(ds.SeriesTime[:2]) * 3600 + int(ds.SeriesTime[2:4]) * 60 + info["time_s"]
        ds.AcquisitionTime = f"{int(t // 3600):02d}{int(t % 3600 // 60):02d}{t % 60:09.6f}"
    if "b_value" in info:
        study.style.add_b_value(ds, info["b_value"], classic=True)
    if "rescale_type" in info:
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = info["rescale_type"]
    return ds


def write_classic_series(study: Study, spec: SeriesSpec, volumes: list[tuple[np.ndarray, dict]],
                         out_dir: Path, first_instance: int = 1) -> list[Path]:
    """One MR Image Storage file per slice and volume. ``volumes`` is [(array (z,y,x), info)], where
    info may carry ``b_value``, ``temporal_index``/``time_s`` and an ``image_type`` override."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = spec.grid
    paths = []
    n = first_instance - 1
    n_temporal = sum(1 for _, info in volumes if "temporal_index" in info)
    for vi, (vol, info) in enumerate(volumes):
        px_vol = to_uint16(vol)
        # one dataset per volume: its slices differ only in the attributes set below the build, and
        # building the ~90 attributes anew for every file was half the time of writing a DSC series
        ds = None
        for k in range(grid.shape[0]):
            n += 1
            sop = det_uid(study.seed, "sop", spec.number, n)
            if ds is None:
                ds = _classic_volume_dataset(study, spec, sop, vi, info, n_temporal)
            else:
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = str(n)
            ds.ImagePositionPatient = _position(grid, k)
            ds.SliceLocation = _slice_location(grid, k)
            px = px_vol[k]
            _pixel_module(ds, *px.shape)
            _window(ds, px)
            ds.PixelData = px.tobytes()
            p = out_dir / f"IM_{n:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths


def _item(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def write_enhanced_series(study: Study, spec: SeriesSpec, volumes: list[tuple[np.ndarray, dict]],
                          out_dir: Path) -> list[Path]:
    """One Enhanced MR Image Storage object holding every slice of every volume as a frame."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid, acq, st = spec.grid, spec.acq, study.style
    original = spec.role != "adc"  # acquired frames carry the full MR acquisition macros
    image_type = ["ORIGINAL" if original else "DERIVED", "PRIMARY"]
    value3 = {"dwi": "DIFFUSION", "dwi_b0": "DIFFUSION", "adc": "DIFFUSION", "dsc": "PERFUSION",
              "localizer": "LOCALIZER"}.get(spec.role, "T2" if spec.role == "flair" else "T1")
    value4 = {"adc": "ADC", "flair": "NONE"}.get(spec.role, "NONE")
    frame_type = image_type + [value3, value4]
    contrast = acq.contrast
    sop = det_uid(study.seed, "sop", spec.number, 1)
    ds = _common(study, spec, ENHANCED_MR_IMAGE, sop)
    del ds.BurnedInAnnotation
    ds.ImageType = frame_type
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = contrast
    ds.ContentQualification = "RESEARCH"
    ds.InstanceNumber = "1"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionNumber = "1"
    ds.ApplicableSafetyStandardAgency = "IEC"
    if original:
        ds.AcquisitionDateTime = study.date + ds.SeriesTime
        ds.AcquisitionDuration = 60.0
        ds.ResonantNucleus = "1H"
        ds.KSpaceFiltering = "NONE"
        ds.MagneticFieldStrength = _ds(study.field_t)
        ds.PulseSequenceName = (spec.style.sequence_name or spec.style.protocol or "SEQ")[:16]
        ds.MRAcquisitionType = "2D"
        ds.EchoPulseSequence = "GRADIENT" if "GR" in acq.scanning_sequence else "SPIN"
        if ds.EchoPulseSequence == "SPIN":
            ds.MultipleSpinEcho = "NO"
        ds.MultiPlanarExcitation = "NO"
        ds.PhaseContrast = "NO"
        ds.TimeOfFlightContrast = "NO"
        ds.SteadyStatePulseSequence = "NONE"
        ds.EchoPlanarPulseSequence = "YES" if acq.echo_planar else "NO"
        ds.SaturationRecovery = "NO"
        ds.SpectrallySelectedSuppression = "FAT" if acq.fat_sat else "NONE"
        ds.OversamplingPhase = "NONE"
        ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
        ds.RectilinearPhaseEncodeReordering = "LINEAR"
        ds.SegmentedKSpaceTraversal = "SINGLE" if acq.echo_planar else "PARTIAL"
        ds.NumberOfKSpaceTrajectories = 1

    nz = grid.shape[0]
    frames = []
    per_frame = []
    diffusion = spec.role in ("dwi", "dwi_b0")
    temporal = any("temporal_index" in info for _, info in volumes)
    for vi, (vol, info) in enumerate(volumes):
        px = to_uint16(vol)
        for k in range(nz):
            frames.append(px[k])
            fc = _item(StackID="1", InStackPositionNumber=k + 1)
            if temporal:
                fc.TemporalPositionIndex = int(info["temporal_index"])
                fc.DimensionIndexValues = [int(info["temporal_index"]), k + 1]
            elif diffusion:
                fc.DimensionIndexValues = [vi + 1, k + 1]
            else:
                fc.DimensionIndexValues = [1, k + 1]
            if original:
                fc.FrameAcquisitionDateTime = ds.AcquisitionDateTime
                fc.FrameReferenceDateTime = ds.AcquisitionDateTime
                fc.FrameAcquisitionDuration = 100.0
            item = Dataset()
            item.FrameContentSequence = Sequence([fc])
            item.PlanePositionSequence = Sequence([_item(ImagePositionPatient=_position(grid, k))])
            item.MRImageFrameTypeSequence = Sequence([_item(
                FrameType=frame_type, PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
                VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE",
                AcquisitionContrast=contrast)])
            if original and diffusion:
                b = float(info["b_value"])
                item.MRDiffusionSequence = Sequence([_item(
                    DiffusionBValue=b, DiffusionDirectionality="ISOTROPIC" if b > 0 else "NONE")])
            per_frame.append(item)

    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([_item(
        PixelSpacing=[_ds(grid.spacing[1]), _ds(grid.spacing[2])], SliceThickness=_ds(acq.slice_thickness_mm),
        SpacingBetweenSlices=_ds(grid.spacing[0]))])
    shared.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=_orientation(grid))])
    shared.PixelValueTransformationSequence = Sequence([_item(
        RescaleIntercept="0", RescaleSlope="1", RescaleType="US")])
    shared.FrameAnatomySequence = Sequence([_item(
        AnatomicRegionSequence=Sequence([_code("12738006", "SCT", "Brain")]), FrameLaterality="U")])
    all_px = np.stack(frames)
    lo, hi = (float(v) for v in np.percentile(all_px, [1, 99.5]))
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter=_ds((lo + hi) / 2, 1),
                                                 WindowWidth=_ds(max(hi - lo, 1), 1))])
    if original:
        timing = _item(RepetitionTime=_ds(acq.tr_ms), EchoTrainLength=str(acq.etl), FlipAngle=_ds(acq.flip_deg),
                       RFEchoTrainLength=1 if acq.echo_planar else acq.etl,
                       GradientEchoTrainLength=acq.etl if acq.echo_planar else 0)
        timing.OperatingModeSequence = Sequence([
            _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL"),
            _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL")])
        timing.SpecificAbsorptionRateSequence = Sequence([
            _item(SpecificAbsorptionRateDefinition="IEC_HEAD", SpecificAbsorptionRateValue=0.8)])
        shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
        shared.MRFOVGeometrySequence = Sequence([_item(
            InPlanePhaseEncodingDirection="COLUMN", MRAcquisitionFrequencyEncodingSteps=grid.shape[2],
            MRAcquisitionPhaseEncodingStepsInPlane=grid.shape[1], PercentSampling="100",
            PercentPhaseFieldOfView="100")])
        shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(acq.te_ms))])
        mod = _item(InversionRecovery="YES" if acq.ti_ms is not None else "NO", FlowCompensation="NONE",
                    Spoiling="NONE", T2Preparation="NO", SpectrallySelectedExcitation="NONE",
                    SpatialPresaturation="NONE", PartialFourier="NO", ParallelAcquisition="NO")
        if acq.ti_ms is not None:
            mod.InversionTimes = [float(acq.ti_ms)]
        shared.MRModifierSequence = Sequence([mod])
        shared.MRImagingModifierSequence = Sequence([_item(
            PixelBandwidth=_ds(acq.bandwidth), MagnetizationTransfer="NONE", BloodSignalNulling="NO",
            Tagging="NONE", TransmitterFrequency=42.577478 * study.field_t)])
        shared.MRReceiveCoilSequence = Sequence([_item(
            ReceiveCoilName="HEAD 32", ReceiveCoilManufacturerName=st.manufacturer, ReceiveCoilType="MULTICOIL",
            QuadratureReceiveCoil="NO", MultiCoilDefinitionSequence=Sequence([
                _item(MultiCoilElementName="H1", MultiCoilElementUsed="YES")]))])
        shared.MRTransmitCoilSequence = Sequence([_item(
            TransmitCoilName="BODY", TransmitCoilManufacturerName=st.manufacturer, TransmitCoilType="BODY")])
        shared.MRAveragesSequence = Sequence([_item(NumberOfAverages=_ds(acq.averages))])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = str(len(frames))

    dim_uid = det_uid(study.seed, "dimension", spec.number)
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    first = (0x0020, 0x9128) if temporal else ((0x0018, 0x9087) if (original and diffusion) else (0x0020, 0x9056))
    first_group = (0x0020, 0x9111) if first != (0x0018, 0x9087) else (0x0018, 0x9117)
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=first, FunctionalGroupPointer=first_group),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=(0x0020, 0x9057),
              FunctionalGroupPointer=(0x0020, 0x9111)),
    ])
    ds.AcquisitionContextSequence = Sequence([])
    _pixel_module(ds, *frames[0].shape)
    ds.PixelData = all_px.tobytes()
    p = out_dir / "EN_0001.dcm"
    ds.save_as(p, enforce_file_format=True)
    return [p]
