"""Training packs (cases on the model grid, 8-bit, one file) and batches built ahead by worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.procs import spawned_pool
from models.tmax_ddpm.checkpoint import load_weights
from models.tmax_ddpm.config import Config
from models.tmax_ddpm.data import SliceBank, StepBatches, build_cache, step_loader
from models.tmax_ddpm.pack import read_pack, write_pack
from models.train import train
from tests.unit.test_model import TINY, write_synthetic_case

#: one intra-op thread (tests/conftest.py: one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    for i in range(3):
        write_synthetic_case(root, f"case_{i:03d}", seed=10 + i)
    return root


def config(steps: int, loader_workers: int = 0) -> Config:
    return Config.from_dict({
        "model": TINY,
        "train": {"steps": steps, "batch_size": 4, "log_every": 2, "lr_warmup": 2, "lr": 1e-3, "seed": 5,
                  "num_threads": 1, "bf16_cpu": False, "loader_workers": loader_workers},
    })


def test_pack_round_trip_stays_within_half_a_quantisation_step(cases: Path, tmp_path: Path):
    cache = build_cache(cases, 32, tmp_path / "c", progress=False)
    info = write_pack([cases], 32, tmp_path / "p.npz")
    assert info["cases"] == 3 and info["bytes"] > 0
    pack = read_pack(tmp_path / "p.npz", 32)
    assert pack["ids"] == cache["ids"] == ["case_000", "case_001", "case_002"]
    fp16 = 4.0 * 2**-10  # fp16 spacing near 4, the top of the grey-level range
    for a, b in zip(cache["items"], pack["items"], strict=True):
        assert a["cond"].shape == b["cond"].shape and a["cond"].dtype == b["cond"].dtype == torch.float16
        for ch in range(a["cond"].shape[0]):
            x, y = a["cond"][ch].float(), b["cond"][ch].float()
            assert torch.equal(torch.isnan(x), torch.isnan(y)), ch  # a channel the case lacks stays missing
            if torch.isnan(x).all():
                continue
            err = (x.clamp(-1, 4) - y).abs().max()
            assert err <= 2.5 / 255 + fp16, (ch, float(err))
            assert torch.equal(x == -1, y == -1), ch  # outside the brain is kept exactly
        assert (a["tmax"].float() - b["tmax"].float()).abs().max() <= 1 / 255 + 2**-10
        assert torch.equal(a["brain"], b["brain"])
    core = 2  # KNOWN_INPUTS index: stored as bits, so exact
    assert all(torch.equal(a["cond"][core], b["cond"][core]) for a, b in zip(cache["items"], pack["items"], strict=True))


def test_packs_merge_with_prefixed_ids_and_bad_packs_are_refused(cases: Path, tmp_path: Path):
    write_pack([cases], 32, tmp_path / "one.npz")
    merged = write_pack([cases, tmp_path / "one.npz"], 32, tmp_path / "both.npz")
    assert merged["cases"] == 6
    ids = read_pack(tmp_path / "both.npz", 32)["ids"]
    assert ids[:3] == [f"{cases.name}/case_00{i}" for i in range(3)] and ids[3:] == [f"one/case_00{i}" for i in range(3)]
    (tmp_path / "folder").mkdir()
    for name in ("one", "both"):
        (tmp_path / "folder" / f"{name}.npz").symlink_to(tmp_path / f"{name}.npz")
    folder = build_cache(tmp_path / "folder", 32, tmp_path / "unused", progress=False)  # a folder of packs
    assert len(folder["ids"]) == 9 and folder["ids"][0] == f"both/{cases.name}/case_000"
    assert folder["ids"][-1] == "one/case_002" and not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="32 grid but the model's grid is 64"):
        read_pack(tmp_path / "one.npz", 64)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a training pack"):
        read_pack(tmp_path / "other.npz", 32)
    with pytest.raises(ValueError, match="ends in .npz"):
        write_pack([cases], 32, tmp_path / "p.zip")


def _batches(cases: Path, cache_dir: Path, workers: int) -> list:
    """Steps 3..6 of a run on ``cases`` as the loader hands them out, with ``workers`` forked workers."""
    torch.set_num_threads(1)
    cfg = config(10)
    bank = SliceBank(build_cache(cases, 32, cache_dir, progress=False), cfg.model.inputs, cfg.model.slices,
                     cfg.train)
    return list(step_loader(StepBatches(bank, 4, 1000, seed=5), 3, 7, workers=workers, pin_memory=False))


def _in_a_fresh_process(fn, *args):  # noqa: ANN001, ANN202
    """Run ``fn`` in a spawned interpreter. The loader forks its workers, and a fork inherits whatever
    earlier tests left in this pytest process: a Celery/kombu Redis connection made a forked child hang
    in kombu's after-fork clean-up (seen here). ``synthperf train`` is a process of its own."""
    with spawned_pool(1) as pool:
        return pool.submit(fn, *args).result(timeout=300)


def test_step_batches_are_the_same_whatever_the_number_of_workers(cases: Path, tmp_path: Path):
    inline = _batches(cases, tmp_path / "c0", 0)
    ahead = _in_a_fresh_process(_batches, cases, tmp_path / "c2", 2)
    assert len(inline) == len(ahead) == 4
    for a, b in zip(inline, ahead, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(inline[0][0], inline[1][0])  # each step its own batch
    cfg = config(10)
    bank = SliceBank(build_cache(cases, 32, tmp_path / "c0", progress=False), cfg.model.inputs, cfg.model.slices,
                     cfg.train)
    assert not torch.equal(StepBatches(bank, 4, 1000, seed=5, rank=1)[3][0], inline[0][0])  # ranks differ


def _stopped_and_resumed_equals_unbroken(tmp_path: Path, cases: Path, workers: int) -> bool:
    """Train 6 steps straight, and 3 then 3 more after a resume, from one pack; True when the exported
    weights are identical."""
    torch.set_num_threads(1)
    write_pack([cases], 32, tmp_path / "p.npz")
    straight = train(tmp_path / "p.npz", tmp_path / "a", config(6, workers), device="cpu", progress=False)
    assert straight["finished"] and straight["step"] == 6
    assert json.loads((tmp_path / "a" / "export" / "info.json").read_text())["cases"] == 3
    train(tmp_path / "p.npz", tmp_path / "b", config(3, workers), device="cpu", progress=False)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["train"]["steps"] = 6
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    train(tmp_path / "p.npz", tmp_path / "b", None, device="cpu", progress=False)
    a, _ = load_weights(tmp_path / "a" / "export")
    b, _ = load_weights(tmp_path / "b" / "export")
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_a_pack_resumes_to_the_same_weights(cases: Path, tmp_path: Path, workers: int):
    """A pack trains like a folder; a run stopped and resumed ends exactly where an unbroken run ends,
    in process (the checkpoint holds the generator) and with loader workers (batch k comes from step
    k's own generator). Both runs start from the same weights: the run's seed draws them."""
    if workers:
        assert _in_a_fresh_process(_stopped_and_resumed_equals_unbroken, tmp_path, cases, workers)
    else:
        assert _stopped_and_resumed_equals_unbroken(tmp_path, cases, workers)
