"""How the denoiser runs on this machine: chosen by measuring here, never by where it was built.

Why: the same weights ran 33x slower under bf16 autocast on a 2-core AMD EPYC with AVX2 only (bf16 is
emulated there) and 2-4x faster than fp32 on a CPU with native bf16; ONNX Runtime and OpenVINO beat
torch eager on some CPUs and not on others. So every candidate *path* (precision x memory format x
runtime) that can run here is timed on one real batch through the real sampler, its Tmax compared
against fp32 eager, and the fastest one within :data:`TOLERANCE_S` is kept. The choice and its
figures are cached per machine (CPU capability, torch and runtime versions, model hash, threads), so
only the first load on a new machine pays for the measurement.

Paths (``PATHS``):
- ``fp32``            torch eager, float32, contiguous (the reference every other path is checked against)
- ``channels_last``   torch eager, float32, NHWC memory format (oneDNN's preferred layout on CPU)
- ``bf16``            channels_last + bfloat16 autocast; a candidate only where the CPU runs bf16
                      natively (AVX512_BF16 or AMX) and oneDNN may use it; on CUDA always
- ``compile``         ``torch.compile`` (inductor) of the fp32 network; needs a C compiler
- ``onnxruntime``     the denoiser exported once to ONNX, run by ONNX Runtime's CPU provider
- ``openvino``        the same ONNX file compiled by OpenVINO for the CPU, float32 precision hint
On CUDA the candidates are ``fp32`` (TF32 matmuls allowed) and ``bf16``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PATHS = ("fp32", "channels_last", "bf16", "compile", "onnxruntime", "openvino")
CUDA_PATHS = ("fp32", "bf16")

#: A path is acceptable when its Tmax on the probe batch differs from fp32 eager by at most this many
#: seconds at every pixel inside the brain. 0.5 s is a fifth of the 2.5 s bins that perfusion
#: software reports Tmax in around the clinical thresholds (4/6/8/10 s); measured bf16 on the demo
#: model stays well under it (docs/benchmarks.md).
TOLERANCE_S = 0.5

#: Stacks per probe batch: large enough that per-call overheads do not decide, small enough that
#: measuring every path on 2 CPU cores takes seconds, not minutes (the first study on a machine pays it).
PROBE_BATCH = 16

#: A path's one-off setup (export, compile) is repaid over this many studies in the comparison.
AMORTISE_STUDIES = 20

#: Stacks per study used to turn the probe's time into a per-study estimate: 25 slices x 8 samples.
STACKS_PER_STUDY = 200


# --------------------------------------------------------------------------------------------------
# what the CPU can do


@dataclass(frozen=True)
class CpuFeatures:
    """What decides whether bf16 is native here. ``capability`` is torch's kernel dispatch level."""

    capability: str
    avx512_bf16: bool
    amx_bf16: bool
    onednn_bf16: bool  # oneDNN may run bf16 natively (False under ONEDNN_MAX_CPU_ISA=AVX2 and similar)
    name: str = ""

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware *and* used by torch's kernels. AVX2-only CPUs emulate it (33x slower)."""
        has_isa = self.avx512_bf16 or self.amx_bf16
        return bool(has_isa and self.onednn_bf16 and self.capability.upper().startswith(("AVX512", "AMX")))

    @classmethod
    def detect(cls) -> CpuFeatures:
        capability = str(torch.backends.cpu.get_cpu_capability())
        try:
            caps = torch.cpu.get_capabilities()
        except Exception:  # noqa: BLE001 - older torch or non-x86: report no bf16 ISA
            caps = {}
        try:
            onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # noqa: BLE001
            onednn = False
        return cls(
            capability=capability,
            avx512_bf16=bool(caps.get("avx512_bf16", False)),
            amx_bf16=bool(caps.get("amx_bf16", False)),
            onednn_bf16=onednn,
            name=str(caps.get("cpu_name") or platform.processor() or platform.machine()),
        )


# --------------------------------------------------------------------------------------------------
# the paths


Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PathUnavailable(RuntimeError):
    """A path cannot run here (missing package, compiler, or CPU feature); the message says which."""


def torch_denoiser(net: torch.nn.Module, device: torch.device, channels_last: bool = False,
                   autocast: torch.dtype | None = None) -> Denoise:
    """Eager torch. channels_last works on a copy, so paths built from one network stay independent."""
    if channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)

    def run(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        if autocast is not None:
            with torch.autocast(device_type=device.type, dtype=autocast):
                return net(inp, t).float()
        return net(inp, t).float()

    return run


def onnx_file(net: torch.nn.Module, in_channels: int, grid: int, folder: Path, model_id: str) -> Path:
    """Export the denoiser to ONNX once per model (dynamic batch); later calls reuse the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"denoiser-{(model_id or 'model')[:16]}-{torch.__version__.split('+')[0]}.onnx"
    if path.is_file():
        return path
    import warnings

    x = torch.zeros(2, in_channels, grid, grid)
    t = torch.zeros(2, dtype=torch.long)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        torch.onnx.export(net.cpu().eval(), (x, t), str(tmp), input_names=["x", "t"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "t": {0: "b"}, "y": {0: "b"}}, dynamo=False, opset_version=17)
    os.replace(tmp, path)
    return path


def _runtime_module(name: str) -> Any:
    """Import an optional inference runtime; its absence makes the path unavailable, not an error."""
    try:
        return __import__(name)
    except ImportError as exc:
        raise PathUnavailable(f"{name} is not installed") from exc


def _numpy_denoiser(infer: Callable[[dict[str, np.ndarray]], Any]) -> Denoise:
    """Wrap a runtime that takes and returns numpy (ONNX Runtime, OpenVINO) as a torch denoiser."""

    def run(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = infer({"x": inp.detach().cpu().float().contiguous().numpy(), "t": t.cpu().numpy()})
        return torch.from_numpy(np.array(y, dtype=np.float32))

    return run


def _onnxruntime_denoiser(model: Path, threads: int) -> Denoise:
    ort = _runtime_module("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return _numpy_denoiser(lambda feed: sess.run(None, feed)[0])


def _openvino_denoiser(model: Path, threads: int) -> Denoise:
    ov = _runtime_module("openvino")
    core = ov.Core()
    # The ONNX file is read by the runtime's own ONNX frontend, not ov.convert_model: the converter sends
    # usage telemetry unless a consent file says no, and it sends it from a forked child; forked from a
    # Celery worker that child hung for ever in kombu's after-fork clean-up on the inherited Redis socket
    # (six such orphans per make test run, and a test process that never exited). A hospital server
    # phones home to nobody. f32 explicitly: OpenVINO's default on CPUs with bf16 units is bf16, which is
    # a different path.
    compiled = core.compile_model(core.read_model(str(model)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return _numpy_denoiser(lambda feed: next(iter(request.infer(feed).values())))


def _compiled_denoiser(net: torch.nn.Module) -> Denoise:
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        raise PathUnavailable("torch.compile needs a C compiler (cc/gcc/clang) on PATH")
    compiled = torch.compile(net, dynamic=True)

    def run(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return compiled(inp, t).float()

    return run


def candidate_paths(device: torch.device, features: CpuFeatures, try_compile: bool = False) -> tuple[list[str], dict[str, str]]:
    """(paths worth trying here, {path: why it is not}) — no path is built yet.

    ``compile`` is left out unless asked for: its warm-up (inductor generating and compiling C++)
    took 80 s on 2 idle cores and over 300 s on loaded ones, in every new process, and it was not the
    fastest path in bench.sampling on either CPU measured (docs/benchmarks.md). The bench still times it.
    """
    if device.type == "cuda":
        return list(CUDA_PATHS), {p: "CPU-only path" for p in PATHS if p not in CUDA_PATHS}
    skipped: dict[str, str] = {}
    out = []
    for p in PATHS:
        if p == "compile" and not try_compile:
            skipped[p] = "torch.compile warm-up costs minutes per process on a small CPU; enable with inference_try_compile"
        elif p == "bf16" and not features.native_bf16:
            skipped[p] = (f"no native bf16 on this CPU (capability {features.capability}, avx512_bf16 "
                          f"{features.avx512_bf16}, amx_bf16 {features.amx_bf16}, oneDNN bf16 {features.onednn_bf16}): "
                          "autocast would be emulated")
        else:
            out.append(p)
    return out, skipped


def build_path(name: str, net: torch.nn.Module, device: torch.device, *, in_channels: int, grid: int,
               cache_dir: Path | None, model_id: str, threads: int | None = None) -> Denoise:
    """The callable for path ``name``. Raises PathUnavailable where it cannot run here."""
    threads = threads or torch.get_num_threads()
    net = net.eval()
    if name == "fp32":
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch_denoiser(net, device, channels_last=False, autocast=None)
    if name == "channels_last":
        return torch_denoiser(net, device, channels_last=True, autocast=None)
    if name == "bf16":
        return torch_denoiser(net, device, channels_last=device.type == "cpu", autocast=torch.bfloat16)
    if device.type != "cpu":
        raise PathUnavailable(f"{name} is a CPU path")
    if name == "compile":
        return _compiled_denoiser(net)
    if name in ("onnxruntime", "openvino"):
        folder = (cache_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "synthperf-runtime")
        model = onnx_file(net, in_channels, grid, folder, model_id)
        return _onnxruntime_denoiser(model, threads) if name == "onnxruntime" else _openvino_denoiser(model, threads)
    raise ValueError(f"path: unknown {name!r}; choose from {PATHS}")


# --------------------------------------------------------------------------------------------------
# measuring and choosing


@dataclass
class PathTrial:
    """One candidate's figures on the probe batch."""

    path: str
    ok: bool
    error: str = ""
    setup_s: float = 0.0  # export / compile / first call
    probe_s: float = 0.0  # the probe batch through the sampler, steady state (best of the repeats)
    study_s_estimate: float = 0.0  # probe_s scaled to STACKS_PER_STUDY stacks
    max_abs_tmax_s: float = 0.0  # against fp32 eager, inside the brain
    within_tolerance: bool = False


@dataclass
class RuntimeChoice:
    """The path in use and why; written to the cache, the log, result.json and the system page."""

    path: str
    how: str  # "measured" | "cached" | "forced"
    device: str
    capability: str
    native_bf16: bool
    cpu: str
    threads: int
    torch: str
    host: str = field(default_factory=socket.gethostname)
    tolerance_s: float = TOLERANCE_S
    probe_stacks: int = 0
    steps: int = 0
    model_id: str = ""
    measured_at: str = ""
    trials: list[PathTrial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    speedup_vs_fp32: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeChoice:
        d = dict(d)
        d["trials"] = [PathTrial(**t) for t in d.get("trials", [])]
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """The short form for result.json versions."""
        return {"path": self.path, "how": self.how, "capability": self.capability, "native_bf16": self.native_bf16,
                "speedup_vs_fp32": self.speedup_vs_fp32, "tolerance_s": self.tolerance_s}


def runtime_versions() -> dict[str, str]:
    """Versions for the cache key, read from package metadata: a cached choice must not import
    OpenVINO and ONNX Runtime (seconds of start-up) just to learn their versions."""
    from importlib import metadata

    out = {"torch": torch.__version__}
    for dist in ("onnxruntime", "openvino"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cache_key(device: torch.device, features: CpuFeatures, model_id: str, threads: int, steps: int,
              paths: list[str]) -> str:
    """Everything that changes which path is fastest; a change means measuring again."""
    parts = {"device": str(device), "features": asdict(features), "model": model_id, "threads": threads,
             "steps": steps, "candidates": sorted(paths), "versions": runtime_versions(), "tolerance": TOLERANCE_S,
             "probe": PROBE_BATCH}
    if device.type == "cuda":
        parts["gpu"] = torch.cuda.get_device_name(device)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


SampleFn = Callable[[Denoise], torch.Tensor]


def round_robin_best(keys: Sequence[str], time_once: Callable[[str], float], rounds: int) -> dict[str, float]:
    """The best (lowest) of ``rounds`` timings of each key, taken round-robin, so that a burst of load
    from another process lands on every key rather than on one (measured one block after the other, a
    second training run starting beside one once made bf16 look slower than fp32, 2.83 against 2.78 s,
    where it was 1.71 against 2.14 s). ``time_once`` returns inf for a key it cannot time."""
    best = {k: float("inf") for k in keys}
    for _ in range(max(1, rounds)):
        for k in keys:
            best[k] = min(best[k], time_once(k))
    return best


def measure_paths(paths: list[str], make: Callable[[str], Denoise], sample: SampleFn, brain: torch.Tensor,
                  rounds: int = 2) -> tuple[list[PathTrial], dict[str, Denoise]]:
    """Time each path's sampler run on the probe and compare its Tmax (s) with fp32 eager's.

    ``sample(denoise)`` returns Tmax in seconds for the probe; ``brain`` masks the pixels compared.
    fp32 is always first: it is the reference. Each path is built and run once (setup: export,
    compile, oneDNN primitive creation), then timed in ``rounds`` round-robin rounds and its best
    kept, so that a burst of load from another process lands on every path rather than on one.
    Returns the trials and the callables that ran.
    """
    order = ["fp32"] + [p for p in paths if p != "fp32"]
    trials: dict[str, PathTrial] = {}
    built: dict[str, Denoise] = {}
    ref: torch.Tensor | None = None

    def fail(tr: PathTrial, exc: Exception) -> None:
        tr.ok = False
        tr.error = f"{type(exc).__name__}: {exc}"[:300]
        built.pop(tr.path, None)
        log.warning("runtime path %s failed: %s", tr.path, tr.error)
        if tr.path == "fp32":
            raise exc

    for p in order:
        tr = trials[p] = PathTrial(path=p, ok=False, probe_s=float("inf"))
        try:
            t0 = time.perf_counter()
            fn = make(p)
            out = sample(fn)
            tr.setup_s = time.perf_counter() - t0
            if ref is None:
                ref = out
            diff = (out - ref).abs()[brain] if brain.any() else (out - ref).abs().flatten()
            tr.max_abs_tmax_s = float(diff.max()) if diff.numel() else 0.0
            if not np.isfinite(tr.max_abs_tmax_s):
                raise FloatingPointError("non-finite Tmax")
            tr.within_tolerance = tr.max_abs_tmax_s <= TOLERANCE_S
            tr.ok = True
            built[p] = fn
        except Exception as exc:  # noqa: BLE001 - a path that fails is not chosen; the reason is kept
            fail(tr, exc)
    def time_once(p: str) -> float:
        tr = trials[p]
        if not tr.ok:
            return float("inf")
        try:
            t1 = time.perf_counter()
            sample(built[p])
            return time.perf_counter() - t1
        except Exception as exc:  # noqa: BLE001
            fail(tr, exc)
            return float("inf")

    for p, best in round_robin_best(order, time_once, rounds).items():
        trials[p].probe_s = best
    out_trials = list(trials.values())
    for tr in out_trials:
        if not np.isfinite(tr.probe_s):
            tr.probe_s = 0.0
    return out_trials, built


def pick(trials: list[PathTrial], probe_stacks: int) -> tuple[str, float | None]:
    """The fastest path within tolerance, setup amortised over AMORTISE_STUDIES studies; (path, speed-up vs fp32)."""
    scale = STACKS_PER_STUDY / max(1, probe_stacks)
    for tr in trials:
        tr.study_s_estimate = tr.probe_s * scale if tr.ok else 0.0

    def cost(tr: PathTrial) -> float:
        return tr.study_s_estimate + max(0.0, tr.setup_s - tr.probe_s) / AMORTISE_STUDIES

    good = [tr for tr in trials if tr.ok and tr.within_tolerance]
    best = min(good, key=cost)
    fp32 = next(tr for tr in trials if tr.path == "fp32")
    speed = fp32.probe_s / best.probe_s if best.probe_s > 0 else None
    return best.path, (round(speed, 3) if speed else None)


def choose(
    net: torch.nn.Module,
    device: torch.device,
    *,
    in_channels: int,
    grid: int,
    sample: SampleFn,
    brain: torch.Tensor,
    probe_stacks: int,
    steps: int,
    model_id: str,
    cache_dir: Path | None,
    force: str = "auto",
    allow_bf16: bool = True,
    try_compile: bool = False,
    features: CpuFeatures | None = None,
) -> tuple[RuntimeChoice, Denoise]:
    """The path to run ``net`` with here, and its callable.

    ``force`` = a path name skips the measurement (the operator knows best; an emulated bf16 is
    logged as a warning, not refused). ``auto`` reads the per-machine cache or measures.
    """
    features = features or CpuFeatures.detect()
    threads = torch.get_num_threads()
    base = dict(device=str(device), capability=features.capability, native_bf16=features.native_bf16,
                cpu=features.name, threads=threads, torch=torch.__version__, probe_stacks=probe_stacks, steps=steps,
                model_id=model_id)

    def make(p: str) -> Denoise:
        return build_path(p, net, device, in_channels=in_channels, grid=grid, cache_dir=cache_dir, model_id=model_id)

    if force != "auto":
        valid = CUDA_PATHS if device.type == "cuda" else PATHS
        if force not in valid:
            raise ValueError(f"inference path: unknown {force!r} for {device.type}; choose 'auto' or one of {valid}")
        if force == "bf16" and device.type == "cpu" and not features.native_bf16:
            log.warning("inference path bf16 forced on a CPU without native bf16 (%s): expect it to be far slower "
                        "than fp32", features.capability)
        choice = RuntimeChoice(path=force, how="forced", **base)
        log.info("inference path %s (forced by setting)", force)
        return choice, make(force)

    paths, skipped = candidate_paths(device, features, try_compile)
    if not allow_bf16 and "bf16" in paths:
        paths.remove("bf16")
        skipped["bf16"] = "bf16 disabled by the model's sampling config"
    key = cache_key(device, features, model_id, threads, steps, paths)
    cache_file = cache_dir / f"runtime-{key}.json" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            choice = RuntimeChoice.from_dict(json.loads(cache_file.read_text()))
            choice.how = "cached"
            fn = make(choice.path)
            log.info("inference path %s (cached measurement from %s, %s)", choice.path, choice.measured_at, cache_file)
            return choice, fn
        except Exception as exc:  # noqa: BLE001 - a stale or broken cache entry is measured again
            log.warning("runtime cache %s unusable (%s); measuring again", cache_file, exc)

    trials, built = measure_paths(paths, make, sample, brain)
    path, speed = pick(trials, probe_stacks)
    choice = RuntimeChoice(path=path, how="measured", measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
                           trials=trials, skipped=skipped, speedup_vs_fp32=speed, **base)
    log.info("inference path %s chosen: %s", path, ", ".join(
        f"{t.path} {t.probe_s:.2f}s max|dTmax| {t.max_abs_tmax_s:.3f}s" if t.ok else f"{t.path} failed" for t in trials))
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(choice.to_dict(), indent=2))
            os.replace(tmp, cache_file)
        except OSError as exc:
            log.warning("runtime cache not written (%s): the next process measures again", exc)
    return choice, built[path]


# --------------------------------------------------------------------------------------------------
# training


def choose_training_precision(
    device: torch.device,
    allow_bf16: bool,
    time_step: Callable[[torch.dtype | None], float],
    features: CpuFeatures | None = None,
    repeats: int = 3,
) -> tuple[torch.dtype | None, dict[str, Any]]:
    """Autocast dtype for training here: bf16 on CUDA; on a CPU bf16 only where native *and* measured faster.

    ``time_step(dtype)`` runs one forward+backward pass under that autocast dtype (None = fp32) and
    returns its seconds. Never emulated bf16: on an AVX2-only CPU it would make training days long.
    """
    if device.type == "cuda":
        return torch.bfloat16, {"precision": "bf16", "why": "CUDA"}
    features = features or CpuFeatures.detect()
    if not allow_bf16:
        return None, {"precision": "fp32", "why": "bf16_cpu is off in the config"}
    if not features.native_bf16:
        return None, {"precision": "fp32", "why": f"no native bf16 on this CPU (capability {features.capability})"}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    for dtype in dtypes.values():
        time_step(dtype)  # warm-up: oneDNN primitives, allocator
    times = round_robin_best(list(dtypes), lambda name: time_step(dtypes[name]), repeats)
    best = min(times, key=times.get)
    return (torch.bfloat16 if best == "bf16" else None), {
        "precision": best, "why": "measured", "step_s": {k: round(v, 4) for k, v in times.items()},
        "capability": features.capability}
