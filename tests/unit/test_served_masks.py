"""Training as served: the service's own brain mask beside each phantom case, and training inside it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from models.tmax_ddpm.config import Config, TrainConfig
from models.tmax_ddpm.data import build_cache, case_to_grid, load_case
from models.tmax_ddpm.pack import write_pack
from phantom.api import make_case, write_training_case
from worker.served_masks import write_served_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ("dwi", "adc", "flair", "core", "tmax", "brain", "brain_served")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two randomised phantom cases (a stroke and a healthy brain), b0 included, with their service masks."""
    root = tmp_path_factory.mktemp("served")
    write_training_case(make_case(14, matrix=64, family="geometric", randomise=True), root)  # M1, small core
    write_training_case(make_case(4, matrix=64, family="template", randomise=True, scenario={"occlusion": "none"}),
                        root)
    report = write_served_masks([root])
    assert len(report.written) == 2 and not report.no_b0
    return root


def test_the_served_mask_is_the_service_mask_on_the_case_grid(data: Path) -> None:
    for case_dir in sorted(data.iterdir()):
        case = load_case(case_dir, ("brain", "brain_served"))
        served, truth = case.images["brain_served"] > 0, case.brain
        assert served.shape == truth.shape
        assert (served & truth).sum() > 0.97 * truth.sum()  # the true brain lies inside it
        assert served.sum() > truth.sum()  # and it adds a rim, the point of training with it


def test_a_second_run_skips_done_cases_and_names_cases_without_a_b0(data: Path, tmp_path: Path) -> None:
    again = write_served_masks([data])
    assert again.written == [] and len(again.already_done) == 2
    bare = tmp_path / "bare"
    write_training_case(make_case(5, matrix=64, family="geometric"), bare)
    (next(bare.iterdir()) / "b0.nii.gz").unlink()
    report = write_served_masks([bare])
    assert report.no_b0 == [next(bare.iterdir()).name] and report.written == []
    assert main(["dataset", "served-masks", str(bare), "--no-progress"]) == 2  # nothing could be made
    assert main(["dataset", "served-masks", str(tmp_path / "missing"), "--no-progress"]) == 2


def test_inputs_are_normalised_in_the_served_mask_and_the_target_is_unchanged(data: Path) -> None:
    case = load_case(next(data.iterdir()), NAMES)
    truth_g, served_g = case_to_grid(case, 32), case_to_grid(case, 32, "brain_served")
    assert torch.equal(truth_g["tmax"], served_g["tmax"])  # no Tmax outside the true brain either way
    assert torch.equal(truth_g["brain"], served_g["brain"])
    dwi = 0  # KNOWN_INPUTS[0]
    inside_truth = (truth_g["cond"][dwi] > -0.999).sum()
    inside_served = (served_g["cond"][dwi] > -0.999).sum()
    assert inside_served > inside_truth  # the rim is now shown to the model


def test_bad_input_mask_settings_name_the_problem(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_mask"):
        TrainConfig(input_mask="skull")
    with pytest.raises(ValueError, match="input_mask"):
        Config.from_dict({"train": {"input_mask": "head"}})
    bare = tmp_path / "bare"
    write_training_case(make_case(6, matrix=64, family="geometric"), bare)
    with pytest.raises(FileNotFoundError, match="brain_served"):
        build_cache(bare, 32, None, progress=False, input_mask="brain_served")
    pack = tmp_path / "p.npz"
    write_pack([data], 32, pack, progress=False)
    with pytest.raises(ValueError, match="packs hold the inputs inside the true brain"):
        build_cache(pack, 32, None, progress=False, input_mask="brain_served")


def test_training_with_the_served_mask_caches_it_apart(data: Path, tmp_path: Path) -> None:
    from models.train import train
    from tests.unit.test_model import TINY

    cfg = Config.from_dict({
        "model": TINY,
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "lr_warmup": 1, "seed": 1, "num_threads": 1,
                  "bf16_cpu": False, "input_mask": "brain_served"},
        "sample": {"steps": 1, "samples": 1},
    })
    run = tmp_path / "run"
    train(data, run, cfg, progress=False)
    assert sorted(p.name for p in (run / "cache").iterdir()) == ["grid32-brain_served"]
    for cached_file in sorted((run / "cache" / "grid32-brain_served").iterdir()):
        cached = torch.load(cached_file, weights_only=False)
        case = load_case(data / cached_file.stem, NAMES)
        torch.testing.assert_close(cached["cond"], case_to_grid(case, 32, "brain_served")["cond"], rtol=0, atol=0,
                                   equal_nan=True)


def test_evaluate_gives_the_model_the_served_mask_and_counts_inside_it(data: Path, tmp_path: Path) -> None:
    """--input-mask brain_served: the model sees the service's mask and its calls are counted inside it, as
    `synthperf process` counts them; the truth stays inside the true brain."""
    from models.evaluate import evaluate
    from models.tmax_ddpm.checkpoint import export_weights
    from models.tmax_ddpm.inference import TmaxSynthesizer
    from models.tmax_ddpm.metrics import dice
    from models.tmax_ddpm.network import build_network
    from tests.unit.test_model import tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    s = evaluate(str(tmp_path / "w"), data, tmp_path / "eval", steps=1, samples=2, device="cpu", progress=False,
                 input_mask="brain_served")
    assert s["input_mask"] == "brain_served"
    with open(tmp_path / "eval" / "per_case.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    synth = TmaxSynthesizer.load(str(tmp_path / "w"), device="cpu")
    for case_dir in sorted(data.iterdir()):
        case = load_case(case_dir)
        im, served = case.images, case.images["brain_served"] > 0
        voxel_ml = float(np.prod(case.spacing_zyx)) / 1000.0
        res = synth.synthesize(im["dwi"], im["flair"], (im["core"] > 0.5).astype(np.float32), served, adc=im["adc"],
                               spacing_zyx=case.spacing_zyx, steps=1, samples=2, seed=0)
        called = (res.mean > 6) & served
        r = rows[case.case_id]
        assert r["input_mask"] == "brain_served"
        assert float(r["model_tmax6_ml"]) == pytest.approx(called.sum() * voxel_ml)
        truth6 = (np.nan_to_num(im["tmax"]) > 6) & case.brain
        assert float(r["true_tmax6_ml"]) == pytest.approx(truth6.sum() * voxel_ml)
        assert float(r["model_dice6"]) == pytest.approx(dice(called, truth6))
    assert sum(float(r["true_tmax6_ml"]) > 0 for r in rows.values()) == 1  # a stroke and a healthy brain
    bare = tmp_path / "bare"
    write_training_case(make_case(6, matrix=64, family="geometric"), bare)
    with pytest.raises(FileNotFoundError, match="brain_served"):
        evaluate(str(tmp_path / "w"), bare, tmp_path / "e2", steps=1, samples=1, device="cpu", progress=False,
                 input_mask="brain_served")


def test_the_input_reference_is_taken_in_the_mask_the_model_was_trained_in(data: Path, tmp_path: Path) -> None:
    import shutil

    from models.confidence import reference_from_folder

    cases = sorted(data.iterdir())
    for i in range(5):  # a reference needs five cases: the two, repeated
        shutil.copytree(cases[i % 2], tmp_path / f"case_{i}")
    truth = reference_from_folder(tmp_path, input_mask="brain")
    served = reference_from_folder(tmp_path, input_mask="brain_served")
    assert served["input_mask"] == "brain_served" and "input_mask" not in truth
    # the served mask is larger, and its volume is what the service will measure
    assert served["features"]["brain_ml"]["q50"] > truth["features"]["brain_ml"]["q50"]
