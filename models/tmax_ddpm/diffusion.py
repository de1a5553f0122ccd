"""Noise schedule, training targets and the DDIM / DDPM reverse steps.

The scheduler (MONAI DDPMScheduler) owns beta/alpha tables and ``add_noise``; the reverse updates
are written here against its ``alphas_cumprod`` so any step count gives exact DDIM timesteps
(MONAI's DDIMScheduler.step assumes the step count divides the training steps).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from .config import ModelConfig


def _schedule_kwargs(cfg: ModelConfig) -> dict:
    """One noise schedule for training, ancestral and DDIM sampling: they must agree."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "schedule": cfg.schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "prediction_type": cfg.prediction_type,
        "clip_sample": True,
    }


def make_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The training (1000-step) scheduler; also drives the ancestral sampler."""
    return DDPMScheduler(**_schedule_kwargs(cfg))


def make_ddim_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    return DDIMScheduler(**_schedule_kwargs(cfg))


def training_target(sched: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for the configured prediction type."""
    kind = sched.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return x0


def predict_x0_eps(
    sched: DDPMScheduler, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a network output into (x0, eps) estimates; x0 is clipped to the data range [-1, 1]."""
    acp = sched.alphas_cumprod.to(xt.device)[t]
    if acp.ndim:
        acp = acp.view(-1, *([1] * (xt.ndim - 1)))
    a, s = acp.sqrt(), (1 - acp).sqrt()
    kind = sched.prediction_type
    if kind == "epsilon":
        x0 = (xt - s * out) / a
    elif kind == "v_prediction":
        x0 = a * xt - s * out
    else:
        x0 = out
    x0 = x0.clamp(-1, 1)
    eps = (xt - a * x0) / s
    return x0, eps


def ddim_timesteps(num_train: int, steps: int) -> list[int]:
    """Evenly spaced 'trailing' timesteps, first = num_train-1, so few steps start from pure noise."""
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps: must be in [1, {num_train}], got {steps}")
    ts = torch.linspace(num_train, 0, steps + 1)[:-1].round().long() - 1
    return [int(t) for t in ts.clamp(min=0)]


def ddim_step(
    sched: DDPMScheduler,
    out: torch.Tensor,
    t: int,
    t_prev: int,
    xt: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t_prev} (t_prev < 0 means the clean image). Returns (x_prev, x0)."""
    x0, eps = predict_x0_eps(sched, out, xt, t)
    acp = sched.alphas_cumprod.to(xt.device)
    a_t = acp[t]
    a_prev = acp[t_prev] if t_prev >= 0 else torch.tensor(1.0, device=xt.device)
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        noise = torch.randn(xt.shape, generator=generator, dtype=xt.dtype, device="cpu").to(xt.device)
        x_prev = x_prev + sigma * noise
    return x_prev, x0
