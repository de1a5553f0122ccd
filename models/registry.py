"""Model registry: resolve a model name or a directory to verified weights directories.

Names map to folders under models/weights/. A path may also be given: an exported weights folder
(model.safetensors + config.json + model.safetensors.sha256) or a training run folder (its
``export/`` subfolder holds the latest EMA weights).

A name may stand for several networks (an ensemble): the synthesizer splits its samples among them,
so the cost of a study stays that of one network. Why: two networks trained apart disagree where the
input is unlike what either learned, and their shared map drops the false hypoperfusion that one of
them draws there (docs/benchmarks.md, "The served ensemble"). Paths joined by ``+`` ask for an
ensemble of folders (``models/weights/demo+models/weights/scratch-8000``).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "demo"

#: the separator of an ensemble of folders given by path
MEMBER_SEP = "+"

#: name -> folders (relative to models/weights; the first is the primary: its input reference, its
#: config's sampling defaults) and a one-line description
MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "demo": (("demo", "scratch-8000"),
             "two 2.5D DDPMs trained on the synthperf stroke phantom (DWI+FLAIR+core), samples split between "
             "them; SYNTHETIC, not for diagnostic use"),
}


def available() -> dict[str, str]:
    return {name: desc for name, (_, desc) in MODELS.items()}


def _registered(key: str, folder: str) -> Path:
    d = WEIGHTS_ROOT / folder
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(
            f"model {key!r}: no weights at {d}; train one with `synthperf train DATA --out RUN` "
            f"and export it with `synthperf train DATA --out RUN --export {d}`"
        )
    return d


def resolve_members(name_or_dir: str | Path = DEFAULT_MODEL) -> list[Path]:
    """Every weights directory a registry name, a folder, or ``+``-joined folders stand for; primary first."""
    key = str(name_or_dir)
    if key in MODELS:
        return [_registered(key, folder) for folder in MODELS[key][0]]
    try:
        return [resolve(key)]
    except FileNotFoundError:
        if MEMBER_SEP not in key:
            raise
    parts = [part for part in key.split(MEMBER_SEP) if part]
    if len(parts) < 2:
        raise FileNotFoundError(f"{key!r}: an ensemble needs two or more folders joined by {MEMBER_SEP!r}")
    return [resolve(part) for part in parts]


def resolve(name_or_dir: str | Path = DEFAULT_MODEL) -> Path:
    """The (primary) weights directory for a registry name, an exported folder, or a training run folder."""
    key = str(name_or_dir)
    if key in MODELS:
        return _registered(key, MODELS[key][0][0])
    p = Path(key).expanduser()
    if (p / "model.safetensors").exists():
        return p
    if (p / "export" / "model.safetensors").exists():
        return p / "export"
    raise FileNotFoundError(
        f"{key!r} is neither a registered model ({', '.join(MODELS)}) nor a folder with model.safetensors "
        "(or a training run folder with export/model.safetensors)"
    )
