"""Unit tests for the Tmax DDPM package: shapes, preprocessing, loss weighting, schedulers, sampling.

Tiny networks on 32^2 grids keep these fast. ``write_synthetic_case`` makes small stroke-like cases in
the training layout (used by test_model_train.py too).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from models.tmax_ddpm.config import ABLATIONS, Config, ModelConfig
from models.tmax_ddpm.diffusion import (
    ddim_step,
    ddim_timesteps,
    make_scheduler,
    predict_x0_eps,
    training_target,
)
from models.tmax_ddpm.loss import perfusion_weights, weighted_mse
from models.tmax_ddpm.network import build_network
from models.tmax_ddpm.preprocess import (
    Geometry,
    from_grid,
    normalise_image,
    prepare_conditioning,
    stack_neighbours,
    tmax_from_model,
    tmax_to_model,
    to_grid,
)
from models.tmax_ddpm.sampler import correlated_noise, sample_volume

#: one intra-op thread (tests/conftest.py: one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = {"grid": 32, "channels": (16, 32), "attention_levels": (False, False), "norm_num_groups": 8,
        "num_res_blocks": 1, "num_head_channels": 16}


def tiny_config(**model_kw) -> Config:
    return Config.from_dict({"model": {**TINY, **model_kw}})


def synthetic_arrays(seed: int, shape=(7, 40, 48)) -> dict[str, np.ndarray]:
    """A stroke-like case: elliptic brain, two territories (left/right), core blob, Tmax>6 around it."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    cy, cx = ny / 2, nx / 2
    brain = ((y - cy) / (0.42 * ny)) ** 2 + ((x - cx) / (0.42 * nx)) ** 2 < 1
    territory = np.where(brain, np.where(x < cx, 1, 2), 0)
    side = rng.integers(1, 3)
    ly = cy + rng.uniform(-0.15, 0.15) * ny
    lx = cx + (-1 if side == 1 else 1) * rng.uniform(0.12, 0.25) * nx
    r = rng.uniform(3, 6)
    d2 = (y - ly) ** 2 + (x - lx) ** 2 + (2.0 * (z - nz / 2)) ** 2
    core = (d2 < r**2) & brain
    hypo = brain & (territory == side) & (d2 < (2.6 * r) ** 2)
    tmax = np.where(hypo, 9 + 6 * np.exp(-d2 / (2 * r**2)), 1.0 + 0.5 * rng.random(shape)) * brain
    gain = rng.uniform(200, 900)
    dwi = gain * (1 + 1.2 * core + 0.05 * rng.standard_normal(shape)) * brain
    adc = np.where(core, 450.0, 800.0) * brain
    flair = gain * 0.8 * (1 + 0.3 * core + 0.05 * rng.standard_normal(shape)) * brain
    return {"dwi": dwi, "adc": adc, "flair": flair, "core": core.astype(np.float32), "tmax": tmax,
            "brain": brain.astype(np.float32), "territory": territory.astype(np.float32),
            "b0": dwi * 1.5}


def write_synthetic_case(root: Path, case_id: str, seed: int, shape=(7, 40, 48)) -> Path:
    d = root / case_id
    d.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.8, 1.8, 5.0, 1.0])
    for name, arr in synthetic_arrays(seed, shape).items():
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32).transpose(2, 1, 0), affine), str(d / f"{name}.nii.gz"))
    (d / "truth.json").write_text('{"vendor": "synthetic-test"}')
    return d


# --- config -----------------------------------------------------------------------------------------

def test_config_roundtrip_and_validation():
    cfg = tiny_config()
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="slices"):
        ModelConfig(slices=4)
    with pytest.raises(ValueError, match="inputs"):
        ModelConfig(inputs=("dwi", "perfusion"))
    with pytest.raises(ValueError, match="unknown keys"):
        Config.from_dict({"model": {"gird": 64}})
    abl = Config.from_dict({"ablation": "dwi+flair+core+adc"})
    assert abl.model.inputs == ABLATIONS["dwi+flair+core+adc"]
    assert abl.model.in_channels == 4 * 5 + 1


# --- preprocessing ----------------------------------------------------------------------------------

def test_normalisation_cancels_scanner_gain():
    a = synthetic_arrays(1)
    brain = a["brain"] > 0
    n1 = normalise_image(a["dwi"], brain, "dwi")
    n2 = normalise_image(a["dwi"] * 7.3, brain, "dwi")
    np.testing.assert_allclose(n1, n2, atol=1e-5)
    assert np.all(n1[~brain] == -1)
    assert abs(np.median(n1[brain])) < 0.05


def test_tmax_scaling_roundtrip_and_clipping():
    t = np.array([-3.0, 0.0, 6.0, 20.0, 35.0])
    m = tmax_to_model(t)
    np.testing.assert_allclose(m, [-1, -1, -0.4, 1, 1], atol=1e-6)
    np.testing.assert_allclose(tmax_from_model(m), [0, 0, 6, 20, 20], atol=1e-5)


def test_grid_roundtrip_preserves_smooth_images():
    geo = Geometry.for_shape(40, 48, 32)
    yy, xx = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 48), indexing="ij")
    img = np.stack([np.sin(3 * yy) + xx] * 3).astype(np.float32)
    g = to_grid(img, geo, background=0.0)
    assert g.shape == (3, 32, 32)
    back = from_grid(g, geo)
    assert back.shape == img.shape
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(back[inner] - img[inner]).max() < 0.1


def test_stack_neighbours_order_and_edges():
    cond = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1, 1).expand(2, 4, 3, 3)
    s = stack_neighbours(cond, 3)
    assert s.shape == (4, 6, 3, 3)
    # slice 0, image 0: neighbours z=-1 (edge -> 0), 0, 1
    assert s[0, :3, 0, 0].tolist() == [0, 0, 1]
    # slice 3, image 1: z=2,3,4->3 of image 1 (values 4..7)
    assert s[3, 3:, 0, 0].tolist() == [6, 7, 7]


def test_prepare_conditioning_shapes_and_missing_input():
    a = synthetic_arrays(2)
    cond, geo = prepare_conditioning(a, a["brain"], ("dwi", "flair", "core"), 32)
    assert cond.shape == (3, 7, 32, 32)
    assert set(torch.unique(cond[2]).tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="adc"):
        prepare_conditioning({**a, "adc": None}, a["brain"], ("dwi", "adc"), 32)


# --- network and loss -------------------------------------------------------------------------------

def test_network_shapes_follow_ablation():
    for abl, inputs in ABLATIONS.items():
        cfg = tiny_config(inputs=inputs)
        net = build_network(cfg.model)
        x = torch.randn(2, cfg.model.in_channels, 32, 32)
        out = net(x, torch.tensor([3, 500]))
        assert out.shape == (2, 1, 32, 32), abl


def test_perfusion_weights_emphasise_hypoperfusion_and_border():
    x0 = torch.full((1, 1, 16, 16), float(tmax_to_model(np.array(2.0))))
    x0[..., 4:12, 4:12] = float(tmax_to_model(np.array(10.0)))
    w = perfusion_weights(x0, 6.0, hypo_weight=2.0, border_weight=3.0, border_px=1)
    assert w[0, 0, 0, 0] == 1.0  # far background
    assert w[0, 0, 8, 8] == 3.0  # deep inside: 1 + hypo
    assert w[0, 0, 4, 4] == 6.0  # inner border pixel: 1 + hypo + border
    assert w[0, 0, 3, 8] == 4.0  # outer border pixel: 1 + border
    w0 = perfusion_weights(x0, 6.0, hypo_weight=0.0, border_weight=0.0)
    assert torch.all(w0 == 1)
    # an error inside the lesion costs more than the same error in the background
    pred_in, pred_out = x0.clone(), x0.clone()
    pred_in[..., 8, 8] += 0.5
    pred_out[..., 0, 0] += 0.5
    assert weighted_mse(pred_in, x0, w) > weighted_mse(pred_out, x0, w)


# --- diffusion --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_scheduler_round_trip_recovers_x0(kind):
    cfg = tiny_config(prediction_type=kind)
    sched = make_scheduler(cfg.model)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((4, 1, 8, 8), generator=g) * 2 - 1
    noise = torch.randn((4, 1, 8, 8), generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, noise, t)
    target = training_target(sched, x0, noise, t)
    x0_hat, eps_hat = predict_x0_eps(sched, target, xt, t)
    np.testing.assert_allclose(x0_hat.numpy(), x0.numpy(), atol=2e-3)
    # with a perfect network a single DDIM jump from t=999 lands on x0
    x_prev, _ = ddim_step(sched, target[3:], 999, -1, xt[3:])
    np.testing.assert_allclose(x_prev.numpy(), x0[3:].numpy(), atol=2e-3)


def test_ddim_timesteps_start_at_noise_and_descend():
    ts = ddim_timesteps(1000, 10)
    assert ts[0] == 999 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


def test_correlated_noise_keeps_unit_variance_and_correlates_neighbours():
    g = torch.Generator().manual_seed(0)
    n = correlated_noise(64, 6, 16, 16, rho=0.8, generator=g)
    assert n.shape == (64, 6, 1, 16, 16)
    assert abs(float(n.std()) - 1) < 0.05
    c = torch.corrcoef(torch.stack([n[:, 2].flatten(), n[:, 3].flatten()]))[0, 1]
    assert 0.75 < float(c) < 0.85


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    torch.manual_seed(0)
    cfg = tiny_config()
    net = build_network(cfg.model).eval()
    sched = make_scheduler(cfg.model)
    cond = torch.randn(5, cfg.model.in_channels - 1, 32, 32)
    a = sample_volume(net, sched, cond, steps=3, samples=2, seed=11)
    b = sample_volume(net, sched, cond, steps=3, samples=2, seed=11)
    c = sample_volume(net, sched, cond, steps=3, samples=2, seed=12)
    assert a.shape == (2, 5, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
