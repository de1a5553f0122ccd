"""Which series is which: DWI (with b-values), ADC, FLAIR, DSC or OTHER, and which ones to use.

Series descriptions lie or are missing once anonymised, so the role comes from header evidence in a
fixed priority order that lives in data (``worker/rules/series.yaml``, overridable per site):

1. standard attributes and per-frame functional groups (SOP class, ImageType/FrameType tokens,
   AcquisitionContrast, DiffusionBValue, MRDiffusionSequence, ASL sequence),
2. vendor private b-values (Siemens (0019,100C), GE (0043,1039), Philips (2001,1003)),
3. sequence parameters (ScanningSequence, SequenceName, TE/TR/TI, inversion recovery),
4. temporal structure and contrast timing (DSC vs BOLD fMRI vs ASL),
5. SeriesDescription / ProtocolName patterns last.

Public interface (used by the worker task and ``synthperf classify``):

- :func:`classify_folder(paths, rules=None)` -> ``list[SeriesClassification]``
- :func:`select_inputs(classifications)` -> :class:`Selection`, raising
  :class:`common.errors.InputMissingError` ("no FLAIR: only DWI and ADC arrived").
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.dicomio import headers as h
from common.dicomio.frames import FrameInfo
from common.dicomio.geometry import cluster_positions, normal_of
from common.dicomio.pixels import PixelCache
from common.dicomio.series import SeriesFiles, group_series
from common.errors import InputMissingError, InvalidInputError
from worker.rules import RuleSet, load_rules

Evidence = tuple[str, str, str]  # (rule, field, observed value)

COLOUR_PHOTOMETRIC = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}
ENHANCED_MR_COLOUR = "1.2.840.10008.5.1.4.1.1.4.3"
TRACE_TOKENS = {"TRACEW", "TRACE", "ISOTROPIC", "ISODWI", "CALC_TRACE"}


@dataclass
class SeriesClassification:
    """One series and the role the rules gave it, with the evidence that decided it.

    ``evidence`` lists (rule, field, observed value): first the deciding rule's conditions, then
    ``supports:<rule>`` / ``conflicts:<rule>`` entries from later rules that also matched.
    ``b_values`` are the distinct b-values (b0 written as 0) for DWI series, else empty.
    """

    folder: str
    series_uid: str
    series_number: int | None
    description: str
    role: str
    b_values: list[float]
    confidence: float
    evidence: list[Evidence]
    files: list[Path]
    rule: str = ""
    is_trace: bool = False
    n_frames: int = 0
    features: dict[str, Any] = field(default_factory=dict, repr=False)
    frames: list[FrameInfo] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "series_instance_uid": self.series_uid,
            "series_number": self.series_number,
            "series_description": self.description,
            "role": self.role,
            "b_values": self.b_values,
            "trace": self.is_trace,
            "confidence": round(self.confidence, 3),
            "rule": self.rule,
            "evidence": [list(e) for e in self.evidence],
            "n_files": len(self.files),
            "n_frames": self.n_frames,
        }


# --------------------------------------------------------------------------------------- features
def _norm_b(values: Iterable[float | None], b0_max: float) -> list[float]:
    out = {0.0 if v <= b0_max else float(round(v)) for v in values if v is not None}
    return sorted(out)


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def _per_frame_items(ds, sequence: str) -> list:
    items = []
    for grp in list(ds.get("PerFrameFunctionalGroupsSequence", []) or []) + list(
        ds.get("SharedFunctionalGroupsSequence", []) or []
    ):
        item = h.seq_item(grp, sequence)
        if item is not None:
            items.append(item)
    return items


def series_features(s: SeriesFiles, b0_max: float = 50.0) -> dict[str, Any]:
    """Compute the features the rules test (see ``worker.rules.FEATURES`` for names and kinds)."""
    hs = s.headers
    fr = s.frames
    image_type: set[str] = set()
    contrast: set[str] = set()
    scanning: set[str] = set()
    variant: set[str] = set()
    directionality: set[str] = set()
    anisotropy: set[str] = set()
    b_std: list[float] = []
    b_sie: list[float] = []
    b_ge: list[float] = []
    b_phi: list[float] = []
    asl = False
    ir_flag = False
    epi_flag = False
    grad_flag = False
    spin_flag = False
    seq_names: list[str] = []
    temporal = 1
    tr: list[float | None] = []
    ti: list[float | None] = []
    agent = ""
    for ds in hs:
        image_type.update(h.tokens(ds.get("ImageType")))
        for v in h.tokens(ds.get("AcquisitionContrast")):
            contrast.add(v)
        scanning.update(h.tokens(ds.get("ScanningSequence")))
        variant.update(h.tokens(ds.get("SequenceVariant")))
        for key in ("SequenceName", "PulseSequenceName"):
            if ds.get(key):
                seq_names.append(str(ds.get(key)))
        if ds.get("DiffusionBValue") is not None:
            b_std.append(float(ds.DiffusionBValue))
        for getter, bucket in ((h.siemens_b_value, b_sie), (h.ge_b_value, b_ge), (h.philips_b_value, b_phi)):
            b = getter(ds)
            if b is not None:
                bucket.append(b)
        sdir = h.private_text(ds, h.SIEMENS_DIRECTIONALITY)
        if sdir:
            directionality.add(sdir.upper())
        pdir = h.private_text(ds, h.PHILIPS_DIRECTIONALITY)
        if pdir and pdir.upper() == "I":
            directionality.add("ISOTROPIC")
        for item in _per_frame_items(ds, "MRDiffusionSequence"):
            if item.get("DiffusionAnisotropyType"):
                anisotropy.add(str(item.DiffusionAnisotropyType).upper())
        for item in _per_frame_items(ds, "MRModifierSequence"):
            if str(item.get("InversionRecovery", "")).upper() == "YES":
                ir_flag = True
            if item.get("InversionTimes") is not None or item.get("InversionTime") is not None:
                ti.append(h.first_number(item.get("InversionTimes") or item.get("InversionTime")))
        for item in _per_frame_items(ds, "MRTimingAndRelatedParametersSequence"):
            tr.append(h.first_number(item.get("RepetitionTime")))
        if _per_frame_items(ds, "MRArterialSpinLabelingSequence") or ds.get("ArterialSpinLabelingContrast"):
            asl = True
        if str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES":
            epi_flag = True
        eps = str(ds.get("EchoPulseSequence", "")).upper()
        grad_flag |= eps in {"GRADIENT", "BOTH"}
        spin_flag |= eps in {"SPIN", "BOTH"}
        if str(ds.get("InversionRecovery", "")).upper() == "YES":
            ir_flag = True
        tr.append(h.first_number(ds.get("RepetitionTime")))
        ti.append(h.first_number(ds.get("InversionTime")))
        ntp = h.first_number(ds.get("NumberOfTemporalPositions"))
        if ntp:
            temporal = max(temporal, int(ntp))
        a = str(ds.get("ContrastBolusAgent", "") or "").strip()
        if not a and ds.get("ContrastBolusAgentSequence"):
            item = ds.ContrastBolusAgentSequence[0]
            a = str(item.get("CodeMeaning", "") or "contrast agent").strip()
        agent = agent or a
    for f in fr:
        image_type.update(f.frame_type)
        if f.acquisition_contrast:
            contrast.add(f.acquisition_contrast.upper())
        if f.b_source == "MRDiffusionSequence" and f.b_value is not None:
            b_std.append(f.b_value)
        if f.directionality:
            directionality.add(f.directionality.upper())
    # temporal positions: the largest of the declared count and the distinct indices seen
    tids = {f.temporal_index for f in fr if f.temporal_index is not None}
    temporal = max(temporal, len(tids))
    orientations = {tuple(round(v, 2) for v in f.orientation) for f in fr if f.orientation}
    per_position = 1
    if fr and all(f.position is not None and f.orientation is not None for f in fr):
        try:
            n = normal_of(fr[0].orientation)  # type: ignore[arg-type]
            dist = [sum(p * c for p, c in zip(f.position, n, strict=True)) for f in fr]  # type: ignore[arg-type]
            per_position = max(len(g) for g in cluster_positions(dist))
        except Exception:  # noqa: BLE001 - degenerate geometry is judged by the loader, not here
            per_position = 1
    seq_name = " ".join(dict.fromkeys(seq_names))
    sn = seq_name.lower()
    asl = asl or "ASL" in image_type
    if "IR" in scanning or "IR" in variant:
        ir_flag = True
    ti_med = _median(v for v in ti if v)
    if ti_med and ti_med > 0:
        ir_flag = True
    if "tir" in sn:
        ir_flag = True
    epi_flag |= "EP" in scanning or "EPI" in image_type or sn.lstrip("*").startswith(("ep", "re_"))
    grad_flag |= "GR" in scanning or "fid" in sn
    spin_flag |= "SE" in scanning or "epse" in sn
    photometric = {str(ds.get("PhotometricInterpretation", "")).upper() for ds in hs} - {""}
    spp = max(int(ds.get("SamplesPerPixel", 1) or 1) for ds in hs) if hs else 1
    sop = {str(ds.get("SOPClassUID", "")) for ds in hs}
    description = " | ".join(
        x for x in (s.description, str(hs[0].get("ProtocolName", "") or "").strip() if hs else "") if x
    )
    bn_std, bn_sie = _norm_b(b_std, b0_max), _norm_b(b_sie, b0_max)
    bn_ge, bn_phi = _norm_b(b_ge, b0_max), _norm_b(b_phi, b0_max)
    all_b = bn_std + bn_sie + bn_ge + bn_phi
    drop = None
    if epi_flag and temporal >= BOLUS_MIN_POINTS and not any(b > b0_max for b in all_b) and not asl:
        drop = bolus_drop(s)
    return {
        "modality": str(hs[0].get("Modality", "")) if hs else "",
        "sop_class": sop,
        "image_type": image_type,
        "acquisition_contrast": contrast,
        "photometric": photometric,
        "samples_per_pixel": spp,
        "colour": spp > 1 or bool(photometric & COLOUR_PHOTOMETRIC) or ENHANCED_MR_COLOUR in sop,
        "n_orientations": len(orientations),
        "b_standard_max": max(bn_std) if bn_std else None,
        "b_siemens_max": max(bn_sie) if bn_sie else None,
        "b_ge_max": max(bn_ge) if bn_ge else None,
        "b_philips_max": max(bn_phi) if bn_phi else None,
        "b_any_max": max(all_b) if all_b else None,
        "has_b_standard": bool(bn_std),
        "has_b_private": bool(bn_sie or bn_ge or bn_phi),
        "diffusion_directionality": directionality,
        "diffusion_anisotropy": anisotropy,
        "scanning_sequence": scanning,
        "sequence_variant": variant,
        "sequence_name": seq_name,
        "echo_time": _median(f.echo_time for f in fr) or _median(h.first_number(d.get("EchoTime")) for d in hs),
        "repetition_time": _median(tr),
        "inversion_time": ti_med,
        "inversion_recovery": ir_flag,
        "epi": epi_flag,
        "gradient_echo": grad_flag,
        "spin_echo": spin_flag,
        "temporal_positions": temporal,
        "volumes_per_position": per_position,
        "asl": asl,
        "bolus_drop": drop,
        "contrast_agent": agent or None,
        "description": description,
    }


BOLUS_MIN_POINTS = 10


def bolus_drop(s: SeriesFiles) -> float | None:
    """Contrast timing from pixels: the first-pass signal drop of a time series, as a fraction.

    DSC shows a T2* signal drop of tens of percent while the gadolinium bolus passes and then recovers;
    BOLD fMRI fluctuates by a few percent. Reads only the central slice position over time (one
    frame per time point). None when fewer than ``BOLUS_MIN_POINTS`` time points are present.
    """
    fr = [f for f in s.frames if f.position is not None and f.orientation is not None]
    if len(fr) < BOLUS_MIN_POINTS:
        return None
    n = normal_of(fr[0].orientation)  # type: ignore[arg-type]
    groups = cluster_positions([sum(p * c for p, c in zip(f.position, n, strict=True)) for f in fr])  # type: ignore[arg-type]
    mid = groups[len(groups) // 2]
    if len(mid) < BOLUS_MIN_POINTS:
        return None
    frames = sorted((fr[i] for i in mid), key=lambda f: (f.temporal_index or 0, f.acquisition_number or 0,
                                                          f.instance_number or 0, f.frame or 0))
    cache = PixelCache()
    try:
        planes = [cache.frame(f.path, f.frame, f.rescale) for f in frames]
    except InvalidInputError:
        return None
    mean_img = np.mean(planes, axis=0)
    tissue = mean_img >= np.percentile(mean_img, 60)
    if not tissue.any():
        return None
    curve = np.array([float(p[tissue].mean()) for p in planes])
    # 3-point running median: one corrupt or moved frame is not a bolus
    curve = np.array([float(np.median(curve[max(0, i - 1): i + 2])) for i in range(len(curve))])
    base = float(np.median(curve[: max(3, len(curve) // 10)]))
    if base <= 0:
        return None
    return round(max(0.0, 1.0 - float(curve.min()) / base), 4)


# ------------------------------------------------------------------------------------ the engine
def _show(value: Any) -> str:
    if isinstance(value, set | frozenset | list | tuple):
        return "[" + ", ".join(sorted(str(v) for v in value)) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _diffusion_b_values(s: SeriesFiles, features: dict[str, Any], b0_max: float) -> list[float]:
    """b-values per frame in the priority order standard -> private, b0 written as 0."""
    return _norm_b((f.b_value for f in s.frames), b0_max)


def _is_trace(features: dict[str, Any]) -> bool:
    if features["diffusion_directionality"] & {"ISOTROPIC"}:
        return True
    if features["image_type"] & TRACE_TOKENS:
        return True
    sn = features["sequence_name"].lower()
    return any(part.rstrip().endswith("t") and "_b" in part for part in sn.split())


def classify_series(s: SeriesFiles, rules: RuleSet) -> SeriesClassification:
    """Apply the rules to one series (first match decides; later matches support or conflict)."""
    feats = series_features(s, rules.b0_max)
    decided = None
    evidence: list[Evidence] = []
    confidence = 0.0
    for rule in rules.rules:
        if not all(c.test(feats) for c in rule.when):
            continue
        if decided is None:
            decided = rule
            confidence = rule.confidence
            evidence.extend((rule.name, c.field, _show(feats.get(c.field))) for c in rule.when)
            if not rule.when:
                evidence.append((rule.name, "-", rule.why))
            continue
        if not rule.when:
            continue  # the catch-all says nothing
        first = rule.when[0]
        if rule.role == decided.role:
            confidence += (1.0 - confidence) * 0.3
            evidence.append((f"supports:{rule.name}", first.field, _show(feats.get(first.field))))
        elif any(c.field == "description" for c in rule.when):
            # The description disagrees with the headers: keep the header decision, lower confidence.
            confidence *= 0.85
            evidence.append((f"conflicts:{rule.name}", "description", _show(feats.get("description"))))
    assert decided is not None  # the validated rule set ends with a catch-all
    role = decided.role
    b_values = _diffusion_b_values(s, feats, rules.b0_max) if role == "DWI" else []
    return SeriesClassification(
        folder=str(s.folder),
        series_uid=s.series_uid,
        series_number=s.series_number,
        description=s.description,
        role=role,
        b_values=b_values,
        confidence=round(min(confidence, 0.99), 3),
        evidence=evidence,
        files=list(s.paths),
        rule=decided.name,
        is_trace=role == "DWI" and _is_trace(feats),
        n_frames=len(s.frames),
        features=feats,
        frames=list(s.frames),
    )


def classify_folder(paths: str | Path | Sequence[str | Path], rules: RuleSet | None = None) -> list[SeriesClassification]:
    """Group the DICOM files under ``paths`` into series and classify each.

    ``rules`` defaults to the packaged rules; the worker passes ``load_rules(settings.rules_file)``.
    Non-DICOM files are skipped. The result is ordered by folder then SeriesNumber.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    rules = rules or load_rules()
    return [classify_series(s, rules) for s in group_series(paths)]


# ------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """The inputs chosen for one study.

    ``dwi`` holds the high-b frames (``b_high``; a trace series when one came, else the directions
    are averaged by the loader); ``b0`` the series holding b0 frames (often the same series; None when
    only an ADC came, then b0 is computed); ``adc`` None means the loader computes ADC from b0 and
    high b. ``b0_max`` is the b0 threshold of the rules used.
    """

    dwi: SeriesClassification
    b_high: float
    b0: SeriesClassification | None
    adc: SeriesClassification | None
    flair: SeriesClassification
    dsc: SeriesClassification | None = None
    b0_max: float = 50.0
    warnings: list[str] = field(default_factory=list)

    def high_b_frames(self) -> list[FrameInfo]:
        """Frames at ``b_high``; when the series mixes directional and scanner-computed isotropic
        (trace) images at that b, only the trace images (Philips stores both in one series)."""
        frames = [f for f in self.dwi.frames if f.b_value is not None and _near(f.b_value, self.b_high, self.b0_max)]
        iso = [f for f in frames if (f.directionality or "").upper() == "ISOTROPIC"]
        return iso if iso and len(iso) < len(frames) else frames

    def b0_frames(self) -> list[FrameInfo]:
        if self.b0 is None:
            return []
        return [f for f in self.b0.frames if f.b_value is not None and f.b_value <= self.b0_max]

    def to_dict(self) -> dict[str, Any]:
        def ref(c: SeriesClassification | None) -> dict[str, Any] | None:
            return None if c is None else {"series_instance_uid": c.series_uid, "folder": c.folder,
                                           "series_description": c.description, "rule": c.rule}

        return {"dwi": ref(self.dwi), "b_high": self.b_high, "b0": ref(self.b0), "adc": ref(self.adc),
                "flair": ref(self.flair), "dsc": ref(self.dsc), "warnings": list(self.warnings)}


def _near(b: float, target: float, b0_max: float) -> bool:
    return b > b0_max and abs(b - target) <= max(5.0, 0.02 * target)


def _arrived(classifications: Sequence[SeriesClassification]) -> str:
    roles = [r for r in ("DWI", "ADC", "FLAIR", "DSC") if any(c.role == r for c in classifications)]
    n_other = sum(c.role == "OTHER" for c in classifications)
    if not roles:
        return f"no usable series arrived ({n_other} other series)" if n_other else "nothing arrived"
    text = " and ".join([", ".join(roles[:-1]), roles[-1]] if len(roles) > 1 else roles)
    return f"only {text} arrived"


def _geometry_key(c: SeriesClassification) -> tuple:
    f = c.frames[0] if c.frames else None
    if f is None or f.orientation is None:
        return ()
    return (tuple(round(v, 2) for v in f.orientation), f.rows, f.columns)


def _pick_b(values: Iterable[float]) -> float:
    vals = sorted(set(values))
    clinical = [b for b in vals if 500 <= b <= 2000]
    if clinical:
        return min(clinical, key=lambda b: (abs(b - 1000), b))
    return vals[-1]


def select_inputs(classifications: Sequence[SeriesClassification], b0_max: float = 50.0) -> Selection:
    """Choose DWI high b, b0, ADC (or None) and FLAIR; raise InputMissingError saying what is missing."""
    dwis = [c for c in classifications if c.role == "DWI"]
    flairs = [c for c in classifications if c.role == "FLAIR"]
    adcs = [c for c in classifications if c.role == "ADC"]
    dscs = [c for c in classifications if c.role == "DSC"]
    missing = [name for name, lst in (("DWI", dwis), ("FLAIR", flairs)) if not lst]
    if missing:
        raise InputMissingError(
            f"no {' and no '.join(missing)}: {_arrived(classifications)}. Send the stroke MRI with DWI "
            "(b0 and high b) and FLAIR, or check the classification rules."
        )
    warnings: list[str] = []
    high = [b for c in dwis for b in c.b_values if b > b0_max]
    if not high:
        if any(not c.b_values for c in dwis):
            raise InputMissingError(
                "no high-b DWI: the DWI series carry no b-value in their headers, so b0 cannot be told "
                "from high b. Send DWI with DiffusionBValue (or the vendor's b-value tag)."
            )
        raise InputMissingError(f"no high-b DWI: only b0 diffusion images arrived ({_arrived(classifications)})")
    b_high = _pick_b(high)
    with_b = [c for c in dwis if any(_near(b, b_high, b0_max) for b in c.b_values)]
    # Prefer a trace series (scanner-computed, one image per slice), then the most frames.
    with_b.sort(key=lambda c: (not c.is_trace, -c.confidence, -c.n_frames))
    dwi = with_b[0]
    if len(with_b) > 1:
        warnings.append(
            f"{len(with_b)} DWI series have b={b_high:g}; using {dwi.description or dwi.series_uid}"
            + (" (trace)" if dwi.is_trace else "")
        )
    if 0.0 in dwi.b_values:
        b0 = dwi
    else:
        same_geo = [c for c in dwis if 0.0 in c.b_values and _geometry_key(c) == _geometry_key(dwi)]
        others = [c for c in dwis if 0.0 in c.b_values]
        b0 = (same_geo or others or [None])[0]
    adc = None
    if adcs:
        adcs.sort(key=lambda c: (_geometry_key(c) != _geometry_key(dwi), -c.confidence, -c.n_frames))
        adc = adcs[0]
    if b0 is None and adc is None:
        raise InputMissingError(
            f"no b0: DWI b={b_high:g} arrived without b0 images and without an ADC map; send the b0 "
            "images or the scanner's ADC series"
        )
    if b0 is None:
        warnings.append("no b0 images; b0 is computed from the high-b DWI and the ADC map")
    if adc is None:
        warnings.append(f"no ADC series; ADC is computed from b0 and b={b_high:g}")
    flairs.sort(key=lambda c: (-c.confidence, -c.n_frames))
    if len(flairs) > 1:
        warnings.append(f"{len(flairs)} FLAIR series; using {flairs[0].description or flairs[0].series_uid}")
    return Selection(
        dwi=dwi, b_high=b_high, b0=b0, adc=adc, flair=flairs[0], dsc=dscs[0] if dscs else None,
        b0_max=b0_max, warnings=warnings,
    )
