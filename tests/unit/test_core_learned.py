"""The optional learned core model: real MONAI networks saved as safetensors + JSON, loaded by the
pipeline, and the fallback to the rule when anything about the model is wrong.

No trained core weights exist in the project; the networks here are made in the test: a tiny 2-D
UNet is trained for a few seconds on hand-built volumes (tests.unit.test_core.make_synth) so that
its saved weights, reloaded through segment_core, must find a lesion in an unseen volume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from common.config import load_settings
from common.errors import ModelError
from tests.unit.test_core import SPACING, dice, make_synth
from worker.pipeline.core import CoreParams, _learned_inputs, load_core_model, segment_core

NET2D = {"spatial_dims": 2, "in_channels": 2, "out_channels": 1, "channels": [4, 8], "strides": [2],
         "num_res_units": 0, "norm": "batch"}
NET3D = {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "channels": [4, 8], "strides": [2],
         "num_res_units": 0, "norm": "batch"}


def save_model(net: torch.nn.Module, network: dict, path: Path, **extra: object) -> Path:
    weights = path / "core.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    cfg = {"architecture": "UNet", "network": network, "output": "sigmoid", "threshold": 0.5, **extra}
    weights.with_suffix(".json").write_text(json.dumps(cfg))
    return weights


@pytest.fixture(scope="module")
def trained_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    s = make_synth(1)
    # Slices and an in-plane window around the lesion keep the training to about a second.
    x = torch.from_numpy(_learned_inputs(s.adc, s.dwi, s.brain)).permute(1, 0, 2, 3)[13:25, :, 24:72, 32:80]
    y = torch.from_numpy(s.acute[13:25, None, 24:72, 32:80].astype(np.float32))
    assert y.sum() > 500
    net = UNet(**NET2D)
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a shared machine
    try:
        for _ in range(100):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y, pos_weight=torch.tensor(3.0))
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return save_model(net.eval(), NET2D, tmp_path_factory.mktemp("core2d"))


def test_trained_2d_model_finds_the_lesion_in_an_unseen_volume(trained_2d: Path) -> None:
    s = make_synth(2)
    r = segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(learned_weights=trained_2d, device="cpu"))
    assert r.method == "learned", r.warnings
    assert r.mask.shape == s.adc.shape and r.mask.dtype == bool
    assert dice(r.mask, s.acute) > 0.6
    # The same network untrained finds nothing useful: the weights really were loaded.
    (trained_2d.parent / "untrained").mkdir()
    untrained = save_model(UNet(**NET2D).eval(), NET2D, trained_2d.parent / "untrained")
    r0 = segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(learned_weights=untrained, device="cpu"))
    assert r0.method == "learned" and dice(r0.mask, s.acute) < 0.3


def test_3d_whole_volume_matches_direct_inference(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = UNet(**NET3D).eval()
    s = make_synth(4, shape=(20, 48, 40))
    weights = save_model(net, NET3D, tmp_path, threshold=0.5)
    params = CoreParams(learned_weights=weights, min_component_ml=0.0, device="cpu")
    r = segment_core(s.adc, s.dwi, s.brain, SPACING, params)
    assert r.method == "learned"
    x = torch.from_numpy(_learned_inputs(s.adc, s.dwi, s.brain))[None]
    x = torch.nn.functional.pad(x, (0, 8, 0, 0, 0, 12))  # z 20 -> 32, y 48, x 40 -> 48
    with torch.no_grad():
        p = torch.sigmoid(net(x))[0, 0, :20, :48, :40].numpy()
    expected = (p >= 0.5) & s.brain
    assert expected.any() and (r.mask == expected).all()


def test_3d_sliding_window_close_to_whole_volume(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = UNet(**NET3D).eval()
    s = make_synth(6, shape=(20, 48, 40))
    (tmp_path / "a").mkdir()
    whole = save_model(net, NET3D, tmp_path / "a")
    p_whole = CoreParams(learned_weights=whole, min_component_ml=0.0, device="cpu")
    m_whole = segment_core(s.adc, s.dwi, s.brain, SPACING, p_whole).mask
    (tmp_path / "b").mkdir()
    sw = save_model(net, NET3D, tmp_path / "b", roi_size=[16, 32, 32])
    r = segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(learned_weights=sw, min_component_ml=0.0, device="cpu"))
    assert r.method == "learned"
    agree = (r.mask == m_whole)[s.brain].mean()
    assert agree > 0.85, agree


def _broken(tmp_path: Path, how: str) -> Path:
    net = UNet(**NET2D)
    weights = save_model(net, NET2D, tmp_path)
    cfg = json.loads(weights.with_suffix(".json").read_text())
    if how == "architecture":
        cfg["architecture"] = "os.system"
    elif how == "shape":
        cfg["network"] = {**NET2D, "channels": [8, 16]}
    elif how == "sha":
        cfg["weights_sha256"] = "0" * 64
    elif how == "json":
        weights.with_suffix(".json").write_text("{not json")
        return weights
    elif how == "missing":
        return tmp_path / "nowhere.safetensors"
    weights.with_suffix(".json").write_text(json.dumps(cfg))
    return weights


@pytest.mark.parametrize(
    ("how", "message"),
    [("architecture", "not supported"), ("shape", "could not be loaded"), ("sha", "weights_sha256"),
     ("json", "not valid JSON"), ("missing", "not found")],
)
def test_bad_model_falls_back_to_rule_with_warning(tmp_path: Path, how: str, message: str) -> None:
    weights = _broken(tmp_path, how)
    with pytest.raises(ModelError, match=message):
        load_core_model(weights, "cpu")
    s = make_synth(0)
    r = segment_core(s.adc, s.dwi, s.brain, SPACING, CoreParams(learned_weights=weights, device="cpu"))
    assert r.method == "rule"
    assert any("fell back to the ADC rule" in w and message in w for w in r.warnings)
    assert dice(r.mask, s.acute) > 0.9


def test_sha256_that_matches_is_accepted(tmp_path: Path) -> None:
    weights = save_model(UNet(**NET2D).eval(), NET2D, tmp_path)
    cfg = json.loads(weights.with_suffix(".json").read_text())
    cfg["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.with_suffix(".json").write_text(json.dumps(cfg))
    net, loaded = load_core_model(weights, "cpu")
    assert loaded["weights_sha256"] == cfg["weights_sha256"] and not net.training


def test_settings_point_at_the_model(tmp_path: Path) -> None:
    weights = tmp_path / "m.safetensors"
    assert CoreParams.from_settings(load_settings(core_model_weights=str(weights))).learned_weights == weights
    assert CoreParams.from_settings(load_settings()).learned_weights is None
