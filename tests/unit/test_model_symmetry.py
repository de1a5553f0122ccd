"""Mirror-difference channels (models/tmax_ddpm/symmetry.py): the midline found on phantom studies of
both families, carried through the training augmentation, and a network widened for the new channels."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from models.registry import resolve
from models.tmax_ddpm.checkpoint import load_weights
from models.tmax_ddpm.config import Config, ModelConfig, model_config_hash
from models.tmax_ddpm.data import SliceBank
from models.tmax_ddpm.network import build_network
from models.tmax_ddpm.preprocess import Geometry, normalise_image, stack_neighbours, to_grid
from models.tmax_ddpm.symmetry import (
    append_mirror_differences,
    case_midline,
    mirror_difference,
    transform_midline,
)
from models.train import _adds_mirror_channels, widen_input_conv

#: one intra-op thread (tests/conftest.py: one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _flair_on_grid(case, grid: int = 64) -> torch.Tensor:
    geo = Geometry.for_shape(case.brain.shape[1], case.brain.shape[2], grid)
    return to_grid(normalise_image(case.flair_on_dwi, case.brain, "flair")[None], geo, background=-1.0)[0]


@pytest.fixture(scope="module")
def studies() -> list[tuple[dict, torch.Tensor]]:
    """Four randomised phantom studies, two per family, with their drawn head tilt."""
    from phantom.api import make_case

    out = []
    for seed, family in ((900001, "geometric"), (900002, "geometric"), (900003, "template"), (900004, "template")):
        case = make_case(seed, family=family, randomise=True)
        out.append((case.truth, _flair_on_grid(case)))
    return out


def test_midline_follows_the_drawn_head_yaw(studies) -> None:
    """The fitted tilt is the negative of the phantom's yaw (the grid's y axis points the other way)
    within 6 degrees; before any fit every study would be off by its whole yaw (up to 12)."""
    errors = []
    for truth, flair in studies:
        yaw = truth["anatomy"]["head_tilt_deg"][2]
        tilt = math.degrees(float(case_midline(flair)[0, 2]))
        errors.append(abs(tilt + yaw))
    assert max(errors) < 6.0, errors


def test_mirror_difference_cancels_a_symmetric_head_and_keeps_a_one_sided_sign(studies) -> None:
    """On a real phantom slice a bright spot placed on one side stays positive in the difference and
    its mirror position turns negative; and the fitted midline leaves less difference in the head than
    a line 4 pixels and 12 degrees away from it."""
    _, flair = studies[0]
    mid = case_midline(flair)
    z = int(torch.argmax((flair > -0.6).float().sum(dim=(1, 2))))
    stack = stack_neighbours(flair[None], 5)[z : z + 1]  # (1, 5, g, g)
    base = mirror_difference(stack, mid[z : z + 1])[0, 2]
    spot = stack.clone()
    cx = int(round((float(mid[z, 0]) + 1) / 2 * 64 - 0.5))
    cy = int(round((float(mid[z, 1]) + 1) / 2 * 64 - 0.5))
    spot[0, :, cy - 1 : cy + 2, cx + 12 : cx + 15] += 3.0
    diff = mirror_difference(spot, mid[z : z + 1])[0, 2]
    assert float(diff[cy, cx + 13]) > 2.0
    assert float(diff[cy, cx - 14 : cx - 11].min()) < -1.0
    head = stack[0, 2] > -0.6
    off = mid[z : z + 1] + torch.tensor([[0.125, 0.0, math.radians(12.0)]])
    wrong = mirror_difference(stack, off)[0, 2]
    assert float(base[head].abs().mean()) < 0.8 * float(wrong[head].abs().mean())


def test_midline_moves_with_flip_and_affine(studies) -> None:
    """Carrying the midline through a flip and a rotation/scale/shift gives the midline fitted on the
    transformed image (within 3 degrees and 0.05 of the grid)."""
    import torch.nn.functional as F

    _, flair = studies[2]
    z = int(torch.argmax((flair > -0.6).float().sum(dim=(1, 2))))
    vol = flair[z - 2 : z + 3]  # a few slices: case_midline fits the tilt over them
    mid = case_midline(vol)[2:3]
    ang, sc = math.radians(7.0), 1.05
    theta = torch.tensor([[[math.cos(ang) / sc, -math.sin(ang) / sc, 0.06],
                           [math.sin(ang) / sc, math.cos(ang) / sc, -0.04]]])
    flipped = vol.flip(-1)[None]
    grid = F.affine_grid(theta, list(flipped.shape), align_corners=False)
    moved = F.grid_sample(flipped + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] - 1
    carried = transform_midline(mid, torch.tensor([True]), theta)[0]
    refit = case_midline(moved)[2]
    assert abs(math.degrees(float(carried[2] - refit[2]))) < 3.0
    assert float((carried[:2] - refit[:2]).abs().max()) < 0.05


def test_slice_bank_appends_mirror_channels(tmp_path) -> None:
    from models.tmax_ddpm.data import build_cache
    from tests.unit.test_model import write_synthetic_case

    for i in range(2):
        write_synthetic_case(tmp_path / "cases", f"case_{i:03d}", seed=i)
    cache = build_cache(tmp_path / "cases", 32, None, progress=False)
    cfg = Config().train
    plain = SliceBank(cache, ("dwi", "flair", "core"), 5, cfg)
    mirrored = SliceBank(cache, ("dwi", "flair", "core"), 5, cfg, mirror_diff=("flair",))
    c0, x0 = plain.batch([0, 1], torch.Generator().manual_seed(0), augment=False)
    c1, x1 = mirrored.batch([0, 1], torch.Generator().manual_seed(0), augment=False)
    assert c1.shape == (2, 20, 32, 32)
    torch.testing.assert_close(c1[:, :15], c0)
    torch.testing.assert_close(x1, x0)
    c2, _ = mirrored.batch([0, 1], torch.Generator().manual_seed(0), augment=True)
    assert c2.shape == (2, 20, 32, 32) and torch.isfinite(c2).all()
    with pytest.raises(ValueError, match="mid"):
        append_mirror_differences(c0, ("dwi", "flair", "core"), ("flair",), 5, None)


def test_config_validates_mirror_diff_and_keeps_old_hashes() -> None:
    with pytest.raises(ValueError, match="mirror_diff"):
        ModelConfig(mirror_diff=("core",))
    with pytest.raises(ValueError, match="mirror_diff"):
        ModelConfig(inputs=("dwi",), mirror_diff=("flair",))
    assert ModelConfig(mirror_diff=("flair",)).in_channels == 21
    # the shipped weights were hashed before the field existed; they still load
    _, cfg = load_weights(resolve("demo"))
    assert model_config_hash(cfg.model) != model_config_hash(dataclasses.replace(cfg.model, mirror_diff=("flair",)))


def test_widened_network_starts_as_the_old_one() -> None:
    """Zero weights on the new channels: whatever they hold, the widened network's output is the old one's."""
    net, cfg = load_weights(resolve("demo"))
    wide_cfg = dataclasses.replace(cfg.model, mirror_diff=("flair",))
    assert _adds_mirror_channels(cfg.model, wide_cfg)
    assert not _adds_mirror_channels(cfg.model, dataclasses.replace(wide_cfg, grid=96))
    wide = build_network(wide_cfg)
    wide.load_state_dict(widen_input_conv(net.state_dict(), cfg.model, wide_cfg))
    wide.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 64, 64, generator=g)
    extra = 3 * torch.randn(3, 5, 64, 64, generator=g)
    t = torch.tensor([5, 400, 990])
    with torch.no_grad():
        np.testing.assert_allclose(wide(torch.cat([x[:, :15], extra, x[:, 15:]], 1), t).numpy(),
                                   net(x, t).numpy(), atol=1e-5)


def test_warm_start_widens_then_a_mirror_model_synthesizes(tmp_path) -> None:
    """A run with mirror channels starts from weights without them (the old config plus mirror_diff,
    nothing else), trains on, and the exported model synthesizes a study; any other change is refused."""
    from models.tmax_ddpm.checkpoint import CheckpointError
    from models.tmax_ddpm.inference import TmaxSynthesizer
    from models.train import train
    from tests.unit.test_model import synthetic_arrays, write_synthetic_case
    from tests.unit.test_model_train import tiny_train_config

    for i in range(3):
        write_synthetic_case(tmp_path / "cases", f"case_{i:03d}", seed=i)
    train(tmp_path / "cases", tmp_path / "plain", tiny_train_config(6), progress=False)
    wide = tiny_train_config(9)
    wide.model = dataclasses.replace(wide.model, mirror_diff=("flair",))
    s = train(tmp_path / "cases", tmp_path / "wide", wide, progress=False, init_from=tmp_path / "plain" / "export")
    assert s["step"] == 9
    synth = TmaxSynthesizer.load(str(tmp_path / "wide" / "export"), device="cpu", inference_path="fp32")
    assert synth.cfg.model.in_channels == 21
    a = synthetic_arrays(5, shape=(6, 44, 36))
    r = synth.synthesize(a["dwi"], a["flair"], a["core"], a["brain"], spacing_zyx=(5, 1.8, 1.8), steps=1, samples=2)
    assert r.mean.shape == (6, 44, 36) and np.isfinite(r.mean).all()
    other = tiny_train_config(9)
    other.model = dataclasses.replace(other.model, mirror_diff=("flair",), slices=3)
    with pytest.raises(CheckpointError, match="different model config"):
        train(tmp_path / "cases", tmp_path / "other", other, progress=False, init_from=tmp_path / "plain" / "export")
