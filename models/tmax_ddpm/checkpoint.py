"""Exported weights: safetensors + config.json + sha256, and their verified loading.

Why all three: the sha256 proves the tensor file is the one that was released (no silent corruption
or swap), and config.json rebuilds the exact network and preprocessing; its hash is also stored in
the safetensors metadata so a config edited after export is caught.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Config, model_config_hash
from .network import build_network

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SHA_FILE = "model.safetensors.sha256"
INFO_FILE = "info.json"


class CheckpointError(ValueError):
    """A weights directory that cannot be trusted or used; the message says what to do."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_weights(state_dict: dict[str, torch.Tensor], cfg: Config, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write the three files atomically-ish (temp names, then rename). Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"config_sha256": model_config_hash(cfg.model), "format": "synthperf-tmax-ddpm/1"})
    digest = sha256_file(tmp)
    (out / (CONFIG_FILE + ".tmp")).write_text(cfg.to_json() + "\n")
    (out / (SHA_FILE + ".tmp")).write_text(f"{digest}  {WEIGHTS_FILE}\n")
    if info is not None:
        (out / (INFO_FILE + ".tmp")).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (out / (INFO_FILE + ".tmp")).replace(out / INFO_FILE)
    tmp.replace(out / WEIGHTS_FILE)
    (out / (CONFIG_FILE + ".tmp")).replace(out / CONFIG_FILE)
    (out / (SHA_FILE + ".tmp")).replace(out / SHA_FILE)
    return out


def load_weights(weights_dir: str | Path, map_location: str = "cpu") -> tuple[torch.nn.Module, Config]:
    """Verify sha256 and config, build the network, load the tensors strictly."""
    d = Path(weights_dir)
    wf, cf, sf = d / WEIGHTS_FILE, d / CONFIG_FILE, d / SHA_FILE
    for f in (wf, cf, sf):
        if not f.exists():
            raise CheckpointError(f"{f}: missing; a weights directory needs {WEIGHTS_FILE}, {CONFIG_FILE} and {SHA_FILE}")
    expected = sf.read_text().split()[0].strip().lower()
    actual = sha256_file(wf)
    if actual != expected:
        raise CheckpointError(
            f"{wf}: sha256 mismatch (file {actual[:12]}..., expected {expected[:12]}... from {sf.name}); "
            "the weights are corrupt or were replaced — re-export them or restore the original files"
        )
    try:
        cfg = Config.from_dict(json.loads(cf.read_text()))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cf}: invalid model config: {exc}") from exc
    with safe_open(str(wf), framework="pt") as f:
        meta = f.metadata() or {}
    want = model_config_hash(cfg.model)
    if meta.get("config_sha256") != want:
        raise CheckpointError(
            f"{cf}: the model config does not match the one the weights were exported with "
            f"(config hash {want[:12]}..., weights say {str(meta.get('config_sha256'))[:12]}...); "
            "use the config.json that was exported with these weights"
        )
    net = build_network(cfg.model)
    state = load_file(str(wf), device=map_location)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{wf}: tensors do not fit the network described by {cf.name}: {exc}") from exc
    net.eval()
    return net, cfg


def read_info(weights_dir: str | Path) -> dict:
    f = Path(weights_dir) / INFO_FILE
    return json.loads(f.read_text()) if f.exists() else {}
