"""Preview montage: DWI, ADC, FLAIR, Tmax truth and the core outline for a few slices (PIL only).

Kept free of matplotlib so worker processes stay light; the colour map is a small jet-like ramp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage


def _grey(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)


def _tmax_rgb(t: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """0 s blue -> 6 s yellow-green -> 12+ s red; black outside the brain."""
    x = np.clip(t / 14.0, 0, 1)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    rgb = (np.stack([r, g, b], -1) * 255).astype(np.uint8)
    rgb[~brain] = 0
    return rgb


def _outline(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    edge = mask & ~ndimage.binary_erosion(mask)
    out = img.copy()
    out[edge] = colour
    return out


def montage(case, path: str | Path, n_slices: int = 4) -> Path:
    """Write a PNG: rows = slices through the lesion (or the mid-brain), columns = contrasts."""
    z_core = np.nonzero(case.core.any(axis=(1, 2)))[0]
    z_t6 = np.nonzero((case.tmax > 6).any(axis=(1, 2)))[0]
    zs = z_core if len(z_core) else (z_t6 if len(z_t6) else np.array([case.grid.shape[0] // 2]))
    lo, hi = int(zs.min()), int(zs.max())
    mid = case.grid.shape[0] // 2
    if hi - lo < n_slices:
        lo, hi = max(0, min(lo, mid) - 2), min(case.grid.shape[0] - 1, max(hi, mid) + 2)
    picks = np.unique(np.linspace(lo, hi, n_slices).round().astype(int))
    b = case.brain
    dwi_hi = float(np.percentile(case.dwi[b], 99.5)) if b.any() else 1.0
    fl_hi = float(np.percentile(case.flair_on_dwi[b], 99.5)) if b.any() else 1.0
    rows = []
    t6 = case.tmax > 6
    for z in picks:
        dwi = _grey(case.dwi[z], 0, dwi_hi)
        adc = _grey(case.adc[z], 0, 2000)
        fl = _grey(case.flair_on_dwi[z], 0, fl_hi)
        tm = _outline(_tmax_rgb(case.tmax[z], b[z]), t6[z], (255, 255, 255))
        core = _outline(_outline(dwi, t6[z], (0, 200, 255)), case.core[z], (255, 0, 0))
        rows.append(np.concatenate([dwi, adc, fl, tm, core], axis=1))
    # superior slices on top; rows of an (y, x) LPS array already give the radiological view
    img = np.concatenate(rows[::-1], axis=0)
    pil = Image.fromarray(img)
    scale = max(1, 384 // case.grid.shape[2])
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    try:
        font = ImageFont.load_default(size=max(12, pil.width // 110))
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    line = max(14, pil.width // 95)
    header = Image.new("RGB", (pil.width, 2 * line + 8), (0, 0, 0))
    draw = ImageDraw.Draw(header)
    tr = case.truth
    draw.text((6, 3), "DWI b1000 | ADC | FLAIR | Tmax truth (white: >6 s) | core (red), Tmax>6 s (cyan)",
              fill=(255, 255, 255), font=font)
    draw.text((6, 3 + line), f"SYNTHETIC PHANTOM {case.case_id}  {tr['occlusion']} {tr['side']} "
              f"collaterals={tr['collaterals']} onset={tr['onset_h']}h core={tr['core_ml']:.1f}mL "
              f"Tmax>6={tr['tmax6_ml']:.1f}mL  NOT FOR DIAGNOSTIC USE", fill=(255, 220, 0), font=font)
    out = Image.new("RGB", (pil.width, pil.height + header.height))
    out.paste(header, (0, 0))
    out.paste(pil, (0, header.height))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out.save(p, optimize=True)
    return p
