"""The DEFUSE-3 call read from the samples instead of the mean map: agreement against the share needed.

Not a timing benchmark and not run by ``make bench``. The served call reads the Tmax>6 s volume of the
*mean* of the samples. Where the model is unsure whether a territory is hypoperfused (a study with no
visible core: issue 15's largest misses), some samples draw the region and others do not; the mean then
falls below 6 s there, and the call says "no" however many samples said "yes". ``synthperf evaluate``
keeps each sample's own call (``model_defuse3_share``: the share of samples whose Tmax>6 s volume makes
a target mismatch with the study's core). This reads those evaluations and gives DEFUSE-3 agreement for
the mean map's call and for "yes when at least a share q of the samples say yes", split by study kind
(visible core, no core, healthy brain), with the raw "yes" calls on healthy brains. The share is chosen
on the first evaluation only (a calibration set drawn from the training distribution: the highest
agreement, ties to the larger share, so fewer "yes"); the others are read at it, held out.

    .venv/bin/python -m bench.defuse3_share runs/eval/calib runs/eval/A runs/eval/B
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from models.evaluate import core_visible, read_rows

#: what it reads: `python -m bench` skips it and says so (it has nothing to run on by itself)
NEEDS_DATA = "synthperf evaluate output folders"

Call = Callable[[Mapping], bool]


def sample_share(row: Mapping) -> float:
    """The share of samples calling a target mismatch; a row from before it was kept is an error."""
    if "model_defuse3_share" not in row:
        raise ValueError(f"{row.get('case', '?')}: no model_defuse3_share (evaluate it again with this code)")
    return float(row["model_defuse3_share"])


def kind(row: Mapping) -> str:
    """'healthy', 'core' (a visible core, >= the confidence score's anchor volume) or 'no core'."""
    if row.get("no_stroke"):
        return "healthy"
    return "core" if core_visible(row["core_ml"]) else "no core"


def share_call(q: float) -> Call:
    return lambda row: sample_share(row) >= q


def mean_map_call(row: Mapping) -> bool:
    return bool(row["model_defuse3"])


def agreement(rows: Sequence[Mapping], call: Call) -> dict:
    """Agreement with the true call, overall and per study kind, and the raw 'yes' on healthy brains."""
    out: dict = {"n": len(rows), "all": _share([call(r) == bool(r["true_defuse3"]) for r in rows])}
    for k in ("core", "no core", "healthy"):
        sub = [r for r in rows if kind(r) == k]
        out[k] = _share([call(r) == bool(r["true_defuse3"]) for r in sub])
        out[f"n {k}"] = len(sub)
    out["healthy yes"] = sum(call(r) for r in rows if kind(r) == "healthy")
    served = [r for r in rows if not r.get("confidence_low")]
    out["served"] = _share([call(r) == bool(r["true_defuse3"]) for r in served])
    out["n served"] = len(served)
    return out


def _share(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def choose(rows: Sequence[Mapping], shares: Sequence[float]) -> float:
    """The share with the highest agreement over all studies; ties go to the larger share (fewer 'yes')."""
    return max(sorted(shares, reverse=True), key=lambda q: agreement(rows, share_call(q))["all"])


def _row(name: str, rule: str, a: dict) -> str:
    return (f"| {name} | {rule} | {a['n']} | {a['all']:.3f} | {a['core']:.2f} ({a['n core']}) | "
            f"{a['no core']:.2f} ({a['n no core']}) | {a['healthy']:.2f} ({a['n healthy']}) | {a['healthy yes']} | "
            f"{a['served']:.2f} ({a['n served']}) |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", help="synthperf evaluate output folders; the first is the calibration set")
    args = ap.parse_args(argv)
    sets = [(Path(e).name, read_rows(Path(e) / "per_case.csv")) for e in args.evals]
    samples = {len(str(r["model_sample_tmax6_ml"]).split(";")) for _, rows in sets for r in rows}
    if len(samples) != 1:
        raise SystemExit(f"evaluations with different sample counts {sorted(samples)}: compare like with like")
    n = samples.pop()
    shares = [i / n for i in range(1, n + 1)]
    q = choose(sets[0][1], shares)
    print(f"{n} samples a study; share chosen on {sets[0][0]}: 'yes' when >= {q:.3f} of the samples say yes")
    print("\n| share q | " + " | ".join(name for name, _ in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for s in shares:
        print(f"| {s:.3f} | " + " | ".join(f"{agreement(rows, share_call(s))['all']:.3f}" for _, rows in sets) + " |")
    print("\n| set | call | studies | DEFUSE-3 agreement | core visible | no core | healthy | healthy 'yes' (raw) | "
          "served (not low confidence) |")
    print("|---|---|---|---|---|---|---|---|---|")
    pooled = [r for _, rows in sets[1:] for r in rows]
    for name, rows in [*sets, ("held out, pooled", pooled)] if len(sets) > 1 else sets:
        print(_row(name, "mean map", agreement(rows, mean_map_call)))
        print(_row(name, "samples >= 0.5", agreement(rows, share_call(0.5))))
        print(_row(name, f"samples >= {q:.3f}", agreement(rows, share_call(q))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
