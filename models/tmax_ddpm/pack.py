"""Training packs: many cases already on the model grid, 8-bit, in one compressed file.

Why: a GPU lent for a few minutes has no phantom generator (no nilearn, no atlas packages) and its
upload is capped (64 MiB a call here), while one phantom case is about 5 MB of NIfTI. On the model
grid the same case is the training cache's fp16 tensors; quantised to 8 bits and compressed it is
about 80 KB. ``synthperf train`` reads a pack wherever it reads a folder of cases.

Quantisation: the grey-level images (normalised: -1 outside the brain, about 0 at the brain median,
clamped to [-1, 4] as training augmentation does) in steps of 5/255 = 0.02; the model-space Tmax
([-1, 1]) in steps of 2/255 (about 0.08 s); the core and brain masks exactly, as bits. -1 (outside
the brain) is stored exactly. The quantisation noise (RMS 0.006 on the grey levels) is far below the
Rician noise that training adds on the fly (up to 0.08), so a model trained from a pack learns what
it learns from the folder; ``tests/unit/test_model_pack.py`` bounds the round-trip error.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import KNOWN_INPUTS

PACK_SUFFIX = ".npz"
FORMAT = "synthperf-training-pack/1"
_GREY_LO, _GREY_HI = -1.0, 4.0


def is_pack(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix == PACK_SUFFIX


def packs_in(folder: str | Path) -> list[Path]:
    """The packs directly inside ``folder`` when it holds packs and no case folders, else []: such a
    folder trains on all of them (a mixed model from two families' packs, with nothing rewritten)."""
    folder = Path(folder)
    if not folder.is_dir() or any(p.is_dir() for p in folder.iterdir()):
        return []
    return sorted(p for p in folder.iterdir() if is_pack(p))


def read_packs(paths: Sequence[str | Path], grid: int) -> dict:
    """Several packs as one cache; each case id is prefixed with its pack's name."""
    ids, items = [], []
    for p in paths:
        one = read_pack(p, grid)
        ids += [f"{Path(p).stem}/{cid}" for cid in one["ids"]]
        items += one["items"]
    return {"grid": grid, "ids": ids, "items": items}


def _q(x: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    v = (x.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))
    return v.round().to(torch.uint8).numpy()


def _dq(q: np.ndarray, lo: float, hi: float) -> torch.Tensor:
    return torch.from_numpy(q.astype(np.float32) * ((hi - lo) / 255.0) + lo)


def _bits(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.numpy().astype(bool).ravel())


def _unbits(b: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(b, count=n).astype(bool).reshape(shape))


def encode_item(item: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One cached case (data.case_to_grid's dict) -> the pack's arrays; channels that are NaN are left out."""
    cond = item["cond"]
    out: dict[str, np.ndarray] = {"shape": np.asarray(item["tmax"].shape, np.int32)}
    for i, name in enumerate(KNOWN_INPUTS):
        ch = cond[i]
        if torch.isnan(ch).any():
            continue
        out[name] = _bits(ch > 0) if name == "core" else _q(ch, _GREY_LO, _GREY_HI)
    out["tmax"] = _q(item["tmax"], -1.0, 1.0)
    out["brain"] = _bits(item["brain"])
    return out


def decode_item(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The inverse of encode_item, in the cache's dtypes (fp16 images, bool brain; missing channels NaN)."""
    shape = tuple(int(v) for v in arrays["shape"])
    chans = []
    for name in KNOWN_INPUTS:
        if name not in arrays:
            chans.append(torch.full(shape, float("nan")))
        elif name == "core":
            chans.append(torch.where(_unbits(arrays[name], shape), 1.0, -1.0))
        else:
            chans.append(_dq(arrays[name], _GREY_LO, _GREY_HI))
    return {
        "cond": torch.stack(chans).half(),
        "tmax": _dq(arrays["tmax"], -1.0, 1.0).half(),
        "brain": _unbits(arrays["brain"], shape),
    }


def write_pack(sources: Sequence[str | Path], grid: int, out: str | Path, progress: bool = False) -> dict:
    """Cases from case folders and/or packs (anything ``build_cache`` reads, all on ``grid``) -> one
    pack at ``out``.

    Case ids are prefixed with their source's name when there are several sources, so two phantom
    folders that both hold case_000000 stay two cases. Written to a temporary file, then renamed.
    """
    from .data import build_cache  # data imports this module

    if not sources:
        raise ValueError("sources: give at least one folder of cases or pack")
    out = Path(out)
    if out.suffix != PACK_SUFFIX:
        raise ValueError(f"out: a pack's name ends in {PACK_SUFFIX}, got {out.name}")
    arrays: dict[str, np.ndarray] = {}
    ids: list[str] = []
    for src in sources:
        src = Path(src)
        cache = build_cache(src, grid, None, progress=progress)  # in memory: no per-case cache files
        prefix = f"{src.stem}/" if len(sources) > 1 else ""
        for cid, item in zip(cache["ids"], cache["items"], strict=True):
            key = f"c{len(ids):06d}"
            ids.append(prefix + cid)
            for name, a in encode_item(item).items():
                arrays[f"{key}.{name}"] = a
    header = {"format": FORMAT, "grid": grid, "ids": ids}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    tmp.replace(out)
    return {"path": str(out), "cases": len(ids), "grid": grid, "bytes": out.stat().st_size}


def read_pack(path: str | Path, grid: int) -> dict:
    """A pack -> the training cache's dict (grid, ids, items). Refuses a pack made for another grid."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a training pack ({exc})") from exc
    with z:
        if "header" not in z.files:
            raise ValueError(f"{path}: not a training pack (no header)")
        header = json.loads(bytes(z["header"]).decode())
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: pack format {header.get('format')!r}, this version reads {FORMAT}")
        if int(header["grid"]) != grid:
            raise ValueError(f"{path}: the pack is on a {header['grid']} grid but the model's grid is {grid}; "
                             "pack the case folders again at this grid")
        by_key: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            if name != "header":
                key, field = name.split(".", 1)
                by_key.setdefault(key, {})[field] = z[name]
    items = [decode_item(by_key[k]) for k in sorted(by_key)]
    if len(items) != len(header["ids"]):
        raise ValueError(f"{path}: header names {len(header['ids'])} cases but the pack holds {len(items)}")
    return {"grid": grid, "ids": list(header["ids"]), "items": items}
