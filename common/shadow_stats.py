"""Agreement statistics of the shadow validation (synthetic Tmax against DSC-derived Tmax, issue 17).

Pure arithmetic on plain numbers, shared by the dashboard page, its JSON API and its CSV export:

- Bland-Altman of the Tmax>6 s volume (Bland & Altman, Lancet 1986): bias = mean of
  (synthetic - DSC), limits of agreement = bias +- 1.96 SD (sample SD, n-1);
- Lin's concordance correlation coefficient (Biometrics 1989), population moments:
  2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2);
- the DEFUSE-3 2x2 table (synthetic call x DSC call), Cohen's kappa and % discordant;
- the mean absolute volume difference, which is what the reference band is quoted in.

The reference band is how much two commercial MRI perfusion packages disagree with each other on the
same patients (Deutschmann et al. 2021): 7.4 % of DEFUSE-3 decisions and a mean absolute
hypoperfusion (Tmax>6 s) volume difference of 20.5 mL. A synthetic map that disagrees with the
site's DSC less than that is as close to it as one vendor's DSC software is to another's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

REFERENCE_BAND = {
    "source": "Deutschmann et al. 2021: two commercial MRI perfusion packages on the same patients",
    "defuse3_discordant_pct": 7.4,
    "mean_abs_t6_diff_ml": 20.5,
}


@dataclass(frozen=True)
class BlandAltman:
    n: int
    bias: float | None
    sd: float | None
    lower: float | None
    upper: float | None


def bland_altman(a: Sequence[float], b: Sequence[float]) -> BlandAltman:
    """Bias and 95 % limits of agreement of ``a - b``; SD and limits need two pairs."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length ({len(a)} != {len(b)})")
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n == 0:
        return BlandAltman(0, None, None, None, None)
    bias = sum(d) / n
    if n < 2:
        return BlandAltman(n, bias, None, None, None)
    sd = math.sqrt(sum((x - bias) ** 2 for x in d) / (n - 1))
    return BlandAltman(n, bias, sd, bias - 1.96 * sd, bias + 1.96 * sd)


def concordance(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Lin's concordance correlation coefficient; None under two pairs or with no spread at all."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length ({len(a)} != {len(b)})")
    n = len(a)
    if n < 2:
        return None
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a) / n
    vb = sum((y - mb) ** 2 for y in b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / n
    den = va + vb + (ma - mb) ** 2
    return None if den == 0 else 2 * cov / den


@dataclass(frozen=True)
class Table2x2:
    """DEFUSE-3 calls: ``both`` yes/yes, ``synthetic_only`` synthetic yes DSC no, ``real_only``, ``neither``."""

    both: int
    synthetic_only: int
    real_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.synthetic_only + self.real_only + self.neither

    @property
    def discordant_pct(self) -> float | None:
        return None if self.n == 0 else 100.0 * (self.synthetic_only + self.real_only) / self.n

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa; None with no pairs, and when chance agreement is 1 (both raters constant)."""
        n = self.n
        if n == 0:
            return None
        po = (self.both + self.neither) / n
        s_yes, r_yes = (self.both + self.synthetic_only) / n, (self.both + self.real_only) / n
        pe = s_yes * r_yes + (1 - s_yes) * (1 - r_yes)
        return None if pe >= 1.0 else (po - pe) / (1 - pe)


def table_2x2(pairs: Sequence[tuple[bool, bool]]) -> Table2x2:
    """The 2x2 table of (synthetic call, DSC call) pairs."""
    c = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for s, r in pairs:
        c[(bool(s), bool(r))] += 1
    return Table2x2(c[(True, True)], c[(True, False)], c[(False, True)], c[(False, False)])


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every figure of the shadow page from records with ``synthetic_t6_ml``, ``real_t6_ml``,
    ``dice_t6``, ``dice_t10``, ``synthetic_defuse3`` and ``real_defuse3`` (JSON-ready)."""
    s6 = [float(r["synthetic_t6_ml"]) for r in records]
    r6 = [float(r["real_t6_ml"]) for r in records]
    ba = bland_altman(s6, r6)
    pairs = [(bool(r["synthetic_defuse3"]), bool(r["real_defuse3"])) for r in records
             if r.get("synthetic_defuse3") is not None and r.get("real_defuse3") is not None]
    t = table_2x2(pairs)

    def mean(key: str) -> float | None:
        v = [float(r[key]) for r in records if r.get(key) is not None]
        return sum(v) / len(v) if v else None

    mad = sum(abs(x - y) for x, y in zip(s6, r6, strict=True)) / len(s6) if s6 else None
    return {
        "n": len(records),
        "bland_altman_t6": asdict(ba),
        "ccc_t6": concordance(s6, r6),
        "mean_abs_t6_diff_ml": mad,
        "mean_dice_t6": mean("dice_t6"),
        "mean_dice_t10": mean("dice_t10"),
        "defuse3": {"both": t.both, "synthetic_only": t.synthetic_only, "real_only": t.real_only,
                    "neither": t.neither, "n": t.n, "kappa": t.kappa, "discordant_pct": t.discordant_pct},
        "reference": REFERENCE_BAND,
        "within_reference": {
            "defuse3": None if t.discordant_pct is None else t.discordant_pct <= REFERENCE_BAND["defuse3_discordant_pct"],
            "t6_volume": None if mad is None else mad <= REFERENCE_BAND["mean_abs_t6_diff_ml"],
        },
    }
