"""Training data: a folder of cases as NIfTI on one grid, cached on the model grid, 2.5D batches.

Layout per case (what the phantom's fast path writes and a site can export from its DSC-PWI data):
``<root>/<case_id>/{dwi,adc,flair,core,tmax,brain}.nii.gz`` (+ optional b0, territory, truth.json, and
brain_served: the service's own brain mask made from the b0 by ``synthperf dataset served-masks``).
Arrays are handled as (z, y, x): the transpose of nibabel's (x, y, z), which equals what
SimpleITK's GetArrayFromImage returns for the same file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .config import KNOWN_INPUTS, TrainConfig, check_input_mask
from .pack import is_pack, packs_in, read_pack, read_packs
from .preprocess import Geometry, normalise_image, stack_neighbours, tmax_to_model, to_grid

REQUIRED = ("dwi", "flair", "core", "tmax", "brain")


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(z, y, x) float32 array and its spacing (z, y, x) in mm."""
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    zooms = tuple(float(v) for v in img.header.get_zooms()[:3])
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def lps_direction(path: Path) -> tuple[float, ...]:
    """The NIfTI's voxel axes as a SimpleITK direction matrix (LPS, unit columns, row-major): what the
    core rule needs to tell left from right and the skull base from the vertex on a NIfTI case."""
    aff = nib.load(str(path)).affine[:3, :3]
    d = np.diag([-1.0, -1.0, 1.0]) @ aff / np.linalg.norm(aff, axis=0)
    return tuple(float(v) for v in d.ravel())


def list_cases(root: str | Path, require: tuple[str, ...] = REQUIRED) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found (expected <root>/<case_id>/dwi.nii.gz ...)")
    cases = sorted(p for p in root.iterdir() if p.is_dir() and all((p / f"{n}.nii.gz").exists() for n in require))
    if not cases:
        raise FileNotFoundError(
            f"{root}: no case folders with {', '.join(n + '.nii.gz' for n in require)}; "
            "generate some with `synthperf phantom --out DIR --cases N --training-only`"
        )
    return cases


@dataclass
class Case:
    case_id: str
    images: dict[str, np.ndarray]  # raw volumes by name (z, y, x)
    spacing_zyx: tuple[float, float, float]
    truth: dict

    @property
    def brain(self) -> np.ndarray:
        return self.images["brain"] > 0


def load_case(case_dir: str | Path, names: tuple[str, ...] | None = None) -> Case:
    case_dir = Path(case_dir)
    names = names or tuple(
        n for n in ("dwi", "adc", "flair", "core", "tmax", "brain", "brain_served", "territory")
        if (case_dir / f"{n}.nii.gz").exists()
    )
    images, spacing = {}, (1.0, 1.0, 1.0)
    for n in names:
        images[n], spacing = read_nifti(case_dir / f"{n}.nii.gz")
    truth_file = case_dir / "truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.exists() else {}
    return Case(case_dir.name, images, spacing, truth)


def case_to_grid(case: Case, grid: int, input_mask: str = "brain") -> dict[str, torch.Tensor]:
    """All known conditioning images (missing ones NaN-filled), Tmax and brain on the model grid (fp16).

    ``input_mask``: the mask the inputs are normalised in and set to background outside of. The
    service makes its mask from the b0 (a median 1.1x the phantom's true brain; up to 2.3x on the
    training mix), so a model trained inside the true brain sees at inference a rim of CSF and skull
    it never saw, and calls hypoperfusion there. With ``"brain_served"`` it learns that rim with the
    truth it has: no Tmax outside the true brain. The target is the truth Tmax inside the true brain
    and 0 s elsewhere either way (the phantom writes 0 s there already)."""
    check_input_mask(input_mask)
    if input_mask not in case.images:
        raise ValueError(f"{case.case_id}: no {input_mask}.nii.gz; write it with `synthperf dataset served-masks`")
    brain = case.brain
    mask = case.images[input_mask] > 0
    geo = Geometry.for_shape(brain.shape[1], brain.shape[2], grid)
    chans = []
    for name in KNOWN_INPUTS:
        if name in case.images:
            chans.append(normalise_image(case.images[name], mask, name))
        else:
            chans.append(np.full(brain.shape, np.nan, np.float32))
    cond = to_grid(np.stack(chans), geo, background=-1.0)
    ci = KNOWN_INPUTS.index("core")
    cond[ci] = torch.where(cond[ci] > 0, 1.0, -1.0)
    tmax = to_grid(tmax_to_model(np.where(brain, np.nan_to_num(case.images["tmax"]), 0.0)), geo, background=-1.0)
    brain_g = to_grid(brain.astype(np.float32), geo, background=0.0) > 0.5
    return {"cond": cond.half(), "tmax": tmax.half(), "brain": brain_g}


def build_cache(root: str | Path, grid: int, cache_dir: str | Path | None, progress: bool = True,
                input_mask: str = "brain") -> dict:
    """Preprocess every case once (normalise + resample), one file per case, reused on resume and
    when cases are added to the data folder (``cache_dir`` None: kept in memory only, as packing
    does). ``root`` may also be a training pack (pack.py), or a folder of packs: their cases are
    already on the grid, so nothing is cached, and they were made inside the true brain.
    ``input_mask``: see ``case_to_grid``."""
    check_input_mask(input_mask)
    packs = [Path(root)] if is_pack(root) else packs_in(root)
    if packs:
        if input_mask != "brain":
            raise ValueError(f"{root}: training packs hold the inputs inside the true brain; "
                             f"input_mask {input_mask!r} needs the case folders")
        return read_pack(root, grid) if is_pack(root) else read_packs(packs, grid)
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
    cases = list_cases(root, REQUIRED + ((input_mask,) if input_mask != "brain" else ()))
    it = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="preparing cases", unit="case")
    items = []
    for d in it:
        f = None if cache_dir is None else cache_dir / f"{d.name}.pt"
        if f is not None and f.exists():
            items.append(torch.load(f, weights_only=False))
            continue
        names = REQUIRED + tuple(n for n in ("adc", input_mask) if n not in REQUIRED and (d / f"{n}.nii.gz").exists())
        item = case_to_grid(load_case(d, names), grid, input_mask)
        if f is not None:
            tmp = f.with_suffix(".tmp")
            torch.save(item, tmp)
            tmp.replace(f)
        items.append(item)
    return {"grid": grid, "ids": [c.name for c in cases], "items": items}


class SliceBank:
    """Every (case, slice) with enough brain, and batch assembly with augmentation."""

    def __init__(self, cache: dict, inputs: tuple[str, ...], k: int, cfg: TrainConfig):
        self.items = cache["items"]
        self.inputs = inputs
        self.k = k
        self.cfg = cfg
        self.chan_idx = [KNOWN_INPUTS.index(n) for n in inputs]
        for n, i in zip(inputs, self.chan_idx, strict=True):
            if any(torch.isnan(it["cond"][i]).any() for it in self.items[:3]):
                raise ValueError(f"inputs: the data has no {n} volumes but the config asks for {n}")
        index = []
        for ci, it in enumerate(self.items):
            frac = it["brain"].float().mean(dim=(1, 2))
            for z in torch.nonzero(frac >= cfg.min_brain_fraction).flatten().tolist():
                index.append((ci, z))
        if not index:
            raise ValueError("no slices with brain found in the training data")
        self.index = index
        self.draw_weights = self._draw_weights(cfg.no_core_hypo_draw, cfg.no_stroke_draw)

    def _draw_weights(self, no_core_hypo: float, no_stroke: float) -> torch.Tensor | None:
        """Per-slice draw weights: ``no_core_hypo`` on the hypoperfused slices of cases without a core,
        ``no_stroke`` on every slice of cases with neither core nor hypoperfusion (None when both are 1:
        the uniform draw, whose random stream stays what it always was)."""
        for name, value in (("no_core_hypo_draw", no_core_hypo), ("no_stroke_draw", no_stroke)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if no_core_hypo == 1.0 and no_stroke == 1.0:
            return None
        ci, cut = KNOWN_INPUTS.index("core"), float(tmax_to_model(np.float32(self.cfg.hypo_threshold_s)))
        no_core = [not bool((it["cond"][ci] > 0).any()) for it in self.items]
        hypo_slices = [(it["tmax"].float() > cut).flatten(1).any(dim=1) for it in self.items]
        healthy = [nc and not bool(h.any()) for nc, h in zip(no_core, hypo_slices, strict=True)]
        w = torch.ones(len(self.index), dtype=torch.float64)
        for i, (c, z) in enumerate(self.index):
            if healthy[c]:
                w[i] = no_stroke
            elif no_core[c] and bool(hypo_slices[c][z]):
                w[i] = no_core_hypo
        return w

    def draw(self, n: int, g: torch.Generator) -> list[int]:
        """``n`` slice ids: uniform, or by ``draw_weights``."""
        if self.draw_weights is None:
            return torch.randint(0, len(self), (n,), generator=g).tolist()
        return torch.multinomial(self.draw_weights, n, replacement=True, generator=g).tolist()

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, ids: list[int], generator: torch.Generator, augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cond (b, len(inputs)*k, g, g), x0 (b, 1, g, g), float32."""
        conds, x0s = [], []
        for i in ids:
            ci, z = self.index[i]
            it = self.items[ci]
            cond = it["cond"][self.chan_idx].float()
            conds.append(stack_neighbours(cond, self.k, torch.tensor([z]))[0])
            x0s.append(it["tmax"][z : z + 1].float())
        cond = torch.stack(conds)
        x0 = torch.stack(x0s)
        if augment:
            cond, x0 = self.augment(cond, x0, generator)
        return cond, x0

    def augment(self, cond: torch.Tensor, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, b, k = self.cfg, cond.shape[0], self.k
        # left-right flip
        flip = torch.rand(b, generator=g) < cfg.aug_flip
        if flip.any():
            cond[flip] = cond[flip].flip(-1)
            x0[flip] = x0[flip].flip(-1)
        # intensity: per image, per sample scale of (x + 1) for the grey-level images
        for j, name in enumerate(self.inputs):
            if name in ("dwi", "flair", "adc") and cfg.aug_intensity > 0:
                s = 1 + cfg.aug_intensity * (2 * torch.rand(b, 1, 1, 1, generator=g) - 1)
                sl = slice(j * k, (j + 1) * k)
                cond[:, sl] = ((cond[:, sl] + 1) * s - 1).clamp(-1, 4)
        grey = [j for j, name in enumerate(self.inputs) if name in ("dwi", "flair", "adc")]
        if grey and cfg.aug_prob_appearance > 0:
            for j in grey:
                sl = slice(j * k, (j + 1) * k)
                cond[:, sl] = randomise_appearance(cond[:, sl], cfg, g)
        # small affine: rotation, isotropic scale, shift (same for all channels of a sample)
        if cfg.aug_prob_affine > 0:
            use = torch.rand(b, generator=g) < cfg.aug_prob_affine
            ang = (2 * torch.rand(b, generator=g) - 1) * math.radians(cfg.aug_rotate_deg) * use
            sc = 1 + (2 * torch.rand(b, generator=g) - 1) * cfg.aug_scale * use
            sh = (2 * torch.rand(b, 2, generator=g) - 1) * cfg.aug_shift * 2 * use[:, None]
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0] = torch.cos(ang) / sc
            theta[:, 0, 1] = -torch.sin(ang) / sc
            theta[:, 1, 0] = torch.sin(ang) / sc
            theta[:, 1, 1] = torch.cos(ang) / sc
            theta[:, :, 2] = sh
            allc = torch.cat([cond, x0], 1)
            grid = F.affine_grid(theta, list(allc.shape), align_corners=False)
            # background is -1 in every channel: sample (x + 1) with zero padding
            allc = F.grid_sample(allc + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
            cond, x0 = allc[:, :-1], allc[:, -1:]
            if "core" in self.inputs:
                j = self.inputs.index("core")
                sl = slice(j * k, (j + 1) * k)
                cond[:, sl] = torch.where(cond[:, sl] > 0, 1.0, -1.0)
        return cond.contiguous(), x0.contiguous()


class StepBatches(torch.utils.data.Dataset):
    """Batch number ``step`` of a run (conditioning, Tmax, noise, timesteps), each from its own generator.

    Why: on a GPU the network's step takes a few milliseconds while assembling and augmenting a batch
    on one CPU core takes about 2 ms per slice, so a single process leaves the GPU idle most of the
    time. With the batches numbered, worker processes can build them ahead in any order and the
    stream stays the same whatever the number of workers, and a resumed run continues it exactly.
    (The in-process path, ``loader_workers = 0``, keeps the run's single generator, as before.)
    """

    def __init__(self, bank: SliceBank, batch_size: int, timesteps: int, seed: int, rank: int = 0):
        self.bank, self.batch_size, self.timesteps = bank, batch_size, timesteps
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return 2**62

    def generator(self, step: int) -> torch.Generator:
        mixed = (self.seed * 1_000_003 + self.rank * 7919) * 2_147_483_659 + step
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw_batch(self.bank, self.batch_size, self.timesteps, self.generator(step))


def draw_batch(bank: SliceBank, batch_size: int, timesteps: int,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch from ``g``: slice ids, augmented conditioning and Tmax, noise, timesteps (in
    that order of draws, which both the in-process path and StepBatches rely on)."""
    ids = bank.draw(batch_size, g)
    cond, x0 = bank.batch(ids, g, augment=True)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, timesteps, (x0.shape[0],), generator=g)
    return cond, x0, noise, t


def step_loader(batches: StepBatches, first: int, last: int, workers: int, pin_memory: bool):
    """Batches ``first``..``last``-1 in order, built ahead by ``workers`` forked processes (they share
    the slice bank's memory instead of each receiving a pickled copy of it: spawned workers would
    need one descriptor per cached tensor, and 350 cases already ran out of them).

    A fork copies the caller's state: call it from a process of its own, as ``synthperf train`` is,
    not from one holding broker connections (a forked child of a process with a Celery/kombu Redis
    connection hung in kombu's after-fork clean-up under make test; the tests fork from a spawned
    interpreter for that reason)."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(first, last), num_workers=workers,
        prefetch_factor=4 if workers else None, pin_memory=pin_memory,
        multiprocessing_context="fork" if workers else None,
    )


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (k, h, w) in-plane; sigma in pixels."""
    r = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = w / w.sum()
    t = img[:, None]
    t = F.conv2d(F.pad(t, (r, r, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    t = F.conv2d(F.pad(t, (0, 0, r, r), mode="replicate"), w.view(1, 1, -1, 1))
    return t[:, 0]


#: knots of the random intensity curve, in multiples of the brain median (v = normalised + 1): CSF and
#: dark tissue, white matter, the grey-white range, bright cortex and lesions, the clipping end
CURVE_KNOTS = (0.0, 0.5, 0.8, 0.95, 1.05, 1.2, 1.5, 2.5, 5.0)


def random_intensity_curve(v: torch.Tensor, spread: float, g: torch.Generator) -> torch.Tensor:
    """v (>= 0, brain median about 1, background 0) through a random monotone piecewise-linear curve.

    Each segment between CURVE_KNOTS gets the slope exp(U(-spread, spread)); the curve starts at 0 (the
    background stays 0) and is divided by its value at 1, so the brain median stays at 1 (a monotone map
    keeps ranks, and the median with them) and the normalisation the network expects still holds.
    """
    knots = torch.tensor(CURVE_KNOTS, dtype=v.dtype)
    slopes = torch.exp((2 * torch.rand(len(CURVE_KNOTS) - 1, generator=g) - 1) * spread).to(v.dtype)
    values = torch.cat([torch.zeros(1, dtype=v.dtype), torch.cumsum(slopes * knots.diff(), 0)])

    def curve(x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0, float(knots[-1]))
        seg = (torch.bucketize(x, knots, right=True) - 1).clamp(0, len(CURVE_KNOTS) - 2)
        return values[seg] + (x - knots[seg]) * slopes[seg]

    return curve(v) / curve(torch.ones((), dtype=v.dtype))


def randomise_appearance(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """On-the-fly appearance randomisation of one normalised grey-level image (b, k, h, w).

    Why: the network must not key on the intensity curves, noise, sharpness or resolution of the
    generator it learned from (issue 15; SynthSeg, Billot et al. 2023). Works on v = x + 1, which is
    0 outside the brain and about 1 at the brain median, so every change keeps the background at -1
    and the median near 0 after normalisation, as at inference. The k adjacent slices of a sample get
    the same change (they come from one acquisition).
    """
    b, k, h, w = x.shape
    out = x.clone()
    for i in range(b):
        if float(torch.rand(1, generator=g)) >= cfg.aug_prob_appearance:
            continue
        v = out[i] + 1.0
        inside = v > 1e-3
        u = torch.rand(6, generator=g)
        if cfg.aug_gamma > 0:
            gamma = math.exp((2 * float(u[0]) - 1) * cfg.aug_gamma)
            v = v.clamp_min(0) ** gamma
        if cfg.aug_curve > 0:
            v = random_intensity_curve(v, cfg.aug_curve, g)
        if cfg.aug_bias > 0:
            coarse = (2 * torch.rand(1, 1, 4, 4, generator=g) - 1) * cfg.aug_bias * float(u[1])
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
            v = v * torch.exp(field)
        if cfg.aug_blur_px > 0 and float(u[2]) < 0.5:
            v = _gaussian_blur(v, 0.3 + float(u[3]) * cfg.aug_blur_px)
        if cfg.aug_lowres > 1 and float(u[4]) < 0.5:
            f = 1 + float(torch.rand(1, generator=g)) * (cfg.aug_lowres - 1)
            along_y = float(torch.rand(1, generator=g)) < 0.5
            size = (max(8, int(h / f)), w) if along_y else (h, max(8, int(w / f)))
            v = F.interpolate(F.interpolate(v[None], size=size, mode="area"), size=(h, w), mode="bilinear",
                              align_corners=False)[0]
        if cfg.aug_noise > 0:
            s = float(u[5]) * cfg.aug_noise
            n1 = torch.randn(v.shape, generator=g) * s
            n2 = torch.randn(v.shape, generator=g) * s
            v = torch.sqrt((v + n1) ** 2 + n2**2)  # magnitude images carry Rician noise
        out[i] = torch.where(inside, v - 1.0, -1.0).clamp(-1, 4)
    return out
