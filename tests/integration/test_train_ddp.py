"""`synthperf train` beyond one process: torchrun with two ranks (DDP, gloo on the CPU).

Both ranks train a tiny network on a few phantom cases; the loss falls, the ranks end with the same
weights (each hashes its own, all-gathered), and those are the weights rank 0 checkpointed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from models.tmax_ddpm.config import Config
from models.tmax_ddpm.network import build_network
from models.train import weights_digest
from tests.conftest import free_port
from tests.unit.test_model import TINY

STEPS = 30


def summaries(stdout: str) -> list[dict]:
    """The JSON summaries the ranks printed, one after the other."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := stdout.find("{", i)) >= 0:
        obj, i = dec.raw_decode(stdout, i)
        out.append(obj)
    return out


def test_torchrun_two_ranks_train_and_agree_on_the_weights(tmp_path: Path):
    from phantom.api import make_case, write_training_case

    cases = tmp_path / "cases"
    for seed in (900, 901):
        write_training_case(make_case(seed), cases)
    cfg = {"model": TINY,
           "train": {"steps": STEPS, "batch_size": 8, "log_every": 5, "lr_warmup": 5, "lr": 1e-3, "seed": 3,
                     "num_threads": 1, "bf16_cpu": False},
           "sample": {"steps": 3, "samples": 2}}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "cli.main", "train", str(cases), "--out", str(run), "--config", str(tmp_path / "tiny.json"),
         "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = {s["rank"]: s for s in summaries(proc.stdout)}
    assert sorted(ranks) == [0, 1]
    digests = ranks[0]["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert ranks[1]["weight_digests"] == digests
    assert all(s["world_size"] == 2 and s["step"] == STEPS and s["finished"] for s in ranks.values())
    # the loss (averaged over both ranks) falls
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h[0] for h in history] == list(range(5, STEPS + 1, 5))
    assert history[-1][1] < 0.7 * history[0][1], history
    # rank 0's checkpoint holds the weights both ranks agree on
    net = build_network(Config.from_dict(cfg).model)
    net.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["net"])
    assert weights_digest(net) == digests[0]
    assert (run / "export" / "model.safetensors").is_file()
