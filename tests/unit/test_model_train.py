"""Training, checkpoints, the registry/inference interface and evaluate, on tiny synthetic cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import registry
from models.evaluate import (
    comparison_table,
    evaluate,
    per_case_table,
    read_rows,
    summarise,
    territory_baseline,
)
from models.tmax_ddpm.checkpoint import CheckpointError, export_weights, load_weights
from models.tmax_ddpm.config import Config
from models.tmax_ddpm.data import SliceBank, build_cache, list_cases, load_case
from models.tmax_ddpm.diffusion import make_scheduler, training_target
from models.tmax_ddpm.inference import TmaxSynthesizer
from models.tmax_ddpm.loss import perfusion_weights, weighted_mse
from models.tmax_ddpm.metrics import mae
from models.tmax_ddpm.network import build_network
from models.train import train
from tests.unit.test_model import TINY, synthetic_arrays, tiny_config, write_synthetic_case

#: one intra-op thread (tests/conftest.py: one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    for i in range(4):
        write_synthetic_case(root, f"case_{i:03d}", seed=i)
    return root


def tiny_train_config(steps: int) -> Config:
    return Config.from_dict({
        "model": TINY,
        "train": {"steps": steps, "batch_size": 8, "log_every": 5, "lr_warmup": 5, "lr": 1e-3, "seed": 3,
                  "num_threads": 1, "bf16_cpu": False},
        "sample": {"steps": 3, "samples": 2},
    })


def test_data_loading_orientation_and_cache(cases: Path, tmp_path: Path):
    ids = list_cases(cases)
    assert [p.name for p in ids] == ["case_000", "case_001", "case_002", "case_003"]
    case = load_case(ids[0])
    np.testing.assert_allclose(case.images["tmax"], synthetic_arrays(0)["tmax"], rtol=1e-6)
    assert case.spacing_zyx == pytest.approx((5.0, 1.8, 1.8))
    cache = build_cache(cases, 32, tmp_path / "c", progress=False)
    bank = SliceBank(cache, ("dwi", "flair", "core"), 5, tiny_train_config(1).train)
    cond, x0 = bank.batch([0, 1, 2], torch.Generator().manual_seed(0))
    assert cond.shape == (3, 15, 32, 32) and x0.shape == (3, 1, 32, 32)
    assert x0.min() >= -1.001 and x0.max() <= 1.001
    with pytest.raises(FileNotFoundError, match="synthperf phantom"):
        list_cases(tmp_path)


def test_few_training_steps_lower_the_loss(cases: Path, tmp_path: Path):
    """Fixed batch, fixed timesteps: 25 optimiser steps must reduce the perfusion-weighted loss."""
    torch.manual_seed(0)
    cfg = tiny_train_config(40)
    cache = build_cache(cases, 32, tmp_path / "c", progress=False)
    bank = SliceBank(cache, cfg.model.inputs, cfg.model.slices, cfg.train)
    g = torch.Generator().manual_seed(0)
    cond, x0 = bank.batch(list(range(8)), g, augment=False)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    sched = make_scheduler(cfg.model)
    xt, target = sched.add_noise(x0, noise, t), training_target(sched, x0, noise, t)
    w = perfusion_weights(x0)
    net = build_network(cfg.model)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return float(weighted_mse(net(torch.cat([cond, xt], 1), t), target, w))

    before = loss_now()
    for _ in range(25):
        loss = weighted_mse(net(torch.cat([cond, xt], 1), t), target, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < 0.7 * before


def test_train_resumes_and_exports(cases: Path, tmp_path: Path):
    run = tmp_path / "run"
    s1 = train(cases, run, tiny_train_config(10), progress=False)
    assert s1["step"] == 10 and s1["finished"]
    assert (run / "loss.png").stat().st_size > 0
    # resuming with a larger budget continues from step 10, not from scratch
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["steps"] = 15
    (run / "config.json").write_text(json.dumps(cfg))
    s2 = train(cases, run, None, progress=False)
    assert s2["step"] == 15
    hist = json.loads((run / "history.json").read_text())["history"]
    assert [h[0] for h in hist] == [5, 10, 15]
    # a different config for the same run folder is refused with advice
    with pytest.raises(ValueError, match="different config"):
        train(cases, run, tiny_train_config(99), progress=False)
    net, loaded_cfg = load_weights(run / "export")
    assert loaded_cfg.train.steps == 15
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck["ema"][k].float()), k


def test_warm_start_from_exported_weights(cases: Path, tmp_path: Path):
    """A new run started from exported weights carries their step and tensors; a mismatched model is refused."""
    first = tmp_path / "first"
    train(cases, first, tiny_train_config(10), progress=False)
    exported, _ = load_weights(first / "export")
    # a zero-step budget beyond the export: the warm-started run must hold exactly the exported weights
    second = tmp_path / "second"
    s = train(cases, second, tiny_train_config(10), progress=False, init_from=first / "export")
    assert s["step"] == 10
    net, _ = load_weights(second / "export")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in exported.state_dict().items())
    # with a larger budget it trains on from step 10, and the weights move
    third = tmp_path / "third"
    s = train(cases, third, tiny_train_config(14), progress=False, init_from=first / "export")
    assert s["step"] == 14
    assert json.loads((third / "export" / "info.json").read_text())["warm_start_step"] == 10
    moved, _ = load_weights(third / "export")
    assert any(not torch.equal(v, moved.state_dict()[k]) for k, v in exported.state_dict().items())
    other = tiny_train_config(12)
    other.model = type(other.model)(**{**other.model.__dict__, "slices": 3})
    with pytest.raises(CheckpointError, match="different model config"):
        train(cases, tmp_path / "fourth", other, progress=False, init_from=first / "export")


def test_checkpoint_save_load_identity(tmp_path: Path):
    torch.manual_seed(1)
    cfg = tiny_config()
    net = build_network(cfg.model)
    export_weights(net.state_dict(), cfg, tmp_path / "w")
    net2, cfg2 = load_weights(tmp_path / "w")
    assert cfg2.to_dict() == cfg.to_dict()
    sd1, sd2 = net.state_dict(), net2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x, t = torch.randn(2, cfg.model.in_channels, 32, 32), torch.tensor([1, 900])
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, t), net2(x, t))


def test_bad_checkpoints_give_clear_errors(tmp_path: Path):
    cfg = tiny_config()
    d = export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    # wrong sha256
    sha = (d / "model.safetensors.sha256").read_text()
    (d / "model.safetensors.sha256").write_text("0" * 64 + sha[64:])
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_weights(d)
    (d / "model.safetensors.sha256").write_text(sha)
    # wrong config: a different architecture than the one exported
    good = (d / "config.json").read_text()
    bad = json.loads(good)
    bad["model"]["channels"] = [16, 16]
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not match"):
        load_weights(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_weights(d)
    (d / "config.json").write_text(good)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(d)
    with pytest.raises(FileNotFoundError, match="neither a registered model"):
        registry.resolve(str(tmp_path / "nowhere"))


def test_synthesizer_interface_on_input_grid(tmp_path: Path):
    torch.manual_seed(2)
    cfg = tiny_config()
    export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    synth = TmaxSynthesizer.load(str(tmp_path / "w"), device="cpu")
    a = synthetic_arrays(5, shape=(6, 44, 36))
    seen: list[float] = []
    r1 = synth.synthesize(a["dwi"], a["flair"], a["core"], a["brain"], spacing_zyx=(5, 1.8, 1.8),
                          steps=2, samples=3, seed=4, progress=seen.append, sample_cuts_s=(6.0, 10.0))
    assert r1.mean.shape == r1.sd.shape == (6, 44, 36)
    assert r1.steps == 2 and r1.samples == 3 and r1.seconds > 0
    assert np.all(r1.mean >= 0) and np.all(r1.mean <= 20) and np.all(r1.sd >= 0)
    assert np.all(r1.mean[a["brain"] == 0] == 0)
    assert seen[-1] == pytest.approx(1.0)
    r2 = synth.synthesize(a["dwi"], a["flair"], a["core"], a["brain"], steps=2, samples=3, seed=4)
    np.testing.assert_array_equal(r1.mean, r2.mean)
    # each sample's own volume above the clinical cuts; with one sample it is the mean map's volume
    assert set(r1.sample_ml) == {6.0, 10.0} and all(len(v) == 3 for v in r1.sample_ml.values())
    one = synth.synthesize(a["dwi"], a["flair"], a["core"], a["brain"], spacing_zyx=(5, 1.8, 1.8),
                           steps=2, samples=1, seed=4, sample_cuts_s=(6.0, 10.0))
    for cut in (6.0, 10.0):
        called_ml = float(((one.mean > cut) & (a["brain"] > 0)).sum()) * 5 * 1.8 * 1.8 / 1000
        assert one.sample_ml[cut] == (pytest.approx(called_ml, rel=1e-6),)
    with pytest.raises(ValueError, match="flair"):
        synth.synthesize(a["dwi"], None, a["core"], a["brain"], steps=1, samples=1)


def test_territory_baseline_picks_the_core_territory():
    terr = np.zeros((1, 4, 4), int)
    terr[..., :2] = 3
    terr[..., 2:] = 4
    core = np.zeros((1, 4, 4), bool)
    core[0, 1, 2:4] = True
    core[0, 1, 1] = True
    out = territory_baseline(terr, core)
    assert out[..., 2:].all() and not out[0, 0, :2].any() and out[0, 1, 1]


def test_evaluate_writes_table_and_plots(cases: Path, tmp_path: Path):
    cfg = tiny_config()
    export_weights(build_network(cfg.model).state_dict(), cfg, tmp_path / "w")
    s = evaluate(str(tmp_path / "w"), cases, tmp_path / "eval", steps=1, samples=1, device="cpu", progress=False,
                 save_maps=True)
    assert s["cases"] == 4
    # the kept maps are the ones scored: their MAE against the truth is the row's
    for row in read_rows(tmp_path / "eval" / "per_case.csv"):
        kept = np.load(tmp_path / "eval" / "maps" / f"{row['case']}.npz")
        case = load_case(cases / row["case"])
        truth = np.clip(np.nan_to_num(case.images["tmax"]), 0, 20) * case.brain
        assert row["mae_s"] > 0.1
        assert mae(kept["mean"].astype(np.float32), truth, case.brain) == pytest.approx(row["mae_s"], rel=0.01)
        assert kept["sd"].shape == kept["mean"].shape == truth.shape
        # one sample: its own DEFUSE-3 call is the mean map's
        assert row["model_defuse3_share"] == float(row["model_defuse3"])
        assert float(row["model_sample_tmax6_ml"]) == pytest.approx(row["model_tmax6_ml"], abs=0.05)
    for m in ("model", "core", "territory"):
        assert 0 <= s[m]["dice6_mean"] <= 1
    # the territory baseline contains the core, so it never scores below the core baseline here
    assert s["territory"]["dice6_mean"] >= s["core"]["dice6_mean"]
    assert (tmp_path / "eval" / "bland_altman.png").stat().st_size > 0
    assert len((tmp_path / "eval" / "per_case.csv").read_text().strip().splitlines()) == 5
    # per_case.csv read back gives the same summary (what --compare re-summarises from)
    again = summarise(read_rows(tmp_path / "eval" / "per_case.csv"))
    for k in ("dice6_mean", "dice6_mean_stroke", "defuse3_agreement"):
        assert again["model"][k] == pytest.approx(s["model"][k]), k
    assert again["model"]["stroke_cases"] == s["model"]["stroke_cases"] == 4
    # two models' evaluations side by side: a row per model and family, the baselines' columns shared
    table = comparison_table({"a": s, "b": again}).splitlines()
    assert len(table) == 2 + 2 * len(s["per_family"]) and table[2].startswith("| a -> geometric | 4 (4 stroke")
    assert f"{s['per_family']['geometric']['core']['dice6_mean_stroke']:.3f}" in table[3]
    # and case by case: a line per case with its own volumes and Dice
    rows = read_rows(tmp_path / "eval" / "per_case.csv")
    cases_table = per_case_table(rows).splitlines()
    assert len(cases_table) == 2 + len(rows)
    for line, r in zip(cases_table[2:], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["case"] and cells[3] == f"{r['core_ml']:.1f}" and cells[6] == f"{r['model_dice6']:.2f}"


def test_thread_tuner_probes_and_keeps_the_faster(monkeypatch):
    from models import train as train_mod

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    tuner = train_mod.ThreadTuner(0, period=10, probe=2)
    assert tuner.cands == [1, 2]
    fake = {1: 0.5, 2: 3.0}  # one thread is faster on a busy machine
    for step in range(5):
        tuner.before(step)
        tuner.after(fake[torch.get_num_threads()])
    assert tuner.current == 1 and torch.get_num_threads() == 1
    fixed = train_mod.ThreadTuner(1)
    fixed.before(0)
    assert fixed.cands == [1]
    # resuming mid-probe (step not at a probe boundary) must not fail
    late = train_mod.ThreadTuner(0, period=10, probe=2)
    late.before(3)
    late.after(1.0)


def test_appearance_randomisation_changes_the_brain_and_keeps_the_background(tmp_path: Path):
    """On-the-fly randomisation (issue 15) on a real phantom case: brain intensities, sharpness and
    noise change, the background stays -1, the same seed gives the same batch, and switched off it is
    the identity."""
    import dataclasses

    from models.tmax_ddpm.data import randomise_appearance
    from phantom.api import make_case, write_training_case

    write_training_case(make_case(5, family="template"), tmp_path / "data")
    cache = build_cache(tmp_path / "data", 64, tmp_path / "c", progress=False)
    cfg = dataclasses.replace(tiny_train_config(1).train, aug_prob_appearance=1.0)
    bank = SliceBank(cache, ("dwi", "flair", "core"), 5, cfg)
    mid = len(bank) // 2
    cond, _ = bank.batch([mid] * 8, torch.Generator().manual_seed(0), augment=False)
    dwi = cond[:, 0:5]
    brain = dwi > -1
    out = randomise_appearance(dwi, cfg, torch.Generator().manual_seed(1))
    again = randomise_appearance(dwi, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.all(out[~brain] == -1.0)
    # every sample got its own change: per-sample brain medians and roughness differ
    diffs = (out - dwi).abs()[brain]
    assert float(diffs.mean()) > 0.03
    medians = torch.stack([out[i][brain[i]].median() for i in range(8)])
    assert float(medians.std()) > 0.01
    # the median stays near the normalised median (0): gamma and bias keep the scale
    assert float(medians.abs().max()) < 0.6
    curved = randomise_appearance(dwi, dataclasses.replace(cfg, aug_curve=0.7), torch.Generator().manual_seed(1))
    assert torch.all(curved[~brain] == -1.0) and not torch.equal(curved, out)
    off = dataclasses.replace(cfg, aug_prob_appearance=0.0)
    assert torch.equal(randomise_appearance(dwi, off, torch.Generator().manual_seed(1)), dwi)


def _bank_of_cases(no_core_hypo_draw: float, no_stroke_draw: float = 1.0, healthy: bool = False) -> SliceBank:
    """4-slice cases on a 16 grid: one with a core, one without; slices 0-1 of each hypoperfused; with
    ``healthy`` a third case with neither core nor hypoperfusion."""
    from models.tmax_ddpm.config import KNOWN_INPUTS, TrainConfig
    from models.tmax_ddpm.preprocess import tmax_to_model

    items = []
    kinds = ("core", "no_core", "healthy") if healthy else ("core", "no_core")
    for kind in kinds:
        cond = torch.full((len(KNOWN_INPUTS), 4, 16, 16), -1.0, dtype=torch.float16)
        if kind == "core":
            cond[KNOWN_INPUTS.index("core"), 1, 4:8, 4:8] = 1.0
        tmax = torch.full((4, 16, 16), float(tmax_to_model(np.float32(2.0))), dtype=torch.float16)
        if kind != "healthy":
            tmax[:2, 8:, 8:] = float(tmax_to_model(np.float32(9.0)))
        items.append({"cond": cond, "tmax": tmax, "brain": torch.ones((4, 16, 16), dtype=torch.bool)})
    return SliceBank({"grid": 16, "ids": list(kinds), "items": items}, ("dwi", "flair", "core"), 3,
                     TrainConfig(no_core_hypo_draw=no_core_hypo_draw, no_stroke_draw=no_stroke_draw))


def test_hypoperfused_slices_without_a_core_are_drawn_as_often_as_asked():
    uniform = _bank_of_cases(1.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert uniform.draw(64, g1) == torch.randint(0, 8, (64,), generator=g2).tolist()  # today's stream, unchanged
    weighted = _bank_of_cases(4.0)
    favoured = {i for i, (c, z) in enumerate(weighted.index) if c == 1 and z < 2}  # the no-core case's slices 0-1
    assert len(favoured) == 2
    ids = weighted.draw(7000, torch.Generator().manual_seed(0))
    share = sum(i in favoured for i in ids) / len(ids)
    assert share == pytest.approx(2 * 4 / (6 + 2 * 4), abs=0.03)  # 2 slices at weight 4 against 6 at 1
    with pytest.raises(ValueError, match="no_core_hypo_draw"):
        _bank_of_cases(0.0)


def test_healthy_brain_slices_are_drawn_as_often_as_asked_beside_the_no_core_draw():
    """The guard (train.no_stroke_draw) weights every slice of the case with neither core nor
    hypoperfusion, and only those; the no-core hypoperfused slices keep their own weight."""
    bank = _bank_of_cases(4.0, no_stroke_draw=3.0, healthy=True)
    healthy = {i for i, (c, _) in enumerate(bank.index) if c == 2}
    no_core_hypo = {i for i, (c, z) in enumerate(bank.index) if c == 1 and z < 2}
    assert len(healthy) == 4 and len(no_core_hypo) == 2
    ids = bank.draw(12000, torch.Generator().manual_seed(0))
    total = 6 * 1 + 2 * 4 + 4 * 3  # core case and no-core slices 2-3 at 1, no-core hypo at 4, healthy at 3
    assert sum(i in healthy for i in ids) / len(ids) == pytest.approx(12 / total, abs=0.03)
    assert sum(i in no_core_hypo for i in ids) / len(ids) == pytest.approx(8 / total, abs=0.03)
    unguarded = _bank_of_cases(4.0, healthy=True).draw(12000, torch.Generator().manual_seed(0))
    assert sum(i in healthy for i in unguarded) / len(unguarded) == pytest.approx(4 / 18, abs=0.03)
    with pytest.raises(ValueError, match="no_stroke_draw"):
        _bank_of_cases(4.0, no_stroke_draw=-1.0)


def test_random_intensity_curve_moves_grey_white_contrast_and_keeps_median_and_background():
    """The random intensity curve (train.aug_curve): monotone, background 0 stays 0, the brain median
    stays at 1, and the grey-white ratio (cortex 1.2 over white matter 0.9 of the median) varies across
    seeds independently of the CSF-to-median ratio - what one gamma for the whole image cannot do."""
    from models.tmax_ddpm.data import random_intensity_curve

    v = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0, 1.2, 2.0, 4.9])
    gw, csf = [], []
    for seed in range(40):
        out = random_intensity_curve(v, 0.7, torch.Generator().manual_seed(seed))
        assert out[0] == 0.0
        assert torch.all(out.diff() > 0)
        assert abs(float(out[4]) - 1.0) < 1e-5
        gw.append(float(out[5] / out[3]))
        csf.append(float(out[1]))
    gw_a, csf_a = np.array(gw), np.array(csf)
    assert gw_a.max() > 1.5 and gw_a.min() < 1.25  # plain ratio 1.33
    # grey-white contrast is not a function of the dark end (a single gamma ties them together)
    assert abs(np.corrcoef(gw_a, csf_a)[0, 1]) < 0.6
    again = random_intensity_curve(v, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(again, random_intensity_curve(v, 0.7, torch.Generator().manual_seed(3)))
