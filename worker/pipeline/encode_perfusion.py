"""DICOM objects of the DSC-derived (real) perfusion maps, written beside the synthetic ones.

When a study brought a DSC series, the measure stage left the real maps in ``<job>/perfusion`` and
their measures in ``work/perfusion.json``; :func:`encode_job_perfusion` turns them into:

===========  ==============================================  =================================
series no.   object                                           why
===========  ==============================================  =================================
911-914      Parametric Maps float32: Tmax (s), CBF, CBV, MTT  the real maps, research use
915          Segmentation BINARY: DSC Tmax>6 s, Tmax>10 s      contours of the real hypoperfusion
916          Secondary Capture: synthetic vs DSC summary       side by side, volumes, DEFUSE-3
917          Comprehensive 3D SR, TID 1500                     real measures beside synthetic ones
===========  ==============================================  =================================

The synthetic objects' conventions are kept (worker.pipeline.encode: Parametric Map frames ascending
along the slice normal, UIDs from (study, job version, object), the DWI and FLAIR referenced), and
every header says "DSC-derived" and research use. The SR holds both sets of measures so a reader (or
a program) finds them in one document: the synthetic groups reference the synthetic SEG (series 904),
the DSC groups this SEG, and the comparison (Dice of the two Tmax>6 s regions) sits with the DSC
profile. Voxels without a measurable bolus (NaN in the maps) are stored as 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from worker.pipeline import render
from worker.pipeline import render_compare as rc
from worker.pipeline.encode import (
    CODE_DEFUSE3,
    CODE_EXTEND,
    CODE_MISMATCH_RATIO,
    CODE_MISMATCH_VOLUME,
    CODE_SYNTHETIC,
    DCM_TMAX,
    LOCAL_SCHEME,
    MANUFACTURER,
    PROCEDURE_MRI,
    SCT_BRAIN,
    SCT_INFARCT,
    SCT_ISCHEMIA,
    SOFTWARE_NAME,
    EncodedObject,
    EncodeInput,
    _finish_header,
    _flair_further,
    _num,
    _obj,
    _sc_image,
    _slice_refs,
    _software_versions,
    _source_images,
    _write,
    declare_local_codes,
    output_uid,
    store_frames_ascending,
)
from worker.pipeline.shadow import dice

DSC_WARNING = "DSC-DERIVED PERFUSION - RESEARCH USE - NOT FOR DIAGNOSTIC USE"
MODEL_NAME = f"{SOFTWARE_NAME} DSC oSVD"
ML = Code("mL", "UCUM", "milliliter")
CODE_DSC = Code("DSC", LOCAL_SCHEME, "DSC-derived perfusion (research use)")
CODE_DICE_T6 = Code("DICE_TMAX6", LOCAL_SCHEME, "Dice synthetic vs DSC-derived Tmax>6 s")

#: kind -> (series number, description, map key, unit, quantity, window centre/width, label)
MAPS: dict[str, tuple[int, str, str, Code, Code, tuple[float, float], str]] = {
    "dsc_tmax": (911, "DSC-derived Tmax (s) - research use", "tmax", codes.UCUM.Second, DCM_TMAX, (8.0, 16.0),
                 "DSC_TMAX"),
    "dsc_cbf": (912, "DSC-derived CBF (mL/100g/min) - research use", "cbf",
                Code("ml/(100.g.min)", "UCUM", "milliliter per 100 gram per minute"),
                codes.DCM.RegionalCerebralBloodFlow, (40.0, 80.0), "DSC_CBF"),
    "dsc_cbv": (913, "DSC-derived CBV (mL/100g) - research use", "cbv",
                Code("ml/(100.g)", "UCUM", "milliliter per 100 gram"),
                codes.DCM.RegionalCerebralBloodVolume, (3.0, 6.0), "DSC_CBV"),
    "dsc_mtt": (914, "DSC-derived MTT (s) - research use", "mtt", codes.UCUM.Second, codes.DCM.MeanTransitTime,
                (8.0, 16.0), "DSC_MTT"),
}
SEG_SERIES = (915, "DSC-derived Tmax>6/Tmax>10 SEG - research use")
SUMMARY_SERIES = (916, "Synthetic vs DSC-derived Tmax summary - research")
SR_SERIES = (917, "Synthetic and DSC-derived perfusion SR - research")
DSC_SEGMENTS = ((1, "DSC Tmax>6s", None, "tmax6"), (2, "DSC Tmax>10s", codes.SCT.Severe, "tmax10"))
SYNTH_SEGMENTS = ((1, "Infarct core ADC<620", SCT_INFARCT, "core_ml"), (2, "Hypoperfusion Tmax>6s", SCT_ISCHEMIA,
                  "tmax6_ml"), (3, "Severe hypoperf Tmax>10s", SCT_ISCHEMIA, "tmax10_ml"))


def _dsc_header(ds: Dataset, inp: EncodeInput, description: str) -> None:
    if ds.Modality != "SR":
        ds.ImageComments = DSC_WARNING
    _finish_header(ds, inp, description)
    ds.ManufacturerModelName = MODEL_NAME


def _finite(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.nan_to_num(np.asarray(a, np.float32), nan=0.0, posinf=0.0, neginf=0.0))


def encode_dsc_maps(inp: EncodeInput, maps: Mapping[str, np.ndarray]) -> list[tuple[str, Dataset]]:
    """Float Parametric Maps of the real Tmax, CBF, CBV and MTT (frames ascending, like encode's)."""
    geo = inp.geometry
    out = []
    for kind, (number, description, key, unit, quantity, window, label) in MAPS.items():
        pixels = _finite(maps[key])
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=label, lut_explanation=f"DSC-derived {key.upper()} (oSVD), research use", unit=unit,
            value_range=(float(min(pixels.min(), 0.0)), float(max(pixels.max(), 1.0))), slope=1.0, intercept=0.0,
            quantity_definition=quantity,
        )
        pm = hd.pm.ParametricMap(
            source_images=_source_images(inp), pixel_array=pixels,
            series_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, "series"),
            series_number=number, sop_instance_uid=output_uid(inp.study_uid, inp.job_version, kind, 1),
            instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
            software_versions=_software_versions(inp)[0], device_serial_number="DSC",
            contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=window[0], window_width=window[1])],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            content_description=f"DSC-derived {key.upper()} research use"[:64], content_label=label,
            pixel_measures=geo.pixel_measures(), plane_orientation=geo.plane_orientation(),
            plane_positions=geo.plane_positions(), further_source_images=_flair_further(inp),
            content_qualification=hd.ContentQualificationValues.RESEARCH,
        )
        _dsc_header(pm, inp, description)
        store_frames_ascending(pm)
        out.append((kind, pm))
    return out


def dsc_masks(tmax: np.ndarray, brain: np.ndarray, thresholds_s: tuple[float, float]) -> dict[str, np.ndarray]:
    t = np.nan_to_num(np.asarray(tmax, np.float32), nan=0.0)
    b = np.asarray(brain, bool)
    return {"tmax6": (t > thresholds_s[0]) & b, "tmax10": (t > thresholds_s[1]) & b}


def encode_dsc_seg(inp: EncodeInput, masks: Mapping[str, np.ndarray]) -> hd.seg.Segmentation:
    geo = inp.geometry
    algo = hd.AlgorithmIdentificationSequence(name=SOFTWARE_NAME, family=codes.DCM.Perfusion,
                                              version=f"{inp.software_version} DSC oSVD"[:64])
    descriptions = []
    for number, label, modifier, _key in DSC_SEGMENTS:
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=SCT_ISCHEMIA, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=output_uid(inp.study_uid, inp.job_version, "dsc_segment", number), tracking_id=label,
            anatomic_regions=[SCT_BRAIN],
        )
        if modifier is not None:
            item = desc.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = DicomSequence([hd.sr.CodedConcept.from_code(modifier)])
        descriptions.append(desc)
    stack = np.stack([masks[s[3]] for s in DSC_SEGMENTS], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=_source_images(inp), pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, "dsc_seg", "series"),
        series_number=SEG_SERIES[0], sop_instance_uid=output_uid(inp.study_uid, inp.job_version, "dsc_seg", 1),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=_software_versions(inp)[0], device_serial_number="DSC",
        content_description="DSC-derived hypoperfusion, research use", content_label="DSC_PERF",
        pixel_measures=geo.pixel_measures(), plane_orientation=geo.plane_orientation(),
        plane_positions=geo.plane_positions(), omit_empty_frames=False,
        further_source_images=_flair_further(inp), transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    _dsc_header(seg, inp, SEG_SERIES[1])
    return seg


def _group(inp: EncodeInput, key: str, label: str, seg: hd.seg.Segmentation, number: int, finding: Code,
           measurements: list[hd.sr.Measurement], evaluations: list[hd.sr.QualitativeEvaluation],
           algo: hd.sr.AlgorithmIdentification) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=output_uid(inp.study_uid, inp.job_version, "sr17", key),
                                                     identifier=label),
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number),
        finding_type=finding, finding_category=codes.SCT.MorphologicallyAbnormalStructure, algorithm_id=algo,
        finding_sites=[hd.sr.FindingSite(anatomic_location=SCT_BRAIN)], measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _volume(value: Any, algo: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    v = _num(value)
    return [] if v is None else [hd.sr.Measurement(name=codes.SCT.Volume, value=v, unit=ML, algorithm_id=algo)]


def _profile(m: Mapping[str, Any], algo: hd.sr.AlgorithmIdentification, flag: Code,
             dice: float | None = None) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    meas = [hd.sr.Measurement(name=code, value=_num(m.get(key)), unit=unit, algorithm_id=algo)
            for code, key, unit in ((CODE_MISMATCH_VOLUME, "mismatch_ml", ML),
                                    (CODE_MISMATCH_RATIO, "mismatch_ratio", codes.UCUM.Ratio))
            if _num(m.get(key)) is not None]
    if dice is not None:
        meas.append(hd.sr.Measurement(name=CODE_DICE_T6, value=float(dice), unit=codes.UCUM.Ratio, algorithm_id=algo))
    evals = [hd.sr.QualitativeEvaluation(name=code, value=codes.SCT.Yes if bool(m.get(key)) else codes.SCT.No)
             for code, key in ((CODE_DEFUSE3, "defuse3"), (CODE_EXTEND, "extend")) if m.get(key) is not None]
    evals.append(hd.sr.QualitativeEvaluation(name=flag, value=codes.SCT.Yes))
    return meas, evals


def encode_dsc_sr(inp: EncodeInput, synth_seg: hd.seg.Segmentation, dsc_seg: hd.seg.Segmentation,
                  real: Mapping[str, Any], dice_t6: float | None) -> hd.sr.Comprehensive3DSR:
    """TID 1500: the synthetic groups (on SEG 904) and the DSC-derived ones (on SEG 915), one document."""
    synth_algo = hd.sr.AlgorithmIdentification(name=SOFTWARE_NAME, version=inp.software_version)
    dsc_algo = hd.sr.AlgorithmIdentification(name=f"{SOFTWARE_NAME} DSC oSVD", version=inp.software_version)
    groups = [_group(inp, f"synth{n}", label, synth_seg, n, ptype, _volume(inp.measures.get(key), synth_algo), [],
                     synth_algo) for n, label, ptype, key in SYNTH_SEGMENTS]
    meas, evals = _profile(inp.measures, synth_algo, CODE_SYNTHETIC)
    groups.append(_group(inp, "synth_profile", "Synthetic mismatch profile", synth_seg, 2, codes.DCM.Perfusion,
                         meas, evals, synth_algo))
    for n, label, _mod, key in DSC_SEGMENTS:
        groups.append(_group(inp, f"dsc{n}", label, dsc_seg, n, SCT_ISCHEMIA, _volume(real.get(f"{key}_ml"), dsc_algo),
                             [], dsc_algo))
    meas, evals = _profile(real, dsc_algo, CODE_DSC, dice_t6)
    groups.append(_group(inp, "dsc_profile", "DSC mismatch profile", dsc_seg, 1, codes.DCM.Perfusion, meas, evals,
                         dsc_algo))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(inp.study_uid, inp.job_version, "device"), name=f"{SOFTWARE_NAME} {inp.software_version}"[:64],
            manufacturer_name=MANUFACTURER, model_name=MODEL_NAME),
    )
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=PROCEDURE_MRI, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[synth_seg, dsc_seg, *inp.dwi_sources, *_flair_further(inp)], content=report,
        series_instance_uid=output_uid(inp.study_uid, inp.job_version, "dsc_sr", "series"),
        series_number=SR_SERIES[0], sop_instance_uid=output_uid(inp.study_uid, inp.job_version, "dsc_sr", 1),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
    )
    _dsc_header(sr, inp, SR_SERIES[1])
    declare_local_codes(sr)
    return sr


def encode_dsc_summary(inp: EncodeInput, real_tmax: np.ndarray, real_masks: Mapping[str, np.ndarray],
                       real: Mapping[str, Any], dice_t6: float | None) -> Dataset:
    """The side-by-side page as a Secondary Capture (series 916), citing the key slices' DWI."""
    grey = render._window(np.asarray(inp.dwi, dtype=np.float32), inp.brain.astype(bool))
    union = inp.tmax6 | real_masks["tmax6"]  # type: ignore[operator]
    area = union.reshape(union.shape[0], -1).sum(axis=1)
    keys = sorted(int(k) for k in np.argsort(-area, kind="stable")[:2] if area[k] > 0)
    brain = inp.brain.astype(bool)
    core = inp.core.astype(bool)
    tiles = []
    for k in keys:
        synth = render.SliceLayers(grey=grey[k], tmax=inp.tmax[k], brain=brain[k], core=core[k], tmax6=inp.tmax6[k])  # type: ignore[index]
        dsc = render.SliceLayers(grey=grey[k], tmax=np.nan_to_num(real_tmax[k]), brain=brain[k], core=core[k],
                                 tmax6=real_masks["tmax6"][k])
        tiles.append((synth, dsc, f"slice {k + 1}/{inp.geometry.shape_zyx[0]}"))
    rgb = rc.render_comparison(inp.measures, real, tiles, dice_t6, box=render.crop_box(brain),
                               footer=f"{SOFTWARE_NAME} {inp.software_version} - research software - {DSC_WARNING}")
    sc = _sc_image(inp, "summary", rgb, 1)
    uid = output_uid(inp.study_uid, inp.job_version, "dsc_summary", 1)
    sc.SOPInstanceUID = uid
    sc.file_meta.MediaStorageSOPInstanceUID = uid
    sc.SeriesInstanceUID = output_uid(inp.study_uid, inp.job_version, "dsc_summary", "series")
    sc.SeriesNumber = SUMMARY_SERIES[0]
    refs = _slice_refs(inp)
    _dsc_header(sc, inp, SUMMARY_SERIES[1])
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"Synthetic Tmax (DDPM) beside DSC-derived Tmax (oSVD). {DSC_WARNING}"
    flat = [item for k in keys for item in refs[k]]
    if flat:
        sc.SourceImageSequence = DicomSequence(flat)
    return sc


def encode_perfusion_outputs(inp: EncodeInput, maps: Mapping[str, np.ndarray], real: Mapping[str, Any],
                             out_dir: Path) -> list[EncodedObject]:
    """Write the DSC-derived objects under ``out_dir`` (which holds encode's seg.dcm) in push order."""
    synth_seg = hd.seg.segread(out_dir / "seg.dcm")
    masks = dsc_masks(maps["tmax"], inp.brain, inp.thresholds_s)
    d6 = dice(inp.tmax6, masks["tmax6"])  # type: ignore[arg-type]
    pms = encode_dsc_maps(inp, maps)
    seg = encode_dsc_seg(inp, masks)
    sr = encode_dsc_sr(inp, synth_seg, seg, real, d6)
    summary = encode_dsc_summary(inp, maps["tmax"], masks, real, d6)
    objects = [_obj("dsc_summary", summary, _write(summary, out_dir, "dsc_summary.dcm")),
               _obj("dsc_sr", sr, _write(sr, out_dir, "dsc_sr.dcm"))]
    objects += [_obj(kind, ds, _write(ds, out_dir, f"{kind}.dcm")) for kind, ds in pms]
    objects.append(_obj("dsc_seg", seg, _write(seg, out_dir, "dsc_seg.dcm")))
    return objects


def encode_job_perfusion(inp: EncodeInput, perfusion_json: Path, out_dir: Path) -> list[EncodedObject]:
    """The encode stage's DSC step: nothing when no usable DSC came (no perfusion.json, or an error
    entry); otherwise the objects, also appended to ``out_dir/manifest.json``."""
    if not perfusion_json.is_file():
        return []
    entry = json.loads(perfusion_json.read_text())
    npz = (entry.get("outputs") or {}).get("npz")
    if entry.get("error") or not npz or not Path(npz).is_file():
        return []
    with np.load(npz) as z:
        maps = {k: z[k] for k in ("tmax", "cbf", "cbv", "mtt")}
    objects = encode_perfusion_outputs(inp, maps, entry.get("measures") or {}, out_dir)
    manifest = out_dir / "manifest.json"
    listed = json.loads(manifest.read_text()) if manifest.is_file() else []
    listed += [o.__dict__ for o in objects]
    manifest.write_text(json.dumps(listed, indent=1))
    return objects
