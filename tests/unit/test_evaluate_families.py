"""`synthperf evaluate` on a held-out folder that mixes phantom families and holds a no-stroke study:
per-family figures, the family column, and the false hypoperfusion called on the healthy brain."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.evaluate import evaluate, format_summary
from models.tmax_ddpm.checkpoint import export_weights
from models.tmax_ddpm.data import load_case
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.metrics import defuse3
from models.tmax_ddpm.network import build_network
from phantom.api import make_case, write_training_case
from tests.unit.test_model import tiny_config, write_synthetic_case

#: one intra-op thread (tests/conftest.py: one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Both phantom families with a stroke and a no-stroke study each, and one legacy case without a
    ``family`` key. Returns the folder and the no-stroke case id per family."""
    root = tmp_path_factory.mktemp("mixed")
    write_training_case(make_case(1, matrix=32, family="geometric"), root)
    write_training_case(make_case(5, matrix=32, family="template"), root)
    healthy = {"geometric": make_case(2, matrix=32, family="geometric", scenario={"occlusion": "none"}),
               "template": make_case(3, matrix=32, family="template")}  # seed 3 draws no stroke
    for c in healthy.values():
        assert c.truth["occlusion"] == "none" and not c.core.any() and not (c.tmax > 6).any()
        write_training_case(c, root)
    write_synthetic_case(root, "legacy_000", seed=5)  # truth.json without "family": counts as geometric
    return root, {f: c.case_id for f, c in healthy.items()}


def _model_tmax6_ml(weights: Path, case_dir: Path) -> float:
    """The model's Tmax>6 s volume on one case, computed apart from evaluate (same seed and sampling)."""
    case = load_case(case_dir)
    im, brain = case.images, case.brain
    res = TmaxSynthesizer.load(str(weights), device="cpu").synthesize(
        im["dwi"], im["flair"], im["core"], brain, adc=im["adc"], spacing_zyx=case.spacing_zyx,
        steps=1, samples=1, seed=0)
    return float(((res.mean > 6) & brain).sum()) * float(np.prod(case.spacing_zyx)) / 1000.0


def test_evaluate_reports_per_family_and_no_stroke(mixed: tuple[Path, dict[str, str]], tmp_path: Path):
    root, healthy = mixed
    cfg = tiny_config()
    torch.manual_seed(0)
    export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    s = evaluate(str(tmp_path / "w"), root, tmp_path / "eval", steps=1, samples=1, device="cpu", progress=False)

    assert s["cases"] == 5
    fam = s["per_family"]
    assert set(fam) == {"geometric", "template"}
    assert fam["geometric"]["cases"] == 3 and fam["template"]["cases"] == 2
    for f in ("geometric", "template"):
        for m in ("model", "core", "territory"):
            assert 0 <= fam[f][m]["dice6_mean"] <= 1
            assert fam[f][m]["vol6_abs_err_ml"] >= 0
    assert s["no_stroke"]["cases"] == 2

    # the false volume is the model's own Tmax>6 s call on each healthy brain
    false_ml = {f: _model_tmax6_ml(tmp_path / "w", root / cid) for f, cid in healthy.items()}
    for f, v in false_ml.items():
        ns = fam[f]["no_stroke"]
        assert ns["cases"] == 1
        assert ns["model"]["false_tmax6_ml_median"] == pytest.approx(v)
        assert ns["model"]["defuse3_yes"] == int(defuse3(0.0, v)["target"])
        # the core baseline calls nothing where there is no core
        assert ns["core"]["false_tmax6_ml_max"] == 0 and ns["core"]["defuse3_yes"] == 0
    assert s["no_stroke"]["model"]["false_tmax6_ml_median"] == pytest.approx(np.median(list(false_ml.values())))
    assert s["no_stroke"]["model"]["defuse3_yes"] == sum(int(defuse3(0.0, v)["target"]) for v in false_ml.values())
    # as served: a healthy brain has no core, so its confidence is low (the anchor part) and no call is given
    assert s["no_stroke"]["model"]["defuse3_yes_served"] == 0

    with open(tmp_path / "eval" / "per_case.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert {r["family"] for r in rows.values()} == {"geometric", "template"}
    assert rows["legacy_000"]["family"] == "geometric"
    assert {c for c, r in rows.items() if r["no_stroke"] == "True"} == set(healthy.values())
    assert all(rows[c]["confidence_low"] == "True" and "without a visible core" in rows[c]["confidence_reasons"]
               for c in healthy.values())
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["per_family"]["template"]["cases"] == 2
    table = format_summary(s)
    assert any(line.startswith("template") for line in table.splitlines())
    assert any(line.startswith("geometric") and "model" in line for line in table.splitlines())


def _grown_core(case_dir: Path, im: dict, spacing: tuple[float, float, float]) -> np.ndarray:
    """A core method that over-calls: the truth core grown by one voxel in-plane."""
    from scipy import ndimage as ndi

    return ndi.binary_dilation(im["core"] > 0.5, structure=np.ones((1, 3, 3), bool))


def test_evaluate_conditioned_on_a_core_method(mixed: tuple[Path, dict[str, str]], tmp_path: Path):
    """--condition-on: the model, the calls and the baselines get the method's core; the truth call keeps the
    truth core (the end-to-end figure of the service's own core rule)."""
    root, _ = mixed
    cfg = tiny_config()
    torch.manual_seed(0)
    export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    methods = {"grown": _grown_core}
    with pytest.raises(ValueError, match="condition_on"):
        evaluate(str(tmp_path / "w"), root, tmp_path / "bad", steps=1, samples=1, device="cpu", progress=False,
                 core_methods=methods, condition_on="rule")
    s = evaluate(str(tmp_path / "w"), root, tmp_path / "eval", steps=1, samples=1, device="cpu", progress=False,
                 core_methods=methods, condition_on="grown")
    assert s["condition_on"] == "grown"
    with open(tmp_path / "eval" / "per_case.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    stroke = "case_000001"
    case = load_case(root / stroke)
    im, brain = case.images, case.brain
    voxel_ml = float(np.prod(case.spacing_zyx)) / 1000.0
    grown = _grown_core(root / stroke, im, case.spacing_zyx) & brain
    true_core = (im["core"] > 0.5) & brain
    assert grown.sum() > true_core.sum() > 0
    r = rows[stroke]
    assert r["condition_on"] == "grown"
    assert float(r["core_ml"]) == pytest.approx(true_core.sum() * voxel_ml)
    assert float(r["given_core_ml"]) == pytest.approx(grown.sum() * voxel_ml)
    # the core baseline is the given core itself, and the model saw the given core
    assert float(r["core_tmax6_ml"]) == pytest.approx(grown.sum() * voxel_ml)
    res = TmaxSynthesizer.load(str(tmp_path / "w"), device="cpu").synthesize(
        im["dwi"], im["flair"], grown.astype(np.float32), brain, adc=im["adc"], spacing_zyx=case.spacing_zyx,
        steps=1, samples=1, seed=0)
    model6 = float(((res.mean > 6) & brain).sum()) * voxel_ml
    assert float(r["model_tmax6_ml"]) == pytest.approx(model6)
    assert (r["model_defuse3"] == "True") == defuse3(grown.sum() * voxel_ml, model6)["target"]
    truth6 = float(((np.nan_to_num(im["tmax"]) > 6) & brain).sum()) * voxel_ml
    assert (r["true_defuse3"] == "True") == defuse3(true_core.sum() * voxel_ml, truth6)["target"]
    assert float(r["coreseg_grown_dice"]) < 1.0
