"""A site's own training set: studies with DWI, FLAIR and DSC -> cases ``synthperf train`` reads.

Each study folder (a folder of DICOM files, any layout; the spool's ``<study_uid>/`` folders work as
they are) goes through the pipeline's own classify, load (FLAIR registered onto the DWI grid) and
core stages, then the DSC deconvolution (worker.pipeline.perfusion) for the Tmax target. The case is
written as ``<out>/<case_id>/{dwi,adc,flair,core,tmax,brain}.nii.gz`` on the DWI grid (the layout of
models/tmax_ddpm/data.py) only if it passes quality control; every study, kept or not, gets a QC
record ``<out>/qc/<case_id>.json`` with its figures and, when excluded, the reasons. A study with a
QC record is finished: a second run skips it (resumable); delete the record to redo it.

QC (thresholds in :class:`QcLimits`): the series needed are present and readable; the AIF passes
its own checks (models.perfusion.aif: enough voxels, contrast-to-noise, no saturation); the bolus is
not truncated and the series has a baseline; the head did not move more than the DSC motion limit;
the DSC gives a Tmax in most of the brain (coverage); the FLAIR-to-DWI registration did not need an
implausibly large correction. A bad target teaches the model wrong perfusion, so doubt excludes.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from common.config import Settings
from common.errors import SynthperfError
from common.procs import spawned_pool

VOLUMES = ("dwi", "adc", "flair", "core", "tmax", "brain")


@dataclass(frozen=True)
class QcLimits:
    """Exclusion thresholds of the QC report."""

    min_coverage: float = 0.7  # fraction of brain voxels with a measured DSC bolus
    max_registration_rotation_deg: float = 10.0
    max_registration_translation_mm: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage must be in (0, 1], got {self.min_coverage!r}")
        if self.max_registration_rotation_deg <= 0 or self.max_registration_translation_mm <= 0:
            raise ValueError("registration limits must be positive")


def case_id_of(study_dir: Path) -> str:
    """A folder name safe on every file system, from the study folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", study_dir.name).strip("._") or "study"


def study_dirs(root: Path) -> list[Path]:
    """The study folders under ``root``: its sub-folders that hold at least one file."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of studies")
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any(p.is_file() for p in d.rglob("*")))


def _image(arr: np.ndarray, geometry: dict[str, Any]) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetOrigin(tuple(geometry["origin"]))
    img.SetSpacing(tuple(geometry["spacing"]))
    img.SetDirection(tuple(geometry["direction"]))
    return img


def qc_reasons(dsc_quality: dict[str, Any], coverage: float, registration: dict[str, Any],
               limits: QcLimits) -> list[str]:
    """Why a study must not become a training case (empty: keep it)."""
    reasons = []
    aif = dsc_quality.get("aif") or {}
    if not aif.get("ok", False):
        reasons.append(f"AIF quality: {'; '.join(aif.get('warnings') or []) or 'failed its checks'}"
                       f" (peak CNR {aif.get('peak_cnr')}, {aif.get('n_voxels')} voxels)")
    bolus = dsc_quality.get("bolus") or {}
    if bolus.get("truncated"):
        end = bolus.get("end_fraction_of_peak")
        reasons.append("DSC truncated: the bolus has not washed out by the last frame"
                       + (f" (last frames at {end:.0%} of the peak)" if isinstance(end, int | float) else ""))
    if bolus.get("short_baseline"):
        reasons.append("DSC baseline too short (fewer than 3 frames before the bolus)")
    motion = dsc_quality.get("motion") or {}
    if motion.get("moved"):
        reasons.append(f"DSC motion: head moved {motion.get('max_displacement_mm')} mm")
    if coverage < limits.min_coverage:
        reasons.append(f"DSC coverage: a bolus measured in {coverage:.0%} of the brain (< {limits.min_coverage:.0%})")
    rot, trans = registration.get("rotation_deg"), registration.get("translation_mm")
    if rot is not None and float(rot) > limits.max_registration_rotation_deg:
        reasons.append(f"registration: FLAIR rotated {float(rot):.1f} deg onto the DWI")
    if trans is not None and float(trans) > limits.max_registration_translation_mm:
        reasons.append(f"registration: FLAIR moved {float(trans):.1f} mm onto the DWI")
    return reasons


def build_case(study_dir: Path, out: Path, settings: Settings, limits: QcLimits) -> dict[str, Any]:
    """One study -> its QC record (written to ``out/qc``) and, if it passes, its case folder."""
    from worker.pipeline.perfusion import dsc_maps
    from worker.pipeline.run import Context, MemoryRecorder, RunOptions, run_stages

    cid = case_id_of(study_dir)
    work = out / ".work" / cid
    record: dict[str, Any] = {"case_id": cid, "study_dir": str(study_dir), "included": False, "reasons": []}
    try:
        ctx = Context(settings=settings, job_dir=work, input_paths=[study_dir], study_uid="", job_version=1,
                      options=RunOptions.from_settings(settings))
        rec = MemoryRecorder()
        run_stages(ctx, rec, ["classify", "load", "core"])
        with open(ctx.work / "selection.pkl", "rb") as f:
            selection = pickle.load(f)  # noqa: S301 - written by our own classify stage just now
        meta = json.loads((ctx.work / "load.json").read_text())
        geometry = meta["geometry"]
        with np.load(ctx.work / "volumes.npz") as v, np.load(ctx.work / "core.npz") as c:
            vols = {k: v[k] for k in v.files}
            core = c["core"].astype(bool)
        if getattr(selection, "dsc", None) is None:
            raise SynthperfError("no DSC series among the study's series")
        if "adc" not in vols:
            raise SynthperfError("no ADC on the DWI grid")
        brain = vols["brain"].astype(bool)
        res, series = dsc_maps(selection.dsc.frames, _image(vols["dwi"], geometry), brain, core)
        tmax = res.maps["tmax"]
        # voxels with a measured bolus (CBV is kept in large vessels, whose Tmax is not reported)
        coverage = float(np.isfinite(res.maps["cbv"][brain]).mean()) if brain.any() else 0.0
        registration = rec.result.get("registration") or {}
        record.update(
            aif=res.quality["aif"],  # the AIF's quality with its warnings, for the QC reason
            bolus=res.quality.get("bolus"), motion=res.quality.get("motion"),
            coverage=round(coverage, 4), registration={k: registration.get(k) for k in
                                                       ("rotation_deg", "translation_mm", "improved")},
            dsc_frames=int(series.signal.shape[0]), warnings=list(res.warnings),
            tmax6_ml=round(float((np.nan_to_num(tmax) > settings.tmax_hypoperfusion_s)[brain].sum())
                           * float(np.prod(geometry["spacing"])) / 1000.0, 2),
        )
        record["reasons"] = qc_reasons(res.quality, coverage, registration, limits)
        if not record["reasons"]:
            arrays = {"dwi": vols["dwi"], "adc": vols["adc"], "flair": vols["flair"], "core": core.astype(np.uint8),
                      "tmax": np.nan_to_num(tmax, nan=0.0).astype(np.float32) * brain, "brain": brain.astype(np.uint8)}
            tmp = out / f".tmp_{cid}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in VOLUMES:
                sitk.WriteImage(_image(arrays[name], geometry), str(tmp / f"{name}.nii.gz"))
            shutil.rmtree(out / cid, ignore_errors=True)
            tmp.replace(out / cid)
            record["included"] = True
    except (SynthperfError, ValueError, OSError) as exc:
        record["reasons"] = [f"unusable study: {exc}"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write_json(out / "qc" / f"{cid}.json", record)
    return record


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_plain))
    tmp.replace(path)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _build_one(args: tuple[Path, Path, Settings, QcLimits]) -> dict[str, Any]:
    return build_case(*args)


def build_dataset(studies_root: Path, out: Path, settings: Settings, jobs: int = 1,
                  limits: QcLimits | None = None,
                  progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None) -> dict[str, Any]:
    """Every study under ``studies_root`` -> cases in ``out``; returns the QC report (also written as
    ``out/qc_report.json`` and ``out/qc_report.csv``). Studies with a QC record are skipped."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    limits = limits or QcLimits()
    out.mkdir(parents=True, exist_ok=True)
    todo = [d for d in study_dirs(studies_root) if not (out / "qc" / f"{case_id_of(d)}.json").is_file()]
    done_before = len(study_dirs(studies_root)) - len(todo)
    args = [(d, out, settings, limits) for d in todo]
    wrap = progress or (lambda it, _n: it)
    if jobs == 1 or len(args) <= 1:
        for _ in wrap((_build_one(a) for a in args), len(args)):
            pass
    else:
        with spawned_pool(jobs) as pool:
            for fut in wrap(as_completed([pool.submit(_build_one, a) for a in args]), len(args)):
                fut.result()
    shutil.rmtree(out / ".work", ignore_errors=True)
    records = [json.loads(p.read_text()) for p in sorted((out / "qc").glob("*.json"))]
    report = {"studies": len(records), "included": sum(r["included"] for r in records),
              "excluded": [{"case_id": r["case_id"], "reasons": r["reasons"]} for r in records if not r["included"]],
              "skipped_as_done": done_before, "limits": asdict(limits), "records": records}
    _write_json(out / "qc_report.json", report)
    lines = ["case_id,included,coverage,aif_ok,aif_peak_cnr,motion_mm,truncated,reg_rotation_deg,reg_translation_mm,"
             "reasons"]
    for r in records:
        aif, mot, bol, reg = (r.get(k) or {} for k in ("aif", "motion", "bolus", "registration"))
        reasons = "; ".join(r["reasons"]).replace('"', "'")
        lines.append(f'{r["case_id"]},{r["included"]},{r.get("coverage", "")},{aif.get("ok", "")},'
                     f'{aif.get("peak_cnr", "")},{mot.get("max_displacement_mm", "")},{bol.get("truncated", "")},'
                     f'{reg.get("rotation_deg", "")},{reg.get("translation_mm", "")},"{reasons}"')
    (out / "qc_report.csv").write_text("\n".join(lines) + "\n")
    return report
