"""Model registry: resolve a model name or a directory to a verified weights directory.

Names map to folders under models/weights/. A path may also be given: an exported weights folder
(model.safetensors + config.json + model.safetensors.sha256) or a training run folder (its
``export/`` subfolder holds the latest EMA weights).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "demo"

#: name -> folder (relative to models/weights) and a one-line description
MODELS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "2.5D DDPM trained on the synthperf stroke phantom (DWI+FLAIR+core); SYNTHETIC, not for diagnostic use"),
}


def available() -> dict[str, str]:
    return {name: desc for name, (_, desc) in MODELS.items()}


def resolve(name_or_dir: str | Path = DEFAULT_MODEL) -> Path:
    """The weights directory for a registry name, an exported folder, or a training run folder."""
    key = str(name_or_dir)
    if key in MODELS:
        d = WEIGHTS_ROOT / MODELS[key][0]
        if not (d / "model.safetensors").exists():
            raise FileNotFoundError(
                f"model {key!r}: no weights at {d}; train one with `synthperf train DATA --out RUN` "
                f"and export it with `synthperf train DATA --out RUN --export {d}`"
            )
        return d
    p = Path(key).expanduser()
    if (p / "model.safetensors").exists():
        return p
    if (p / "export" / "model.safetensors").exists():
        return p / "export"
    raise FileNotFoundError(
        f"{key!r} is neither a registered model ({', '.join(MODELS)}) nor a folder with model.safetensors "
        "(or a training run folder with export/model.safetensors)"
    )
