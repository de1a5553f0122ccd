"""The Bland-Altman plot of the shadow page as a small SVG drawn by hand (no plotting library in the
API process): one dot per study at (mean of the two Tmax>6 s volumes, synthetic minus DSC), the bias
and the 95 % limits of agreement as lines, the reference band (+-20.5 mL mean absolute difference
between two commercial packages) shaded around zero."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

W, H, L, R, T, B = 640, 360, 64, 16, 20, 48  # size and margins (px)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / n
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1.0
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = (lo // step + 1) * step
    return [first + i * step for i in range(n + 2) if first + i * step < hi]


def bland_altman_svg(rows: Sequence[Mapping[str, Any]], ba: Mapping[str, Any], band_ml: float) -> str:
    """SVG text; an empty plot that says so when there is no study."""
    xs = [(float(r["synthetic_t6_ml"]) + float(r["real_t6_ml"])) / 2 for r in rows]
    ys = [float(r["synthetic_t6_ml"]) - float(r["real_t6_ml"]) for r in rows]
    lines = [v for v in (ba.get("bias"), ba.get("lower"), ba.get("upper")) if v is not None]
    x_hi = max([*xs, 10.0]) * 1.08
    y_abs = max([abs(v) for v in (*ys, *lines)] + [band_ml * 1.3, 10.0]) * 1.1
    px = lambda x: L + (W - L - R) * x / x_hi  # noqa: E731
    py = lambda y: T + (H - T - B) * (y_abs - y) / (2 * y_abs)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           'role="img" aria-label="Bland-Altman plot of the Tmax over 6 s volume" font-family="sans-serif" '
           'font-size="12">',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="#11161c"/>',
           f'<rect x="{L}" y="{py(band_ml):.1f}" width="{W - L - R}" height="{py(-band_ml) - py(band_ml):.1f}" '
           'fill="#2a6f3f" fill-opacity="0.35"><title>reference band: +-20.5 mL</title></rect>']
    for t in _ticks(-y_abs, y_abs):
        out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#2b3440"/>'
                   f'<text x="{L - 6}" y="{py(t) + 4:.1f}" fill="#aab" text-anchor="end">{t:g}</text>')
    for t in _ticks(0.0, x_hi):
        out.append(f'<text x="{px(t):.1f}" y="{H - B + 16}" fill="#aab" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{L}" x2="{W - R}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#889"/>')
    for key, colour, dash in (("bias", "#ffcc33", ""), ("lower", "#ff7766", "6 4"), ("upper", "#ff7766", "6 4")):
        v = ba.get(key)
        if v is not None:
            out.append(f'<line class="{key}" x1="{L}" x2="{W - R}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                       f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>'
                       f'<text x="{W - R - 4}" y="{py(v) - 4:.1f}" fill="{colour}" text-anchor="end">'
                       f'{escape(key)} {v:+.1f} mL</text>')
    for x, y, r in zip(xs, ys, rows, strict=True):
        out.append(f'<circle class="study" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="#5fb3ff">'
                   f'<title>job {int(r["job_id"])}: {y:+.1f} mL</title></circle>')
    if not rows:
        out.append(f'<text x="{W / 2}" y="{H / 2}" fill="#ccd" text-anchor="middle">no study with both maps yet</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 10}" fill="#ccd" text-anchor="middle">mean of synthetic and '
               'DSC Tmax&gt;6 s volume (mL)</text>'
               f'<text x="14" y="{(T + H - B) / 2}" fill="#ccd" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">synthetic - DSC (mL)</text></svg>')
    return "".join(out)
