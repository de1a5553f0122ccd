"""Source DWI/FLAIR datasets built in memory for the encode tests (until/besides the phantom).

Classic single-frame MR Image objects with realistic geometry (oblique-free axial, 2 b-values
at the same positions, as scanners send DWI), and an enhanced multi-frame variant made with
highdicom's legacy converter. Pixel values are a simple head-like ellipse, no patient data.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _head(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    z, y, x = np.mgrid[0:shape_zyx[0], 0:shape_zyx[1], 0:shape_zyx[2]].astype(float)
    cz, cy, cx = (s / 2 for s in shape_zyx)
    r = ((z - cz) / (shape_zyx[0] * 0.6)) ** 2 + ((y - cy) / (shape_zyx[1] * 0.42)) ** 2 + (
        (x - cx) / (shape_zyx[2] * 0.36)) ** 2
    return (r < 1).astype(float)


def make_series(study: dict, shape_zyx, spacing_xyz, origin, description, b_values=(None,),
                series_number=1, rng_seed=0) -> list[Dataset]:
    rng = np.random.default_rng(rng_seed)
    head = _head(shape_zyx)
    series_uid = generate_uid()
    out = []
    inst = 1
    for b in b_values:
        for k in range(shape_zyx[0]):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            sop = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study["uid"]
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = study["for"]
            ds.PatientName = "Phantom^Test"
            ds.PatientID = "PH0001"
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            ds.StudyDate = "20260101"
            ds.StudyTime = "101010"
            ds.SeriesDate = "20260101"
            ds.ContentDate = "20260101"
            ds.ContentTime = "101010"
            ds.AcquisitionDateTime = "20260101101010"
            ds.StudyID = "1"
            ds.AccessionNumber = "ACC1"
            ds.ReferringPhysicianName = ""
            ds.Modality = "MR"
            ds.Manufacturer = "TestVendor"
            ds.SeriesNumber = series_number
            ds.InstanceNumber = inst
            inst += 1
            ds.SeriesDescription = description
            ds.BodyPartExamined = "BRAIN"
            ds.PatientPosition = "HFS"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION" if b is not None else "OTHER", "NONE"]
            ds.ScanningSequence = "EP" if b is not None else "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = 80
            ds.RepetitionTime = 5000
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 1.5
            ds.SliceThickness = spacing_xyz[2]
            ds.SpacingBetweenSlices = spacing_xyz[2]
            ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing_xyz[2]]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [spacing_xyz[1], spacing_xyz[0]]
            ds.SliceLocation = origin[2] + k * spacing_xyz[2]
            if b is not None:
                ds.DiffusionBValue = float(b)
            ds.Rows, ds.Columns = shape_zyx[1], shape_zyx[2]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            img = head[k] * (600 if (b or 0) > 0 else 1000) + rng.normal(0, 10, head[k].shape)
            ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
            ds.InstanceCreationDate = datetime.date.today().strftime("%Y%m%d")
            out.append(ds)
    return out


def make_study(shape_zyx=(12, 64, 64), spacing_xyz=(3.0, 3.0, 5.0), enhanced=False):
    """(dwi_sources for the high-b volume, all DWI datasets, flair datasets, origin)."""
    study = {"uid": generate_uid(), "for": generate_uid()}
    origin = (-shape_zyx[2] * spacing_xyz[0] / 2, -shape_zyx[1] * spacing_xyz[1] / 2, -30.0)
    dwi_all = make_series(study, shape_zyx, spacing_xyz, origin, "DWI b0 b1000", (0, 1000), 5)
    flair = make_series(study, (shape_zyx[0], shape_zyx[1] * 2, shape_zyx[2] * 2),
                        (spacing_xyz[0] / 2, spacing_xyz[1] / 2, spacing_xyz[2]), origin, "FLAIR",
                        (None,), 6, rng_seed=1)
    if enhanced:
        mf = hd.legacy.LegacyConvertedEnhancedMRImage(
            legacy_datasets=dwi_all, series_instance_uid=generate_uid(), series_number=5,
            sop_instance_uid=generate_uid(), instance_number=1,
        )
        return [mf], [mf], flair, origin
    high = [d for d in dwi_all if float(d.DiffusionBValue) > 0]
    return high, dwi_all, flair, origin


def write_classifiable_study(folder, shape_zyx=(12, 64, 64), spacing_xyz=(3.0, 3.0, 5.0)):
    """Write a DWI (b0 + b1000) and an inversion-recovery FLAIR series the classifier accepts.

    Returns (folder, dwi datasets, flair datasets).
    """
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _high, dwi_all, flair, _origin = make_study(shape_zyx, spacing_xyz)
    for ds in flair:
        ds.InversionTime = 2500
        ds.ScanningSequence = ["SE", "IR"]
        ds.RepetitionTime = 9000
        ds.EchoTime = 120
        ds.SeriesDescription = "t2_tirm_tra_dark-fluid"
    for ds in dwi_all + flair:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder, dwi_all, flair
