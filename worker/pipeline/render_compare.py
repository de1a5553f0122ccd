"""The side-by-side page: synthetic Tmax beside the DSC-derived (real) Tmax of the same study.

A stroke team that has both maps wants to see at once whether they tell the same story: the two
Tmax maps on the same key slices with the same colour scale and outlines, and a table of the two
sets of volumes and DEFUSE-3/EXTEND calls with the overlap (Dice) of their Tmax>6 s regions. Drawn
with worker.pipeline.render's tiles, fonts and colour bar so both pages read alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from worker.pipeline import render
from worker.pipeline.render import SliceLayers, font


def comparison_rows(synthetic: Mapping[str, object], real: Mapping[str, object],
                    dice_t6: float | None) -> list[tuple[str, str, str]]:
    """(label, synthetic value, DSC value) lines of the comparison table."""
    s_rows = {label: value for label, value, _ in render.summary_rows(synthetic)}
    r_rows = {label: value for label, value, _ in render.summary_rows(real)}
    keep = ("Core  (ADC < 620 x10^-6 mm2/s)", "Tmax > 6 s  (hypoperfusion)", "Tmax > 10 s  (severe)",
            "Mismatch volume", "Mismatch ratio", "DEFUSE-3 target mismatch", "EXTEND mismatch")
    short = {"DEFUSE-3 target mismatch": "DEFUSE-3 profile", "EXTEND mismatch": "EXTEND profile"}
    rows = [(short.get(label, label.split("  (")[0]), s_rows[label], r_rows[label]) for label in keep]
    agree = "n/a"
    if synthetic.get("defuse3") is not None and real.get("defuse3") is not None:
        agree = "agree" if bool(synthetic["defuse3"]) == bool(real["defuse3"]) else "DISAGREE"
    rows.append(("DEFUSE-3 calls", agree, ""))
    rows.append(("Dice Tmax > 6 s", "n/a" if dice_t6 is None else f"{dice_t6:.2f}", ""))
    return rows


def render_comparison(synthetic: Mapping[str, object], real: Mapping[str, object],
                      tiles: Sequence[tuple[SliceLayers, SliceLayers, str]], dice_t6: float | None,
                      box: tuple[int, int, int, int] | None, footer: str) -> np.ndarray:
    """The comparison page (uint8 RGB, 1024 x 768): table on the left, up to two key slices on the
    right, each as synthetic | DSC-derived."""
    width, height, banner = 1024, 768, 40
    img = Image.new("RGB", (width, height), (12, 12, 16))
    draw = ImageDraw.Draw(img)
    render.draw_banner(draw, width, banner, 20)
    draw.text((24, banner + 12), "Tmax: synthetic vs DSC-derived", font=font(24, bold=True), fill=(255, 255, 255))
    draw.text((24, banner + 44), "Synthetic: DDPM from DWI + FLAIR (no contrast).", font=font(13), fill=(190, 190, 190))
    draw.text((24, banner + 62), "DSC-derived: oSVD deconvolution, research use.", font=font(13), fill=(190, 190, 190))
    y = banner + 100
    head = font(15, bold=True)
    draw.text((220, y), "synthetic", font=head, fill=(255, 255, 255))
    draw.text((340, y), "DSC", font=head, fill=(255, 255, 255))
    y += 30
    label_f, value_f = font(15), font(16, bold=True)
    for label, s_val, r_val in comparison_rows(synthetic, real, dice_t6):
        draw.line([24, y - 6, 440, y - 6], fill=(60, 60, 70))
        draw.text((24, y), label, font=label_f, fill=(225, 225, 225))
        colour = (255, 120, 80) if s_val == "DISAGREE" else (255, 255, 255)
        draw.text((220, y - 1), s_val, font=value_f, fill=colour)
        draw.text((340, y - 1), r_val, font=value_f, fill=(255, 255, 255))
        y += 32
    draw.line([24, y - 6, 440, y - 6], fill=(60, 60, 70))
    draw.text((24, y + 4), "Both maps use the same thresholds and rules", font=font(13), fill=(150, 150, 160))
    draw.text((24, y + 23), "(DEFUSE-3: core < 70 mL, ratio >= 1.8, mismatch >= 15 mL).", font=font(13),
              fill=(150, 150, 160))
    tile, gap, x0, y0 = 230, 10, 466, banner + 52
    draw.text((x0 + 4, y0 - 22), "synthetic", font=font(14, bold=True), fill=(255, 255, 255))
    draw.text((x0 + tile + gap + 4, y0 - 22), "DSC-derived", font=font(14, bold=True), fill=(255, 255, 255))
    for i, (synth, dsc, caption) in enumerate(tiles[:2]):
        cy = y0 + i * (tile + 30 + gap)
        img.paste(render.compose_tile(synth, tile, box=box), (x0, cy))
        img.paste(render.compose_tile(dsc, tile, box=box), (x0 + tile + gap, cy))
        draw.text((x0 + 4, cy + tile + 4), caption, font=font(13), fill=(210, 210, 210))
    if not tiles:
        draw.text((x0, y0 + 100), "no hypoperfused slice in either map", font=font(16), fill=(200, 200, 200))
    render.draw_colour_bar(img, x0 + 2 * tile + gap + 14, y0 + 40, 18, 2 * tile - 20)
    draw.rectangle([0, height - 30, width, height], fill=(30, 30, 36))
    draw.text((12, height - 24), footer, font=font(13), fill=(200, 200, 200))
    return np.asarray(img, dtype=np.uint8)
