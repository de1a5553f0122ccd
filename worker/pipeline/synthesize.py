"""Thin adapter from the pipeline to the Tmax model (models.tmax_ddpm), loaded once per process.

The worker loads the model after fork (Celery ``worker_process_init``) and keeps it for every job
that process runs; the offline ``synthperf process`` command loads it once per call. Missing or
corrupt weights raise :class:`common.errors.ModelError` with what to do — a Tmax map is never
faked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import ModelError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: dict[tuple[str, str], Any] = {}


def get_synthesizer(model_name: str, device: str = "auto") -> Any:
    """The process-wide TmaxSynthesizer for (model, device); loads it on first use."""
    key = (model_name, device)
    with _lock:
        if key in _cache:
            return _cache[key]
        try:
            from models.tmax_ddpm.inference import TmaxSynthesizer

            synth = TmaxSynthesizer.load(model_name, device=device)
        except FileNotFoundError as exc:
            raise ModelError(str(exc)) from exc  # the registry's message names the model and the fix
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - checkpoint/config/device errors all mean: no model
            raise ModelError(
                f"model {model_name!r} could not be loaded ({type(exc).__name__}: {exc}); "
                "check SYNTHPERF_MODEL_NAME and SYNTHPERF_DEVICE, or re-export the weights"
            ) from exc
        _cache[key] = synth
        log.info("model loaded", extra={"model": model_name, "device": str(synth.device)})
        return synth


def model_version(synth: Any) -> str:
    """A short, stable identity of the loaded weights: info version if any, else sha256 prefix."""
    info = getattr(synth, "info", {}) or {}
    for key in ("version", "model_version", "run", "exported_at"):
        if info.get(key):
            base = str(info[key])
            break
    else:
        base = ""
    # the weights' sha256 (every network's, joined by "+", for an ensemble), 12 hex digits each
    sha = "+".join(part[:12] for part in str(getattr(synth, "model_id", "") or "").split("+") if part)
    return " ".join(p for p in (base, f"sha256:{sha}" if sha else "") if p) or "unknown"


def synthesize_tmax(
    synth: Any,
    dwi: np.ndarray,
    flair: np.ndarray,
    core: np.ndarray,
    brain: np.ndarray,
    adc: np.ndarray | None,
    spacing_zyx: tuple[float, float, float],
    steps: int | None,
    samples: int | None,
    seed: int,
    progress: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(mean Tmax s, SD s, detail) on the DWI grid; validates what the model returned."""
    res = synth.synthesize(
        dwi, flair, core, brain, adc=adc, spacing_zyx=spacing_zyx, steps=steps, samples=samples, seed=seed,
        progress=progress,
    )
    mean = np.asarray(res.mean, dtype=np.float32)
    sd = np.asarray(res.sd, dtype=np.float32)
    if mean.shape != np.shape(dwi) or sd.shape != np.shape(dwi):
        raise ModelError(f"model returned Tmax of shape {mean.shape}, expected the DWI grid {np.shape(dwi)}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(sd))):
        raise ModelError("model returned NaN/inf Tmax values; the weights may be corrupt")
    detail = {
        "steps": int(res.steps), "samples": int(res.samples), "seed": int(seed),
        "seconds": round(float(res.seconds), 3), "device": str(getattr(synth, "device", "")),
        "model_source": str(getattr(synth, "source", "")),
    }
    choice = getattr(synth, "runtime", None)
    if choice is not None:  # the measured/cached/forced inference path: shown in result.json and on the system page
        detail["inference"] = choice.summary()
    return mean, sd, detail
