"""Run the pipeline stages for one study and record every stage.

classify -> load -> core -> synthesize -> measure -> encode -> push

Each stage reads what the previous ones left in the job's work folder (``<outputs>/job_<id>/work``:
pickles, .npz arrays, JSON — only ids and paths travel through the broker) and writes its own,
so a stage can run in another process or on another machine sharing the data volume, and a
restarted worker resumes at the first stage not recorded as done.

Two recorders share the stage code: :class:`DbRecorder` writes Stage rows and the Job's state,
current stage, progress, error and result to the job store (the worker); :class:`MemoryRecorder`
keeps timings in memory (``synthperf process``, offline, no server).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from common.config import INFERENCE_PATHS, Settings
from common.errors import InputMissingError, InvalidInputError, SynthperfError
from common.jobstore.db import session_scope
from common.jobstore.models import Instance, Job, JobState, Series, Stage, StageState

log = logging.getLogger(__name__)

STAGES = ("classify", "load", "core", "synthesize", "measure", "encode", "push")
PROGRESS_AFTER = {"classify": 0.05, "load": 0.2, "core": 0.3, "synthesize": 0.8, "measure": 0.85,
                  "encode": 0.95, "push": 1.0}


def software_version() -> str:
    try:
        return metadata.version("synthperf")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def worker_name(device: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + (f" {device}" if device else "")


class Cancelled(SynthperfError):
    """The job was cancelled from the dashboard; stop between stages."""


# --------------------------------------------------------------------------- context & recorders


@dataclass
class RunOptions:
    steps: int | None  # None: the model's benchmark-chosen default
    samples: int | None
    seed: int
    model_name: str
    device: str
    inference_path: str = "auto"  # how the network runs (models.tmax_ddpm.runtime); auto = measured here
    runtime_dir: str | None = None  # per-machine cache of that measurement
    try_compile: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RunOptions:
        base = {"steps": settings.ddim_steps, "samples": settings.samples, "seed": settings.seed,
                "model_name": settings.model_name, "device": settings.device,
                "inference_path": settings.inference_path, "runtime_dir": str(settings.runtime_dir),
                "try_compile": settings.inference_try_compile}
        base.update({k: v for k, v in overrides.items() if v is not None})
        opts = cls(**base)
        if (opts.steps is not None and opts.steps < 1) or (opts.samples is not None and opts.samples < 1):
            raise ValueError(f"steps ({opts.steps}) and samples ({opts.samples}) must be >= 1")
        if opts.inference_path != "auto" and opts.inference_path not in INFERENCE_PATHS:
            raise ValueError(f"inference path {opts.inference_path!r}: choose auto or one of {', '.join(INFERENCE_PATHS)}")
        return opts


@dataclass
class Context:
    """What every stage needs: where inputs are, where to write, and how to run."""

    settings: Settings
    job_dir: Path
    input_paths: list[Path]
    study_uid: str
    job_version: int
    options: RunOptions
    job_id: int | None = None

    @property
    def work(self) -> Path:
        d = self.job_dir / "work"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def dicom_dir(self) -> Path:
        return self.job_dir / "dicom"


@dataclass
class StageOutput:
    detail: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class MemoryRecorder:
    """Stage records kept in memory (offline processing)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.result: dict[str, Any] = {}

    def start(self, name: str, device: str = "") -> None:
        self.stages[name] = {"state": StageState.RUNNING, "t0": time.perf_counter()}

    def finish(self, name: str, out: StageOutput) -> None:
        rec = self.stages[name]
        rec.update(state=StageState.DONE, duration_s=round(time.perf_counter() - rec.pop("t0"), 3),
                   warnings=out.warnings, detail=out.detail)

    def fail(self, name: str, exc: BaseException) -> None:
        rec = self.stages.setdefault(name, {})
        rec.pop("t0", None)
        rec.update(state=StageState.FAILED, error=str(exc))

    def progress(self, fraction: float) -> None:
        pass

    def update_result(self, **values: Any) -> None:
        self.result.update(values)

    def check_cancel(self) -> None:
        pass

    def is_done(self, name: str) -> bool:
        return self.stages.get(name, {}).get("state") == StageState.DONE


class DbRecorder:
    """Stage rows and job state in the job store: the single source of truth for status."""

    def __init__(self, settings: Settings, job_id: int) -> None:
        self.url = settings.effective_database_url
        self.job_id = job_id
        self._stage_id: int | None = None
        self._t0 = 0.0
        self._last_progress = 0.0

    def start(self, name: str, device: str = "") -> None:
        now = datetime.now(UTC)
        with session_scope(self.url) as s:
            job = self._job(s)
            attempts = s.scalars(select(Stage).where(Stage.job_id == self.job_id, Stage.name == name)).all()
            for old in attempts:  # a previous worker died mid-stage (the task was redelivered)
                if old.state == StageState.RUNNING:
                    old.state = StageState.FAILED
                    old.finished_at = now
                    old.error = "worker lost during this stage; the stage was started again"
            st = Stage(job_id=self.job_id, name=name, state=StageState.RUNNING, attempt=len(attempts) + 1,
                       started_at=now, worker=worker_name(device)[:200], warnings=[])
            s.add(st)
            job.current_stage = name
            if job.state in (JobState.QUEUED, JobState.FAILED, JobState.RUNNING, JobState.DONE):
                job.state = JobState.RUNNING if name != "push" else JobState.DELIVERING
            job.error = None
            job.started_at = job.started_at or now
            s.flush()
            self._stage_id = st.id
        self._t0 = time.perf_counter()

    def _job(self, s: Any) -> Job:
        job = s.get(Job, self.job_id)
        if job is None:
            raise LookupError(f"job {self.job_id} does not exist")
        return job

    def finish(self, name: str, out: StageOutput) -> None:
        with session_scope(self.url) as s:
            st = s.get(Stage, self._stage_id)
            st.state = StageState.DONE
            st.finished_at = datetime.now(UTC)
            st.duration_s = round(time.perf_counter() - self._t0, 3)
            st.warnings = list(out.warnings)
            st.detail = _jsonable(out.detail)
            job = self._job(s)
            job.progress = max(job.progress or 0.0, PROGRESS_AFTER.get(name, job.progress or 0.0))
            if out.warnings:
                job.warnings = [*(job.warnings or []), *[f"{name}: {w}" for w in out.warnings]]

    def fail(self, name: str, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._stage_id = None  # cancelled between stages: no stage is running
        with session_scope(self.url) as s:
            if self._stage_id is not None:
                st = s.get(Stage, self._stage_id)
                if st is not None and st.state == StageState.RUNNING:
                    st.state = StageState.FAILED
                    st.finished_at = datetime.now(UTC)
                    st.duration_s = round(time.perf_counter() - self._t0, 3)
                    st.error = str(exc)[:4000]
            job = self._job(s)
            if isinstance(exc, Cancelled):
                if job.state == JobState.SUPERSEDED:  # a follow-up job replaced it: keep saying so
                    return
                job.state = JobState.CANCELLED
            elif isinstance(exc, InputMissingError):
                job.state = JobState.INPUT_MISSING
            else:
                job.state = JobState.FAILED
            job.error = user_message(name, exc)
            job.finished_at = datetime.now(UTC)

    def progress(self, fraction: float) -> None:
        """Within-stage progress (synthesis), written at most every 2 %."""
        if fraction - self._last_progress < 0.02 and fraction < 1.0:
            return
        self._last_progress = fraction
        lo = PROGRESS_AFTER["core"]
        hi = PROGRESS_AFTER["synthesize"]
        with session_scope(self.url) as s:
            job = self._job(s)
            job.progress = max(job.progress or 0.0, lo + (hi - lo) * float(fraction))

    def update_result(self, **values: Any) -> None:
        with session_scope(self.url) as s:
            job = self._job(s)
            result = dict(job.result or {})
            result.update(_jsonable(values))
            job.result = result

    def check_cancel(self) -> None:
        with session_scope(self.url) as s:
            job = self._job(s)
            if job.cancel_requested or job.state in (JobState.CANCELLED, JobState.SUPERSEDED):
                raise Cancelled(f"job {self.job_id} was cancelled")

    def is_done(self, name: str) -> bool:
        with session_scope(self.url) as s:
            latest = s.scalars(
                select(Stage).where(Stage.job_id == self.job_id, Stage.name == name).order_by(Stage.id.desc())
            ).first()
            return latest is not None and latest.state == StageState.DONE


def user_message(stage: str, exc: BaseException) -> str:
    """Words a user can act on: our errors carry them; anything else is named as a bug."""
    if isinstance(exc, SynthperfError):
        return f"{stage}: {exc}"
    if type(exc).__name__ in ("SoftTimeLimitExceeded", "TimeLimitExceeded"):
        return (f"{stage}: took longer than the task time limit; raise SYNTHPERF_TASK_TIME_LIMIT_S, lower "
                "SYNTHPERF_DDIM_STEPS/SYNTHPERF_SAMPLES, or run the gpu worker on a GPU")
    return (f"{stage}: internal error {type(exc).__name__}: {exc}. This is a bug in synthperf; "
            "the worker log has the traceback. Once fixed, retry the job from this stage on the dashboard")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- artefacts


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InvalidInputError(f"{path.name} is missing from {path.parent}: the earlier stage must be re-run")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1))
    tmp.replace(path)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise InvalidInputError(f"{path.name} is missing from {path.parent}: the earlier stage must be re-run")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- stages


def stage_classify(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.classify import classify_folder, select_inputs
    from worker.rules import load_rules

    if not ctx.input_paths:
        raise InputMissingError("no DICOM files for this study were found in the spool")
    rules = load_rules(ctx.settings.rules_file)
    classes = classify_folder(ctx.input_paths, rules)
    selection = select_inputs(classes, b0_max=rules.b0_max)
    with open(ctx.work / "selection.pkl", "wb") as f:
        pickle.dump(selection, f)
    sel = selection.to_dict()
    rec.update_result(series=sel, classification=[c.to_dict() for c in classes])
    return StageOutput({"series": [c.to_dict() for c in classes], "selection": sel}, list(selection.warnings))


def _selection(ctx: Context) -> Any:
    path = ctx.work / "selection.pkl"
    if not path.is_file():
        raise InvalidInputError("selection.pkl is missing: the classify stage must be re-run")
    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - our own file in our own work folder


def _sitk_array(img: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).astype(np.float32)


def _slice_paths(slices: Sequence[Any]) -> list[str]:
    """Source files of the DWI grid, in slice order, each once (contributors included)."""
    out: list[str] = []
    for ref in slices:
        paths = [getattr(ref, "path", None)] + [getattr(c, "path", None) for c in getattr(ref, "contributors", ())]
        for p in paths:
            if p is not None and str(p) not in out:
                out.append(str(p))
    return out


def stage_load(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline import load as load_mod
    from worker.pipeline.encode import Geometry

    selection = _selection(ctx)
    loaded = load_mod.load_study(selection)
    dwi_img = loaded.dwi
    geo = Geometry.from_sitk(dwi_img)
    arrays = {"dwi": _sitk_array(dwi_img), "flair": _sitk_array(loaded.flair),
              "brain": (_sitk_array(loaded.brain) > 0).astype(np.uint8)}
    adc = getattr(loaded, "adc", None)
    if adc is not None:
        arrays["adc"] = _sitk_array(adc)
    _save_npz(ctx.work / "volumes.npz", **arrays)
    sources = getattr(loaded, "sources", None) or {}
    dwi_paths = _slice_paths(sources.get("dwi") or []) or [str(p) for p in selection.dwi.files]
    flair_paths = _slice_paths(sources.get("flair") or []) or [str(p) for p in selection.flair.files]
    meta = {
        "geometry": {"origin": geo.origin, "spacing": geo.spacing, "direction": geo.direction,
                     "shape_zyx": geo.shape_zyx},
        "dwi_paths": dwi_paths,
        "flair_paths": flair_paths,
        "adc_units": "1e-6 mm2/s",  # load.py always returns ADC in 1e-6 mm^2/s
        "adc_computed": bool(getattr(loaded, "adc_computed", False)),
        "b_high": float(getattr(loaded, "b_high", 0.0) or 0.0),
        "dwi_directions": int(getattr(loaded, "dwi_directions", 0) or 0),
        # FLAIR registration record: the confidence score reads its overlap and motion (issue 15)
        "registration": getattr(loaded, "registration", None) or {},
    }
    _save_json(ctx.work / "load.json", meta)
    registration = getattr(loaded, "registration", None) or {}
    detail = {"registration": registration, "timings_s": getattr(loaded, "timings_s", {}), "shape_zyx": geo.shape_zyx, "spacing_xyz": geo.spacing,
              "dwi_sources": len(dwi_paths), "flair_sources": len(flair_paths)}
    rec.update_result(registration=registration)
    return StageOutput(detail, list(getattr(loaded, "warnings", []) or []))


def _geometry(ctx: Context) -> Any:
    from worker.pipeline.encode import Geometry

    g = _load_json(ctx.work / "load.json")["geometry"]
    return Geometry(origin=tuple(g["origin"]), spacing=tuple(g["spacing"]), direction=tuple(g["direction"]),
                    shape_zyx=tuple(g["shape_zyx"]))


def _spacing_zyx(geo: Any) -> tuple[float, float, float]:
    return (float(geo.spacing[2]), float(geo.spacing[1]), float(geo.spacing[0]))


def stage_core(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.core import CoreParams, segment_core

    vols = _load_npz(ctx.work / "volumes.npz")
    meta = _load_json(ctx.work / "load.json")
    geo = _geometry(ctx)
    if "adc" not in vols:
        raise InvalidInputError("no ADC on the DWI grid: send an ADC series or DWI with b0 and high b")
    res = segment_core(vols["adc"], vols["dwi"], vols["brain"].astype(bool), _spacing_zyx(geo),
                       CoreParams.from_settings(ctx.settings), adc_units=meta.get("adc_units"),
                       direction=geo.direction)
    _save_npz(ctx.work / "core.npz", core=res.mask.astype(np.uint8))
    detail = {"method": res.method, "adc_units": res.adc_units, "units_guessed": res.units_guessed,
              "core_ml": res.volume_ml(_spacing_zyx(geo))}
    if res.method == "rule":  # what the reported core is made of (worker/pipeline/core.py, issue 15)
        detail["strict_adc620_ml"] = res.strict_volume_ml(_spacing_zyx(geo))
        detail["partial_volume_ml"] = detail["core_ml"] - detail["strict_adc620_ml"]
    rec.update_result(core=detail)
    return StageOutput(detail, list(res.warnings))


def stage_synthesize(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.synthesize import get_synthesizer, model_version, synthesize_tmax

    vols = _load_npz(ctx.work / "volumes.npz")
    core = _load_npz(ctx.work / "core.npz")["core"].astype(bool)
    geo = _geometry(ctx)
    o = ctx.options
    synth = get_synthesizer(o.model_name, o.device)
    synth.configure_runtime(o.inference_path, o.runtime_dir, o.try_compile)
    mean, sd, detail = synthesize_tmax(
        synth, vols["dwi"], vols["flair"], core, vols["brain"].astype(bool), vols.get("adc"),
        _spacing_zyx(geo), o.steps, o.samples, o.seed, progress=rec.progress,
    )
    _save_npz(ctx.work / "tmax.npz", mean=mean, sd=sd)
    detail["model_name"] = o.model_name
    detail["model_version"] = model_version(synth)
    _save_json(ctx.work / "model.json", detail)
    rec.update_result(versions={"synthperf": software_version(), "model": o.model_name,
                                "model_version": detail["model_version"], "inference": detail.get("inference")})
    return StageOutput(detail)


def stage_measure(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.measure import MeasureThresholds, compute_measures

    vols = _load_npz(ctx.work / "volumes.npz")
    core = _load_npz(ctx.work / "core.npz")["core"].astype(bool)
    tmax = _load_npz(ctx.work / "tmax.npz")["mean"]
    geo = _geometry(ctx)
    m = compute_measures(core, tmax, vols["brain"].astype(bool), geo.voxel_ml(),
                         MeasureThresholds.from_settings(ctx.settings), flair=vols["flair"],
                         spacing_zyx=_spacing_zyx(geo), direction=geo.direction)
    measures = m.to_dict()
    # issue 15: per-study confidence; a low-confidence study keeps its maps but gets no DEFUSE-3/EXTEND call
    from worker.pipeline.confidence import apply_confidence, study_confidence

    tmax_all = _load_npz(ctx.work / "tmax.npz")
    load_meta = _load_json(ctx.work / "load.json")  # its ADC is in 1e-6 mm^2/s, as the confidence reads it
    confidence = study_confidence(
        tmax, tmax_all["sd"], core, vols["brain"].astype(bool), _spacing_zyx(geo), dwi=vols["dwi"],
        flair=vols["flair"], adc=vols.get("adc"), model_source=_load_json(ctx.work / "model.json").get("model_source"),
        registration=load_meta.get("registration"), direction=geo.direction,
        diffusion=load_meta if "b_high" in load_meta else None)
    measures = apply_confidence(measures, confidence)
    _save_json(ctx.work / "measures.json", measures)
    rec.update_result(measures=measures)
    from worker.pipeline.perfusion import perfusion_for_job  # real maps when a DSC series came

    real, real_warnings = perfusion_for_job(_selection(ctx), vols["dwi"], vols["brain"], core, geo.origin,
                                            geo.spacing, geo.direction, ctx.job_dir / "perfusion")
    if real is not None:
        from worker.pipeline.shadow import shadow_for_job  # issue 17: synthetic vs DSC, kept per job

        real = shadow_for_job(ctx, real, tmax, vols["brain"], measures, _load_json(ctx.work / "model.json"))
        _save_json(ctx.work / "perfusion.json", real)
        rec.update_result(perfusion=real)
    return StageOutput({"measures": measures, "perfusion": real and real.get("measures")}, real_warnings)


def _headers(paths: Sequence[str]) -> list[pydicom.Dataset]:
    seen: dict[str, pydicom.Dataset] = {}
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    return list(seen.values())


def stage_encode(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.encode import EncodeInput, encode_outputs

    vols = _load_npz(ctx.work / "volumes.npz")
    core = _load_npz(ctx.work / "core.npz")["core"].astype(bool)
    t = _load_npz(ctx.work / "tmax.npz")
    meta = _load_json(ctx.work / "load.json")
    model = _load_json(ctx.work / "model.json")
    measures = _load_json(ctx.work / "measures.json")
    geo = _geometry(ctx)
    dwi_sources = _headers(meta["dwi_paths"])
    enhanced = [d for d in dwi_sources if int(d.get("NumberOfFrames", 1) or 1) > 1]
    if enhanced:
        dwi_sources = enhanced[:1]
    inp = EncodeInput(
        study_uid=ctx.study_uid or str(dwi_sources[0].StudyInstanceUID), job_version=ctx.job_version, geometry=geo, dwi_sources=dwi_sources,
        flair_sources=_headers(meta["flair_paths"]), dwi=vols["dwi"], tmax=t["mean"], tmax_sd=t["sd"],
        core=core, brain=vols["brain"].astype(bool), measures=measures, software_version=software_version(),
        model_name=model.get("model_name", ctx.options.model_name), model_version=model.get("model_version", ""),
        thresholds_s=(ctx.settings.tmax_hypoperfusion_s, ctx.settings.tmax_severe_s),
        samples=int(model.get("samples", 0)) or None,
    )
    res = encode_outputs(inp, ctx.dicom_dir)
    from worker.pipeline.encode_perfusion import encode_job_perfusion  # issue 17: DSC-derived objects

    res.objects += encode_job_perfusion(inp, ctx.work / "perfusion.json", ctx.dicom_dir)
    objects = res.manifest()
    if ctx.job_id is not None and ctx.settings.destinations:
        from worker.pipeline.push import register_deliveries

        with session_scope(ctx.settings.effective_database_url) as s:
            register_deliveries(s, ctx.job_id, [(o["sop_instance_uid"], o["sop_class_uid"], o["path"])
                                                for o in objects], ctx.settings.destinations)
    rec.update_result(outputs={"dir": str(ctx.dicom_dir), "count": len(objects),
                               "series": sorted({(o["series_number"], o["series_description"]) for o in objects})})
    return StageOutput({"objects": len(objects), "timings_s": res.timings_s, "dir": str(ctx.dicom_dir)})


def stage_push(ctx: Context, rec: Any) -> StageOutput:
    from worker.pipeline.push import push_due

    if ctx.job_id is None:
        return StageOutput({"destinations": 0, "note": "offline run: nothing pushed"})
    report = push_due(ctx.settings, ctx.job_id)  # with no destination this just completes the job
    if not ctx.settings.destinations:
        return StageOutput({**report.as_dict(), "note": "no destination configured; outputs stay on disk"})
    warnings = [] if report.complete else [
        f"{report.pending} object(s) waiting for PACS, next attempt {report.next_attempt_at:%H:%M:%S} UTC"
    ] if report.next_attempt_at else []
    return StageOutput(report.as_dict(), warnings)


STAGE_FUNCS: dict[str, Callable[[Context, Any], StageOutput]] = {
    "classify": stage_classify, "load": stage_load, "core": stage_core, "synthesize": stage_synthesize,
    "measure": stage_measure, "encode": stage_encode, "push": stage_push,
}


def run_stages(ctx: Context, rec: Any, names: Sequence[str], from_stage: str | None = None) -> dict[str, StageOutput]:
    """Run ``names`` in order; stages already done are skipped unless at/after ``from_stage``.

    A failing stage is recorded (with a message a user can act on) and re-raised.
    """
    if from_stage is not None and from_stage not in STAGES:
        raise ValueError(f"from_stage {from_stage!r} is not one of {', '.join(STAGES)}")
    rerun_from = STAGES.index(from_stage) if from_stage else len(STAGES)
    outputs: dict[str, StageOutput] = {}
    for name in names:
        if STAGES.index(name) < rerun_from and name != "push" and rec.is_done(name):
            continue
        try:
            rec.check_cancel()
        except Cancelled as exc:
            rec.fail(name, exc)
            raise
        rec.start(name, ctx.options.device if name in ("core", "synthesize") else "")
        try:
            out = STAGE_FUNCS[name](ctx, rec)
        except BaseException as exc:
            log.exception("stage failed", extra={"job_id": ctx.job_id, "stage": name})
            rec.fail(name, exc)
            raise
        rec.finish(name, out)
        outputs[name] = out
    return outputs


# --------------------------------------------------------------------------- job store glue


def job_context(settings: Settings, job_id: int, options: RunOptions | None = None) -> Context:
    """Context of a job from the job store: its spool files, study UID and version."""
    with session_scope(settings.effective_database_url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        rows = s.execute(
            select(Instance.path).join(Series, Instance.series_id == Series.id).where(Series.study_id == job.study_id)
        ).all()
        paths = [settings.spool_dir / r[0] for r in rows]
        study_uid = job.study.study_uid
        version = job.version
        job_dir = (settings.output_dir / f"job_{job_id}").resolve()
        if job.output_dir != str(job_dir):
            job.output_dir = str(job_dir)
    return Context(settings=settings, job_dir=job_dir, input_paths=paths, study_uid=study_uid,
                   job_version=version, options=options or RunOptions.from_settings(settings), job_id=job_id)
