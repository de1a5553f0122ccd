"""A whole synthetic stroke study as DICOM: localizer and T1 (distractors), DWI (b0 + b1000 in one
series or split), ADC, FLAIR on its own moved grid, and DSC-PWI when simulated.

Layout: ``<out_dir>/<NN>_<SeriesDescription>/IM_0001.dcm ...`` (classic) or ``EN_0001.dcm``
(enhanced), plus ``study.json`` naming every series' role, form and files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from phantom.dicom.build import Acq, SeriesSpec, Study, write_classic_series, write_enhanced_series
from phantom.dicom.vendors import STYLES
from phantom.dsc import TE_S as DSC_TE_S
from phantom.dsc import TR_S as DSC_TR_S
from phantom.geometry import centred_grid


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")[:40]


def _acqs(vendor: str, field_t: float, case) -> dict[str, Acq]:
    st = STYLES[vendor]
    dwi_thick = case.acquisition["dwi"]["slice_thickness_mm"]
    fl_thick = case.acquisition["flair"]["slice_thickness_mm"]
    epi_opts = ("PFP", "FS") if vendor == "siemens" else (("EPI_GEMS", "FS") if vendor == "ge" else ("FS",))
    dwi = Acq(st.dwi_scanning_sequence, ("SK", "SP"), epi_opts, tr_ms=5300.0 if field_t > 2 else 6200.0,
              te_ms=72.0 if field_t > 2 else 89.0, etl=case.grid.shape[1] // 2, bandwidth=1400.0,
              slice_thickness_mm=dwi_thick, echo_planar=True, fat_sat=True, contrast="DIFFUSION", averages=2)
    flair = Acq(("SE", "IR"), ("SK", "SP", "MP"), ("IR",) if vendor != "ge" else ("FAST_GEMS", "IR_GEMS"),
                tr_ms=9000.0, te_ms=85.0 if field_t > 2 else 95.0, ti_ms=2500.0 if field_t > 2 else 2300.0,
                flip_deg=150.0, etl=16, bandwidth=250.0, slice_thickness_mm=fl_thick, contrast="FLUID_ATTENUATED")
    t1 = Acq(("SE",), ("SK", "SP"), (), tr_ms=550.0, te_ms=9.5, flip_deg=90.0, etl=1, bandwidth=200.0,
             slice_thickness_mm=5.0, contrast="T1")
    loc = Acq(("GR",), ("SP",), (), tr_ms=8.6, te_ms=4.0, flip_deg=20.0, etl=1, bandwidth=320.0,
              slice_thickness_mm=7.0, contrast="T1")
    dsc_info = (case.truth.get("acquisition") or {}).get("dsc") or {}
    dsc = Acq(("EP", "GR") if vendor != "siemens" else ("EP",), ("SK",), ("FS",),
              tr_ms=round(1000.0 * float(dsc_info.get("tr_s", DSC_TR_S)), 3),
              te_ms=round(1000.0 * float(dsc_info.get("te_s", DSC_TE_S)), 3),
              flip_deg=90.0, etl=case.grid.shape[1] // 2, bandwidth=1500.0, slice_thickness_mm=dwi_thick,
              echo_planar=True, fat_sat=True, contrast="PERFUSION")
    return {"dwi": dwi, "adc": dwi, "flair": flair, "t1": t1, "localizer": loc, "dsc": dsc}


def _localizer_grids() -> list:
    sag = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # cols: +y, -z, -x
    cor = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # cols: +x, -z, +y
    return [centred_grid((1, 256, 256), (7.0, 1.0, 1.0), direction=d) for d in (np.eye(3), sag, cor)]


def write_study(case, out_dir: Path, vendor: str, enhanced: bool | None = None,
                split_b: bool | None = None) -> Path:
    """Write every series of ``case`` in ``vendor`` style under ``out_dir``; returns ``out_dir``."""
    rng = np.random.default_rng(np.random.SeedSequence([case.seed, 9001]))
    st = STYLES[vendor]
    model = str(rng.choice(st.models))
    field_t = float(rng.choice(st.field_strengths))
    draw_enh, draw_split = bool(rng.random() < 0.35), bool(rng.random() < 0.3)
    enhanced = draw_enh if enhanced is None else bool(enhanced)
    split_b = draw_split if split_b is None else bool(split_b)
    study = Study(seed=case.seed, case_id=case.case_id, style=st, model=model, field_t=field_t)
    acq = _acqs(vendor, field_t, case)
    write = write_enhanced_series if enhanced else write_classic_series
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: list[dict] = []

    def emit(spec: SeriesSpec, volumes, form=None) -> None:
        folder = out_dir / f"{spec.number:02d}_{_safe(spec.description or spec.style.description)}"
        writer = form or write
        files = writer(study, spec, volumes, folder)
        manifest.append({
            "series_number": spec.number, "role": spec.role,
            "description": spec.description or spec.style.description,
            "enhanced": writer is write_enhanced_series, "folder": folder.name,
            "files": [p.name for p in files], "grid": spec.grid.to_dict(),
            "b_values": [v[1]["b_value"] for v in volumes if "b_value" in v[1]],
        })

    # 1 localizer (three orientations, always classic), 2 T1 distractor
    folder = out_dir / f"01_{_safe(st.localizer.description)}"
    files = []
    for i, g in enumerate(_localizer_grids()):
        spec = SeriesSpec(1, st.localizer, acq["localizer"], g, "localizer")
        files += write_classic_series(study, spec, [(case.render_extra(g, "localizer"), {})], folder,
                                      first_instance=i + 1)
    manifest.append({"series_number": 1, "role": "localizer", "description": st.localizer.description,
                     "enhanced": False, "folder": folder.name, "files": [p.name for p in files],
                     "grid": None, "b_values": []})
    fg = case.flair_grid
    t1_grid = centred_grid((20, 192, 192), (6.5, 240 / 192, 240 / 192), direction=fg.direction,
                           centre=np.asarray(fg.origin) + np.asarray(fg.direction) @ (
                               (np.array(fg.shape[::-1]) - 1) / 2 * np.array(fg.spacing[::-1])))
    emit(SeriesSpec(2, st.t1, acq["t1"], t1_grid, "t1"), [(case.render_extra(t1_grid, "t1"), {})])

    # DWI: b0 and b1000 together or split into two series
    b0 = (case.b0, {"b_value": 0.0})
    b1 = (case.dwi, {"b_value": 1000.0})
    if split_b:
        emit(SeriesSpec(3, st.dwi_b0, acq["dwi"], case.grid, "dwi_b0"), [b0])
        emit(SeriesSpec(4, st.dwi, acq["dwi"], case.grid, "dwi"), [b1])
    else:
        emit(SeriesSpec(3, st.dwi, acq["dwi"], case.grid, "dwi"), [b0, b1])
    emit(SeriesSpec(5, st.adc, acq["adc"], case.grid, "adc"), [(case.adc, {})])
    emit(SeriesSpec(6, st.flair, acq["flair"], fg, "flair"), [(case.flair, {})])
    if case.dsc is not None:
        vols = [(case.dsc[t], {"temporal_index": t + 1, "time_s": float(case.dsc_times_s[t])})
                for t in range(case.dsc.shape[0])]
        emit(SeriesSpec(7, st.dsc, acq["dsc"], case.grid, "dsc"), vols)

    info = {"case_id": case.case_id, "seed": case.seed, "vendor": vendor, "enhanced": enhanced,
            "split_b": split_b, "model": model, "field_strength_t": field_t,
            "study_instance_uid": study.study_uid, "synthetic": True,
            "note": "SYNTHETIC PHANTOM - not patient data - NOT FOR DIAGNOSTIC USE", "series": manifest}
    (out_dir / "study.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
