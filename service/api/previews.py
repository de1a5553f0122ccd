"""Preview images of a job: PNG files the pipeline wrote, and key-slice PNGs rendered on demand
from the arrays it keeps in ``<output_dir>/work`` (volumes.npz, core.npz, tmax.npz).

Rendering here keeps the pipeline free of presentation work and means every job that reached a
stage has its picture, including ones that failed later. Every rendered image carries the words
SYNTHETIC / NOT FOR DIAGNOSTIC USE when it shows the synthetic map.
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# name -> (npz file, array key, what it shows)
RENDERED = {
    "dwi.png": ("volumes.npz", "dwi", "DWI (high b)"),
    "flair.png": ("volumes.npz", "flair", "FLAIR on the DWI grid"),
    "core.png": ("core.npz", "core", "Infarct core on DWI"),
    "tmax.png": ("tmax.npz", "mean", "Synthetic Tmax (s)"),
    "tmax_sd.png": ("tmax.npz", "sd", "Tmax uncertainty (SD, s)"),
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?$")
SIZE = 384


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def title_of(name: str) -> str:
    """Caption of a preview for the page."""
    if name in RENDERED:
        return RENDERED[name][2]
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")
TMAX_RANGE_S = (0.0, 12.0)
SD_RANGE_S = (0.0, 3.0)

_cache: OrderedDict[tuple[str, float, str], bytes] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_MAX = 64


def _npz_keys(path: Path) -> set[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return set(z.files)
    except (OSError, ValueError):
        return set()


_ORDER = ("dwi", "adc", "flair", "core", "tmax", "summary", "overlay")


def _rank(name: str) -> tuple[float, str]:
    """DWI, ADC, FLAIR, core, Tmax, its uncertainty, then the rest (by name)."""
    low = name.lower().rsplit("/", 1)[-1]
    if any(k in low for k in ("_sd", "uncert", "spread")):
        return _ORDER.index("tmax") + 0.5, low
    for i, key in enumerate(_ORDER):
        if key in low:
            return float(i), low
    return float(len(_ORDER)), low


def list_previews(job_dir: Path | None) -> list[str]:
    """PNG files in the job dir (and one level below), then the renderable key slices."""
    if job_dir is None or not job_dir.is_dir():
        return []
    names: list[str] = []
    for pattern in ("*.png", "*/*.png"):
        for p in sorted(job_dir.glob(pattern)):
            rel = p.relative_to(job_dir).as_posix()
            if p.is_file() and not p.is_symlink() and _SAFE_NAME.match(rel) and not rel.startswith("work/"):
                names.append(rel)
    work = job_dir / "work"
    keys_by_file: dict[str, set[str]] = {}
    for name, (fname, key, _title) in RENDERED.items():
        if name in names:
            continue
        if fname not in keys_by_file:
            keys_by_file[fname] = _npz_keys(work / fname) if (work / fname).is_file() else set()
        if key in keys_by_file[fname] and (name != "core.png" or "dwi" in keys_by_file.get("volumes.npz", set())):
            names.append(name)
    return sorted(names, key=_rank)


def _load(work: Path, fname: str, key: str) -> np.ndarray:
    with np.load(work / fname, allow_pickle=False) as z:
        return np.asarray(z[key])


def _key_slice(work: Path, depth: int) -> int:
    """The slice with the most core, else the most Tmax > 6 s, else the middle one."""
    for fname, key, test in (("core.npz", "core", lambda a: a > 0), ("tmax.npz", "mean", lambda a: a > 6.0)):
        if (work / fname).is_file() and key in _npz_keys(work / fname):
            vol = _load(work, fname, key)
            if vol.ndim == 3 and vol.shape[0] == depth:
                counts = test(vol).reshape(depth, -1).sum(axis=1)
                if counts.max() > 0:
                    return int(np.argmax(counts))
    return depth // 2


def _grey(img: np.ndarray) -> np.ndarray:
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, (1, 99.5)) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1.0
    g = np.clip((np.nan_to_num(img, nan=lo) - lo) / (hi - lo), 0, 1)
    return (g * 255).astype(np.uint8)


def _colour(img: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    from matplotlib import colormaps

    norm = np.clip((np.nan_to_num(img, nan=vmin) - vmin) / (vmax - vmin), 0, 1)
    return (colormaps["turbo"](norm)[..., :3] * 255).astype(np.uint8)


def _finish(rgb: np.ndarray, title: str, synthetic: bool, scale: tuple[float, float] | None) -> bytes:
    im = Image.fromarray(rgb).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    top, bar_h = 30, (44 if scale else 0)
    canvas = Image.new("RGB", (SIZE, SIZE + top + bar_h), (0, 0, 0))
    canvas.paste(im, (0, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(240, 240, 240), font=_font(17))
    if synthetic:
        draw.text((8, top + 6), "SYNTHETIC - NOT FOR DIAGNOSTIC USE", fill=(255, 210, 120), font=_font(15))
    if scale:
        ramp = _colour(np.tile(np.linspace(scale[0], scale[1], SIZE - 60)[None, :], (12, 1)), *scale)
        canvas.paste(Image.fromarray(ramp), (30, SIZE + top + 6))
        draw.text((30, SIZE + top + 20), f"{scale[0]:g} s", fill=(220, 220, 220), font=_font(15))
        draw.text((SIZE - 70, SIZE + top + 20), f"{scale[1]:g} s", fill=(220, 220, 220), font=_font(15))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def render(job_dir: Path, name: str) -> bytes | None:
    """PNG bytes of a rendered preview, or None when its arrays are not there."""
    if name not in RENDERED:
        return None
    work = job_dir / "work"
    fname, key, title = RENDERED[name]
    path = work / fname
    if not path.is_file():
        return None
    stamp = path.stat().st_mtime
    ck = (str(path), stamp, name)
    with _cache_lock:
        if ck in _cache:
            _cache.move_to_end(ck)
            return _cache[ck]
    try:
        vol = _load(work, fname, key)
        if vol.ndim != 3:
            return None
        z = _key_slice(work, vol.shape[0])
        title = f"slice {z + 1} of {vol.shape[0]}"
        if name in ("dwi.png", "flair.png"):
            g = _grey(vol[z].astype(np.float32))
            png = _finish(np.stack([g] * 3, axis=-1), title, False, None)
        elif name == "core.png":
            dwi = _load(work, "volumes.npz", "dwi")
            g = _grey(dwi[z].astype(np.float32))
            rgb = np.stack([g] * 3, axis=-1)
            mask = vol[z] > 0
            rgb[mask] = (0.45 * rgb[mask] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
            png = _finish(rgb, title, False, None)
        else:
            rng = TMAX_RANGE_S if name == "tmax.png" else SD_RANGE_S
            png = _finish(_colour(vol[z].astype(np.float32), *rng), title, True, rng)
    except (OSError, ValueError, KeyError, IndexError):
        return None
    with _cache_lock:
        _cache[ck] = png
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
    return png
