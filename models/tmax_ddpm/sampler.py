"""Batched, seeded reverse diffusion over all slices of a study.

All slices (x samples) of a volume go through the network together in a few DDIM steps. Slice
consistency: the initial noise is correlated along z (AR(1) with correlation rho), so neighbouring
slices start from similar noise and deterministic DDIM maps them to coherent Tmax; the marginal of
each slice stays N(0, I), which is what the network was trained on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .diffusion import ddim_step, ddim_timesteps, predict_x0_eps
from .runtime import Denoise, torch_denoiser


def correlated_noise(
    n_samples: int, nz: int, h: int, w: int, rho: float, generator: torch.Generator
) -> torch.Tensor:
    """(n_samples, nz, 1, h, w) standard-normal noise with AR(1) correlation ``rho`` along z."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho: slice noise correlation must be in [0, 1), got {rho}")
    e = torch.randn((n_samples, nz, 1, h, w), generator=generator)
    if rho == 0.0 or nz == 1:
        return e
    out = torch.empty_like(e)
    out[:, 0] = e[:, 0]
    scale = (1 - rho**2) ** 0.5
    for z in range(1, nz):
        out[:, z] = rho * out[:, z - 1] + scale * e[:, z]
    return out


@torch.no_grad()
def sample_volume(
    net: torch.nn.Module | Denoise,
    sched,
    cond: torch.Tensor,
    steps: int,
    samples: int,
    seed: int = 0,
    eta: float = 0.0,
    rho: float = 0.9,
    max_batch: int = 128,
    ancestral: bool = False,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Sample Tmax (model scale) for every slice.

    cond: (nz, C, h, w) 2.5D conditioning stacks. Returns (samples, nz, h, w) in [-1, 1].
    ``net`` is the network (run eagerly, autocast to ``autocast_dtype`` if given) or a denoiser
    callable ``(input, t) -> float32 output`` from :mod:`.runtime` (the path chosen on this machine).
    ``ancestral=True`` runs the full 1000-step DDPM chain (the reference sampler), ignoring ``steps``.
    """
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    device = torch.device(device)
    denoise = torch_denoiser(net, device, autocast=autocast_dtype) if isinstance(net, torch.nn.Module) else net
    gen = torch.Generator().manual_seed(int(seed))
    # MONAI's DDPM step draws its noise on the model's device, so the ancestral chain needs a generator there
    step_gen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(int(seed))
    nz, _, h, w = cond.shape
    x = correlated_noise(samples, nz, h, w, rho, gen).reshape(samples * nz, 1, h, w).to(device)
    c = cond.to(device).repeat(samples, 1, 1, 1)
    n = samples * nz
    if ancestral:
        ts = list(range(sched.num_train_timesteps - 1, -1, -1))
    else:
        ts = ddim_timesteps(sched.num_train_timesteps, steps)
    x0 = x
    for i, t in enumerate(ts):
        outs = []
        for s in range(0, n, max_batch):
            inp = torch.cat([c[s : s + max_batch], x[s : s + max_batch]], dim=1)
            tt = torch.full((inp.shape[0],), t, dtype=torch.long, device=device)
            outs.append(denoise(inp, tt).to(device))
        out = torch.cat(outs)
        if ancestral:
            x0, _ = predict_x0_eps(sched, out, x, t)
            x, _ = sched.step(out, t, x, generator=step_gen)
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x, x0 = ddim_step(sched, out, t, t_prev, x, eta=eta, generator=gen)
        if progress is not None:
            progress((i + 1) / len(ts))
    return x0.reshape(samples, nz, h, w).clamp(-1, 1).cpu()
