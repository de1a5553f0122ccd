"""Models scored on the same held-out cases, compared case by case against a reference model.

Not a timing benchmark and not run by ``make bench``. A mean Dice over a few hundred phantom cases moves
by a few hundredths from one model to the next, about its own spread; the per-case difference against
a reference on the same cases (same seeds, same truth) has a much smaller standard error, so it tells a
real change from a lucky draw. Each model's figures come from earlier ``synthperf evaluate`` runs
(their per_case.csv; a set split over several runs is pooled), and the strata read each case's
truth.json: the phantom's penumbral DWI cue (``domain.penumbral_scale``: absent 0, weak < 0.65, full)
and its FLAIR vessel signs (``domain.fvh``), the two cues issue 15 found the model reads.

    .venv/bin/python -m bench.paired_eval --data runs/data/af12 \\
        demo=runs/eval/demo/af12_p0,runs/eval/demo/af12_p1 ft=runs/eval/ft/af12_p0,runs/eval/ft/af12_p1

The first model named is the reference. Figures are in-family whenever the cases come from the
families the models were trained on.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.evaluate import core_visible, read_rows, summarise

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "synthperf evaluate output folders of two or more models on the same cases"

#: the strata of the penumbral cue's drawn strength (phantom.randomise.penumbral_scale_draw: absent 0,
#: weak U(0.15, 0.6), full U(0.7, 1.4); unrandomised cases have 1)
WEAK_CUE_BELOW = 0.65


def cue_class(scale: float | None) -> str:
    """The stratum of a case's penumbral cue strength; "unknown" for a truth.json written before 1.2."""
    if scale is None:
        return "unknown"
    if scale <= 0.0:
        return "absent"
    return "weak" if scale < WEAK_CUE_BELOW else "full"


def case_strata(data_dirs: list[Path]) -> dict[str, dict[str, str]]:
    """Case id -> {"cue": ..., "fvh": ...} from each case folder's truth.json."""
    out: dict[str, dict[str, str]] = {}
    for d in data_dirs:
        for truth_path in sorted(d.glob("*/truth.json")):
            domain = json.loads(truth_path.read_text()).get("domain") or {}
            out[truth_path.parent.name] = {"cue": cue_class(domain.get("penumbral_scale")),
                                          "fvh": str(domain.get("fvh", "unknown"))}
    return out


def pooled_rows(eval_dirs: list[Path]) -> dict[str, dict]:
    """Case id -> per-case row over several evaluations of disjoint case sets; a case twice is an error."""
    rows: dict[str, dict] = {}
    for d in eval_dirs:
        path = d / "per_case.csv"
        if not path.exists():
            raise FileNotFoundError(f"{d}: no per_case.csv (run synthperf evaluate --out {d} first)")
        for r in read_rows(path):
            if r["case"] in rows:
                raise ValueError(f"{r['case']} is in more than one evaluation of one model ({d})")
            rows[r["case"]] = r
    return rows


@dataclass(frozen=True)
class Paired:
    """Mean per-case difference (model - reference) with its standard error, and how many cases moved."""

    n: int
    mean: float
    se: float
    worse: int
    better: int

    def text(self) -> str:
        return f"{self.mean:+.3f} (SE {self.se:.3f}; worse on {self.worse}, better on {self.better} of {self.n})"


def paired(model: list[float], reference: list[float], tie: float = 1e-3) -> Paired | None:
    """The paired difference of two score lists over the same cases (None for fewer than two)."""
    if len(model) != len(reference):
        raise ValueError(f"paired: {len(model)} model scores against {len(reference)} reference scores")
    if len(model) < 2:
        return None
    d = np.asarray(model, float) - np.asarray(reference, float)
    return Paired(n=len(d), mean=float(d.mean()), se=float(d.std(ddof=1) / math.sqrt(len(d))),
                  worse=int((d < -tie).sum()), better=int((d > tie).sum()))


def _is_stroke(r: Mapping) -> bool:
    return not r.get("no_stroke")


def model_figures(rows: Mapping[str, dict]) -> dict[str, float | int | None]:
    """The headline figures of one model over the pooled cases, read from ``synthperf evaluate``'s own
    summary (models.evaluate.summarise) so both report the same numbers; only the volume bias is taken
    over stroke studies (the summary's counts a healthy brain's false volume too)."""
    vals = list(rows.values())
    s = summarise(vals)
    m, ns, conf = s.get("model", {}), (s["no_stroke"].get("model") or {}), s["confidence"]
    bias = [float(r["model_vol6_err_ml"]) for r in vals if _is_stroke(r) and "model_vol6_err_ml" in r]
    return {
        "cases": len(vals),
        "stroke": m.get("stroke_cases", 0),
        "dice6_stroke": m.get("dice6_mean_stroke"),
        "dice6_core": m.get("dice6_mean_core_visible"),
        "dice6_no_core": m.get("dice6_mean_no_core"),
        "vol6_bias_ml": float(np.mean(bias)) if bias else None,
        "defuse3_raw": m.get("defuse3_agreement"),
        "defuse3_served": conf.get("high_confidence_defuse3_agreement"),
        "served": len(vals) - conf.get("low", 0),
        "healthy_false_ml_mean": ns.get("false_tmax6_ml_mean"),
        "healthy_yes_raw": ns.get("defuse3_yes", 0),
        "auroc": conf.get("auroc"),
    }


def _fmt(v: float | int | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def report(models: Mapping[str, Mapping[str, dict]], strata: Mapping[str, dict[str, str]]) -> list[str]:
    """Markdown lines: each model's figures, then its paired Dice>6 difference from the first model,
    over all stroke studies and per stratum."""
    names = list(models)
    ref_name = names[0]
    ref = models[ref_name]
    head = ("| model | cases (stroke) | Dice>6 stroke | with core | no core | vol bias mL | DEFUSE-3 raw | "
            "served (n) | healthy false mean mL | healthy raw yes | AUROC |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        f = model_figures(models[name])
        lines.append(f"| {name} | {f['cases']} ({f['stroke']}) | {_fmt(f['dice6_stroke'])} | {_fmt(f['dice6_core'])} | "
                     f"{_fmt(f['dice6_no_core'])} | {_fmt(f['vol6_bias_ml'], '.1f')} | {_fmt(f['defuse3_raw'])} | "
                     f"{_fmt(f['defuse3_served'])} ({f['served']}) | {_fmt(f['healthy_false_ml_mean'], '.2f')} | "
                     f"{f['healthy_yes_raw']} | {_fmt(f['auroc'])} |")
    for name in names[1:]:
        rows = models[name]
        common = sorted(c for c in rows if c in ref and _is_stroke(ref[c]))
        lines.append("")
        lines.append(f"{name} - {ref_name}, Dice>6 per stroke study:")
        groups: dict[str, list[str]] = {"all": common}
        for key in ("cue", "fvh"):
            for c in common:
                label = strata.get(c, {}).get(key, "unknown")
                groups.setdefault(f"{key} {label}", []).append(c)
        groups["no core"] = [c for c in common if not core_visible(ref[c].get("core_ml", 0.0))]
        for label, cases in groups.items():
            p = paired([rows[c]["model_dice6"] for c in cases], [ref[c]["model_dice6"] for c in cases])
            if p is not None:
                lines.append(f"- {label}: {float(np.mean([rows[c]['model_dice6'] for c in cases])):.3f} against "
                             f"{float(np.mean([ref[c]['model_dice6'] for c in cases])):.3f}, {p.text()}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="NAME=EVAL_DIR[,EVAL_DIR...]",
                    help="a model's evaluations of the cases (pooled); the first is the reference")
    ap.add_argument("--data", default="", help="case folders' parent(s), comma-separated, for the strata")
    args = ap.parse_args(argv)
    models: dict[str, dict[str, dict]] = {}
    for spec in args.models:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            ap.error(f"{spec!r}: expected NAME=EVAL_DIR[,EVAL_DIR...]")
        models[name] = pooled_rows([Path(d) for d in dirs.split(",")])
    strata = case_strata([Path(d) for d in args.data.split(",") if d])
    print("\n".join(report(models, strata)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
