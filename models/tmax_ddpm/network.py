"""The denoiser: MONAI's 2D DiffusionModelUNet with 2.5D channel-stacked conditioning.

Input channels = k adjacent slices of each conditioning image + the noisy Tmax slice (last channel).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet

from .config import ModelConfig


def build_network(cfg: ModelConfig) -> DiffusionModelUNet:
    """A fresh (randomly initialised) denoiser for ``cfg``."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=1,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
    )


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
