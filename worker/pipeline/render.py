"""RGB pictures for Secondary Capture: Tmax colour overlays on DWI and the one-page summary.

Stroke teams read these on a PACS workstation that may show nothing but pixels, so everything a
reader needs is burned in: the warning that the map is synthetic, a colour bar in seconds, the
volumes and the mismatch profile. Rendering is plain numpy + Pillow (no matplotlib figure per
slice) so that a 25-slice study renders in well under a second.

Arrays are (z, y, x) on the DWI grid; a slice is drawn as stored (row 0 at the top), which with
the usual axial orientation is the radiological convention (patient right on the image left).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WARNING_TEXT = "SYNTHETIC PERFUSION - NOT FOR DIAGNOSTIC USE"
TMAX_DISPLAY_MAX_S = 16.0  # colour bar spans 0..16 s; larger values saturate
TMAX_OVERLAY_MIN_S = 2.0  # below this the DWI shows through untinted (normal perfusion)

CORE_RGB = (255, 64, 255)  # magenta outline: ADC < 620e-6 mm2/s core
TMAX6_RGB = (255, 255, 255)  # white outline: Tmax > 6 s (visible on every colour of the map)
BANNER_RGB = (170, 0, 0)


def _font_path(bold: bool) -> str:
    import matplotlib  # only for its bundled DejaVu fonts: the same glyphs on every machine

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name)


@lru_cache(maxsize=32)
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_path(bold), size)


@lru_cache(maxsize=1)
def tmax_lut() -> np.ndarray:
    """256x3 uint8 colour table for 0..TMAX_DISPLAY_MAX_S seconds (perceptually ordered 'turbo')."""
    from matplotlib import colormaps

    cmap = colormaps["turbo"]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def _window(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Grey levels 0..255: black at 0, white at the 99.5th percentile of brain (or non-zero) voxels."""
    ref = image[mask] if mask is not None and mask.any() else image[image > 0]
    if ref.size == 0:
        ref = image.ravel()
    # DWI background is near zero: anchor black at 0 so brain texture keeps its contrast.
    lo = min(0.0, float(ref.min())) if ref.size else 0.0
    hi = float(np.percentile(ref, 99.5)) if ref.size else 1.0
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _edges(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner outline of a 2D mask."""
    m = mask.astype(bool)
    if not m.any():
        return m
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


@dataclass(frozen=True)
class SliceLayers:
    """What one overlay tile shows; grey is uint8, the rest float seconds / bool."""

    grey: np.ndarray
    tmax: np.ndarray
    brain: np.ndarray
    core: np.ndarray
    tmax6: np.ndarray


def crop_box(brain: np.ndarray, margin: float = 0.08) -> tuple[int, int, int, int]:
    """Square (r0, r1, c0, c1) around the brain of the whole volume, so every slice shares one zoom."""
    rows, cols = brain.shape[-2:]
    if not brain.any():
        return 0, rows, 0, cols
    proj = brain.reshape(-1, rows, cols).any(axis=0)
    r = np.nonzero(proj.any(axis=1))[0]
    c = np.nonzero(proj.any(axis=0))[0]
    side = max(r[-1] - r[0] + 1, c[-1] - c[0] + 1)
    side = int(min(max(rows, cols), round(side * (1 + 2 * margin))))
    rc, cc = (r[0] + r[-1] + 1) / 2, (c[0] + c[-1] + 1) / 2
    r0 = int(round(rc - side / 2))
    c0 = int(round(cc - side / 2))
    return r0, r0 + side, c0, c0 + side


def _crop(a: np.ndarray, box: tuple[int, int, int, int] | None, fill: float = 0) -> np.ndarray:
    """Crop with padding where the box leaves the image."""
    if box is None:
        return a
    r0, r1, c0, c1 = box
    out = np.full((r1 - r0, c1 - c0) + a.shape[2:], fill, dtype=a.dtype)
    rs, re = max(r0, 0), min(r1, a.shape[0])
    cs, ce = max(c0, 0), min(c1, a.shape[1])
    if rs < re and cs < ce:
        out[rs - r0:re - r0, cs - c0:ce - c0] = a[rs:re, cs:ce]
    return out


def compose_tile(layers: SliceLayers, size: int, alpha: float = 0.6, outlines: bool = True,
                 box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """DWI in grey with Tmax colour where Tmax >= 2 s inside the brain, core and Tmax>6 s outlined.

    Cropped to ``box`` (see :func:`crop_box`) and scaled by nearest neighbour to ``size`` pixels, so
    voxels stay honest and outlines stay sharp.
    """
    grey = _crop(layers.grey, box).astype(np.float32)
    tmax = _crop(layers.tmax, box)
    brain = _crop(layers.brain, box, False)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    idx = np.clip(tmax / TMAX_DISPLAY_MAX_S * 255.0, 0, 255).astype(np.uint8)
    colour = tmax_lut()[idx].astype(np.float32)
    tint = brain & (tmax >= TMAX_OVERLAY_MIN_S)
    rgb[tint] = (1 - alpha) * rgb[tint] + alpha * colour[tint]
    small = rgb.clip(0, 255).astype(np.uint8)
    rows, cols = small.shape[:2]
    scale = size / max(rows, cols)
    out_r, out_c = max(1, round(rows * scale)), max(1, round(cols * scale))
    ri = np.minimum((np.arange(out_r) / scale).astype(int), rows - 1)
    ci = np.minimum((np.arange(out_c) / scale).astype(int), cols - 1)
    out = small[ri][:, ci].copy()
    if outlines:
        for mask, colour_rgb in ((layers.tmax6, TMAX6_RGB), (layers.core, CORE_RGB)):
            big = _crop(mask.astype(bool), box, False)[ri][:, ci]
            edge = _edges(big)
            if scale >= 3:  # thicken to two pixels so it survives PACS downscaling
                edge = edge | np.roll(edge, 1, axis=0) | np.roll(edge, 1, axis=1)
                edge &= big
            out[edge] = colour_rgb
    img = Image.fromarray(out, "RGB")
    if img.size != (size, size):
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        img = canvas
    return img


def _text_width(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return int(right - left)


def draw_banner(draw: ImageDraw.ImageDraw, width: int, height: int, size: int) -> None:
    draw.rectangle([0, 0, width, height], fill=BANNER_RGB)
    fnt = font(size, bold=True)
    w = _text_width(draw, WARNING_TEXT, fnt)
    draw.text(((width - w) // 2, (height - size) // 2 - 1), WARNING_TEXT, font=fnt, fill=(255, 255, 255))


def draw_colour_bar(img: Image.Image, x: int, y: int, w: int, h: int, label_size: int = 13) -> None:
    """Vertical bar, 0 s at the bottom, ticks every 2 s, thresholds 6 s and 10 s marked."""
    lut = tmax_lut()
    ramp = lut[np.linspace(255, 0, h).astype(int)]
    bar = np.repeat(ramp[:, None, :], w, axis=1)
    img.paste(Image.fromarray(bar, "RGB"), (x, y))
    draw = ImageDraw.Draw(img)
    draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(200, 200, 200))
    fnt = font(label_size)
    bold = font(label_size, bold=True)
    for s in range(0, int(TMAX_DISPLAY_MAX_S) + 1, 2):
        ty = y + h - 1 - round(s / TMAX_DISPLAY_MAX_S * (h - 1))
        emph = s in (6, 10)
        draw.line([x + w, ty, x + w + (8 if emph else 4), ty], fill=(255, 255, 255), width=2 if emph else 1)
        text = f"{s}" + ("+" if s == int(TMAX_DISPLAY_MAX_S) else "")
        draw.text((x + w + 10, ty - label_size // 2 - 1), text, font=bold if emph else fnt,
                  fill=(255, 255, 255) if emph else (210, 210, 210))
    title = "Tmax (s)"
    tw = _text_width(draw, title, bold)
    draw.text((x + w // 2 - tw // 2 + 6, y - label_size - 10), title, font=bold, fill=(255, 255, 255))


def orientation_labels(row_dir: Sequence[float], col_dir: Sequence[float]) -> tuple[str, str, str, str]:
    """(left, right, top, bottom) patient-direction letters for an image with these LPS cosines."""

    def letter(vec: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(vec)))
        positive = vec[axis] > 0
        return (("L", "R"), ("P", "A"), ("S", "I"))[axis][0 if positive else 1]

    right = letter(row_dir)  # columns increase toward this side
    bottom = letter(col_dir)
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    return opposite[right], right, opposite[bottom], bottom


def render_overlay_slice(
    layers: SliceLayers,
    slice_index: int,
    n_slices: int,
    position_mm: float,
    labels: tuple[str, str, str, str],
    title: str = "Synthetic Tmax on DWI",
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """One Secondary Capture frame (uint8 RGB, 576 x 512)."""
    width, height, banner, tile = 576, 512 + 64, 30, 448
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw_banner(draw, width, banner, 15)
    top = banner + 30
    img.paste(compose_tile(layers, tile, box=box), (8, top))
    small = font(14, bold=True)
    left, right, up, down = labels
    draw.text((12, top + tile // 2 - 8), left, font=small, fill=(255, 255, 0))
    draw.text((8 + tile - 16, top + tile // 2 - 8), right, font=small, fill=(255, 255, 0))
    draw.text((8 + tile // 2 - 4, top + 2), up, font=small, fill=(255, 255, 0))
    draw.text((8 + tile // 2 - 4, top + tile - 20), down, font=small, fill=(255, 255, 0))
    draw.text((10, banner + 6), title, font=font(15, bold=True), fill=(255, 255, 255))
    info = f"slice {slice_index + 1}/{n_slices}   {position_mm:+.1f} mm"
    draw.text((width - 10 - _text_width(draw, info, font(13)), banner + 8), info, font=font(13),
              fill=(210, 210, 210))
    draw_colour_bar(img, 8 + tile + 22, top + 30, 22, tile - 60)
    legend_y = top + tile + 8
    draw.rectangle([12, legend_y + 3, 26, legend_y + 15], outline=CORE_RGB, width=2)
    draw.text((32, legend_y), "core (ADC<620)", font=font(13), fill=(230, 230, 230))
    draw.rectangle([172, legend_y + 3, 186, legend_y + 15], outline=TMAX6_RGB, width=2)
    draw.text((192, legend_y), "Tmax>6 s", font=font(13), fill=(230, 230, 230))
    draw.text((300, legend_y), "colour: Tmax >= 2 s", font=font(13), fill=(160, 160, 160))
    return np.asarray(img, dtype=np.uint8)


def _fmt_ml(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f} mL" if v >= 10 else f"{v:.1f} mL"


def _fmt_ratio(v: float | None) -> str:
    if v is None:
        return "n/a"
    if not np.isfinite(v):
        return "inf (no core)"
    return f"{v:.1f}"


def summary_rows(measures: Mapping[str, object]) -> list[tuple[str, str, bool]]:
    """(label, value, highlighted) lines of the summary table, in the order stroke reports use."""

    def f(key: str) -> float | None:
        v = measures.get(key)
        return None if v is None else float(v)  # type: ignore[arg-type]

    conf = measures.get("confidence") if isinstance(measures.get("confidence"), Mapping) else None
    low = bool(conf and conf.get("low"))

    def flag(key: str) -> str:
        v = measures.get(key)
        if low and key in ("defuse3", "extend"):
            return "withheld"  # issue 15: no trial call from a low-confidence map
        return "n/a" if v is None else ("YES" if bool(v) else "no")

    hir = f("hir")
    conf_rows = [] if conf is None else [
        ("Confidence" + ("  - LOW, no trial call" if low else ""), f"{float(conf.get('score', 0.0)):.2f}", False)]
    return conf_rows + [
        ("Core  (ADC < 620 x10^-6 mm2/s)", _fmt_ml(f("core_ml")), False),
        ("Tmax > 6 s  (hypoperfusion)", _fmt_ml(f("tmax6_ml")), False),
        ("Tmax > 10 s  (severe)", _fmt_ml(f("tmax10_ml")), False),
        ("Mismatch volume", _fmt_ml(f("mismatch_ml")), False),
        ("Mismatch ratio", _fmt_ratio(f("mismatch_ratio")) if measures.get("mismatch_ratio") is not None
         else ("no core" if (f("tmax6_ml") or 0) > 0 else "n/a"), False),
        ("Hypoperfusion intensity ratio", "n/a" if hir is None else f"{hir:.2f}", False),
        ("DEFUSE-3 target mismatch", flag("defuse3"), bool(measures.get("defuse3"))),
        ("EXTEND mismatch", flag("extend"), bool(measures.get("extend"))),
        ("DWI-FLAIR mismatch (indicator)", flag("dwi_flair_mismatch"), False),
    ]


def render_summary(
    measures: Mapping[str, object],
    key_tiles: Sequence[tuple[SliceLayers, str]],
    header_lines: Sequence[str],
    footer: str,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """The summary page (uint8 RGB, 1024 x 768): table on the left, four key slices on the right."""
    width, height, banner = 1024, 768, 40
    img = Image.new("RGB", (width, height), (12, 12, 16))
    draw = ImageDraw.Draw(img)
    draw_banner(draw, width, banner, 20)
    draw.text((24, banner + 14), "Synthetic Tmax perfusion - summary", font=font(24, bold=True),
              fill=(255, 255, 255))
    y = banner + 50
    for line in header_lines:
        draw.text((24, y), line, font=font(14), fill=(190, 190, 190))
        y += 20
    conf = measures.get("confidence")
    if isinstance(conf, Mapping) and conf.get("low"):  # issue 15: say it before any number
        draw.text((24, y + 2), "LOW CONFIDENCE - maps shown, no DEFUSE-3/EXTEND call", font=font(15, bold=True),
                  fill=(255, 150, 40))
        y += 22
    y += 14
    label_f, value_f = font(17), font(19, bold=True)
    for label, value, hot in summary_rows(measures):
        draw.line([24, y - 6, 440, y - 6], fill=(60, 60, 70))
        draw.text((24, y), label, font=label_f, fill=(225, 225, 225))
        colour = (90, 255, 90) if hot else (255, 255, 255)
        draw.text((440 - _text_width(draw, value, value_f), y - 1), value, font=value_f, fill=colour)
        y += 36
    draw.line([24, y - 6, 440, y - 6], fill=(60, 60, 70))
    y += 6
    criteria = [
        "DEFUSE-3: core < 70 mL, ratio >= 1.8, mismatch >= 15 mL",
        "EXTEND: core < 70 mL, ratio > 1.2, mismatch > 10 mL",
        "Mismatch = Tmax>6 s minus core; HIR = Tmax>10 s / Tmax>6 s",
    ]
    for line in criteria:
        draw.text((24, y), line, font=font(13), fill=(150, 150, 160))
        y += 19
    side = measures.get("side")
    if side:
        draw.text((24, y + 6), f"Affected side (core): {side}", font=font(15), fill=(225, 225, 225))
    # key slices, 2 x 2
    tile, gap, x0, y0 = 230, 10, 466, banner + 52
    for i, (layers, caption) in enumerate(key_tiles[:4]):
        cx = x0 + (i % 2) * (tile + gap)
        cy = y0 + (i // 2) * (tile + 30 + gap)
        img.paste(compose_tile(layers, tile, box=box), (cx, cy))
        draw.text((cx + 4, cy + tile + 4), caption, font=font(13), fill=(210, 210, 210))
    if not key_tiles:
        draw.text((x0, y0 + 100), "no hypoperfused slice", font=font(16), fill=(200, 200, 200))
    draw_colour_bar(img, x0 + 2 * tile + gap + 14, y0 + 40, 18, 2 * tile - 20)
    ly = y0 + 2 * (tile + 30) + gap + 4
    draw.rectangle([x0, ly + 3, x0 + 14, ly + 15], outline=CORE_RGB, width=2)
    draw.text((x0 + 20, ly), "core", font=font(13), fill=(230, 230, 230))
    draw.rectangle([x0 + 80, ly + 3, x0 + 94, ly + 15], outline=TMAX6_RGB, width=2)
    draw.text((x0 + 100, ly), "Tmax > 6 s", font=font(13), fill=(230, 230, 230))
    draw.rectangle([0, height - 30, width, height], fill=(30, 30, 36))
    draw.text((12, height - 24), footer, font=font(13), fill=(200, 200, 200))
    return np.asarray(img, dtype=np.uint8)
