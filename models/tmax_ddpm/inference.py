"""The interface the pipeline calls: load verified weights, synthesise Tmax on the input grid.

    synth = TmaxSynthesizer.load("demo")            # or a weights / run folder, or folders joined by +
    res = synth.synthesize(dwi, flair, core, brain, spacing_zyx=(5, 1.8, 1.8))
    res.mean, res.sd  # seconds, (z, y, x) on the input grid; SYNTHETIC, not for diagnostic use

A synthesizer may hold several networks (an ensemble, models.registry): the samples of a study are
split among them and pooled, so the mean and SD are over every network's samples at the cost of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import runtime as rt
from .checkpoint import load_weights, read_info, sha256_file
from .config import Config, model_config_hash
from .diffusion import make_scheduler
from .preprocess import from_grid, prepare_conditioning, stack_neighbours, tmax_from_model
from .sampler import sample_volume


@dataclass
class SynthesisResult:
    """Voxelwise mean and SD over the samples, in seconds, (z, y, x) on the input grid."""

    mean: np.ndarray
    sd: np.ndarray
    steps: int
    samples: int
    seconds: float
    inference_path: str = ""
    # Per sample, the brain volume (mL) above each cut asked for (``sample_cuts_s``): the spread of a
    # volume and of any call read from it (the share of samples that call a target mismatch), which the
    # mean map hides. Empty unless asked for: the service does not read it.
    sample_ml: dict[float, tuple[float, ...]] = field(default_factory=dict)



@dataclass
class Member:
    """One network of a synthesizer, with how it runs here (chosen per network: each has its own id)."""

    net: torch.nn.Module
    source: str
    runtime: rt.RuntimeChoice | None = None
    denoise: rt.Denoise | None = None

    @property
    def model_id(self) -> str:
        """sha256 of the weights file (from its .sha256 beside it when present)."""
        src = Path(self.source) if self.source else None
        if src is not None and (src / "model.safetensors.sha256").is_file():
            return (src / "model.safetensors.sha256").read_text().split()[0]
        if src is not None and (src / "model.safetensors").is_file():
            return sha256_file(src / "model.safetensors")
        return ""


def split_samples(samples: int, members: int) -> list[int]:
    """Samples per network: as even as possible, the earlier networks taking the remainder.

    With fewer samples than networks the later networks draw none, so one sample is always the
    primary network's own (the fast settings of tests and benches stay what they were)."""
    if samples < 1 or members < 1:
        raise ValueError(f"samples and members must be >= 1 (got samples={samples}, members={members})")
    base, extra = divmod(samples, members)
    return [base + (i < extra) for i in range(members)]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


class TmaxSynthesizer:
    """A loaded model plus its sampling defaults. Thread-compatible for sequential use."""

    def __init__(self, net: torch.nn.Module, cfg: Config, device: str = "auto", source: str = "", info: dict | None = None,
                 inference_path: str = "auto", runtime_dir: str | Path | None = None, try_compile: bool = False,
                 more: Sequence[tuple[torch.nn.Module, str]] = ()):
        """``net`` from ``source`` is the primary network (its config samples); ``more``: further
        (network, source) pairs of the same model config that share the samples (an ensemble)."""
        self.device = pick_device(device)
        self.cfg = cfg
        self.members = [Member(n.to(self.device).eval(), str(src)) for n, src in [(net, source), *more]]
        self.sched = make_scheduler(cfg.model)
        self.info = info or {}
        # How the denoiser runs (precision, memory format, runtime) is chosen on the first synthesis in
        # this process by measuring on that study's slices, or read from runtime_dir's per-machine cache
        # (models.tmax_ddpm.runtime), for each network apart. SampleConfig.bf16=False keeps bf16 out.
        self.configure_runtime(inference_path, runtime_dir, try_compile)

    def configure_runtime(self, inference_path: str = "auto", runtime_dir: str | Path | None = None,
                          try_compile: bool = False) -> None:
        """Set how the path is chosen: ``auto`` (measure, or read the cache in ``runtime_dir``) or a path name.

        A change forgets the current choice; the same settings again keep it (cheap to call per job).
        """
        valid = ("auto",) + (rt.CUDA_PATHS if self.device.type == "cuda" else rt.PATHS)
        if inference_path not in valid:
            raise ValueError(f"inference_path: unknown {inference_path!r} for {self.device.type}; choose from {valid}")
        new = (inference_path, Path(runtime_dir) if runtime_dir else None, bool(try_compile))
        if getattr(self, "_runtime_settings", None) != new:
            self._runtime_settings = new
            for m in self.members:
                m.runtime, m.denoise = None, None

    @property
    def net(self) -> torch.nn.Module:
        """The primary network."""
        return self.members[0].net

    @property
    def source(self) -> str:
        """The primary network's weights folder (its input reference is the ensemble's)."""
        return self.members[0].source

    @property
    def sources(self) -> list[str]:
        return [m.source for m in self.members]

    @property
    def runtime(self) -> rt.RuntimeChoice | None:
        """How the primary network runs here (each network's own: ``members[i].runtime``)."""
        return self.members[0].runtime

    @property
    def model_id(self) -> str:
        """sha256 of the weights file, the members' joined by ``+`` for an ensemble."""
        return "+".join(m.model_id for m in self.members)

    def ensure_runtime(self, stacks: torch.Tensor) -> rt.RuntimeChoice:
        """Choose every network's inference path now if not yet chosen (probing with up to PROBE_BATCH
        of ``stacks``); returns the primary network's."""
        for m in self.members:
            self._ensure_member_runtime(m, stacks)
        return self.members[0].runtime

    def _ensure_member_runtime(self, member: Member, stacks: torch.Tensor) -> rt.Denoise:
        if member.runtime is None or member.denoise is None:
            member.runtime, member.denoise = self._choose_runtime(member, stacks)
        return member.denoise

    def _choose_runtime(self, member: Member, stacks: torch.Tensor) -> tuple[rt.RuntimeChoice, rt.Denoise]:
        force, cache_dir, try_compile = self._runtime_settings
        n = stacks.shape[0]
        k = min(rt.PROBE_BATCH, n)
        mid = max(0, (n - k) // 2)  # central slices: most brain
        probe = stacks[mid : mid + k]
        if probe.shape[0] < rt.PROBE_BATCH:  # a short study: repeat slices so the batch is a realistic size
            probe = probe.repeat((rt.PROBE_BATCH + k - 1) // k, 1, 1, 1)[: rt.PROBE_BATCH]
        brain = (probe > -0.999).any(1)
        steps = int(self.cfg.sample.steps)

        def sample(denoise: rt.Denoise) -> torch.Tensor:
            x = sample_volume(denoise, self.sched, probe, steps=steps, samples=1, seed=0, eta=self.cfg.sample.eta,
                              rho=0.0, max_batch=rt.PROBE_BATCH, device=self.device)
            return tmax_from_model(x)[0]

        return rt.choose(
            member.net, self.device, in_channels=self.cfg.model.in_channels, grid=self.cfg.model.grid, sample=sample,
            brain=brain, probe_stacks=int(probe.shape[0]), steps=steps, model_id=member.model_id, cache_dir=cache_dir,
            force=force, allow_bf16=bool(self.cfg.sample.bf16), try_compile=try_compile,
        )

    @classmethod
    def load(cls, name_or_dir: str = "demo", device: str = "auto", inference_path: str = "auto",
             runtime_dir: str | Path | None = None, try_compile: bool = False) -> TmaxSynthesizer:
        """Resolve via the registry, verify sha256 and config, build the network(s)."""
        # models-internal import (the registry sits beside the package)
        from models.registry import resolve_members

        dirs = resolve_members(name_or_dir)
        loaded = [load_weights(d) for d in dirs]
        net, cfg = loaded[0]
        for d, (_, other) in zip(dirs[1:], loaded[1:], strict=True):
            if model_config_hash(other.model) != model_config_hash(cfg.model):
                raise ValueError(f"{name_or_dir}: {d} has another model config than {dirs[0]}; an ensemble's "
                                 "networks must share one")
        info = read_info(dirs[0])
        if len(dirs) > 1:
            info = {**info, "members": [{"source": str(d), **read_info(d)} for d in dirs]}
        return cls(net, cfg, device=device, source=str(Path(dirs[0])), info=info, inference_path=inference_path,
                   runtime_dir=runtime_dir, try_compile=try_compile,
                   more=[(n, str(Path(d))) for d, (n, _) in zip(dirs[1:], loaded[1:], strict=True)])

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.cfg.model.inputs

    def synthesize(
        self,
        dwi: np.ndarray,
        flair: np.ndarray | None,
        core: np.ndarray | None,
        brain: np.ndarray,
        adc: np.ndarray | None = None,
        spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
        steps: int | None = None,
        samples: int | None = None,
        seed: int = 0,
        progress: Callable[[float], None] | None = None,
        ancestral: bool = False,
        sample_cuts_s: tuple[float, ...] = (),
    ) -> SynthesisResult:
        """Tmax (s) mean and SD over ``samples`` DDIM samples of ``steps`` steps, on the input grid.

        Inputs are raw-intensity numpy (z, y, x) volumes on the DWI grid (ADC in 1e-6 mm^2/s, masks
        non-zero = inside). spacing_zyx is accepted for the record: the model works slice-wise in-plane
        and resamples by pixel count (padding to a square), so anisotropic pixels are not corrected.
        Outside the brain the result is 0 s. ``sample_cuts_s``: also each sample's brain volume above
        these cuts (``SynthesisResult.sample_ml``; about 40 ms a study at 256 x 256 x 25, so off by default).
        """
        t0 = time.perf_counter()
        steps = int(steps or self.cfg.sample.steps)
        samples = int(samples or self.cfg.sample.samples)
        if steps < 1 or samples < 1:
            raise ValueError(f"steps and samples must be >= 1 (got steps={steps}, samples={samples})")
        brain_b = np.asarray(brain) > 0
        if dwi is None or np.asarray(dwi).shape != brain_b.shape:
            raise ValueError(f"dwi: needs shape {brain_b.shape} (same as brain)")
        images = {"dwi": dwi, "flair": flair, "core": core, "adc": adc}
        cond, geo = prepare_conditioning(images, brain_b, self.inputs, self.cfg.model.grid)
        stacks = stack_neighbours(cond, self.cfg.model.slices)
        xs, done = [], 0
        for i, (member, n) in enumerate(zip(self.members, split_samples(samples, len(self.members)), strict=True)):
            if n == 0:
                continue  # no draws, no inference-path probe either
            xs.append(sample_volume(
                self._ensure_member_runtime(member, stacks),
                self.sched,
                stacks,
                steps=steps,
                samples=n,
                seed=seed + i,  # the primary network's draws are what a single network's were
                eta=self.cfg.sample.eta,
                rho=self.cfg.sample.slice_noise_correlation,
                max_batch=self.cfg.sample.max_batch,
                ancestral=ancestral,
                device=self.device,
                progress=None if progress is None else (lambda f, d=done, k=n: progress((d + f * k) / samples)),
            ))
            done += n
        tmax = tmax_from_model(torch.cat(xs, 0))  # (samples, z, g, g) seconds, every network's pooled
        mean_g = tmax.mean(0)
        sd_g = tmax.std(0, unbiased=False) if samples > 1 else torch.zeros_like(mean_g)
        mean = np.clip(from_grid(mean_g, geo), 0, None) * brain_b
        sd = np.clip(from_grid(sd_g, geo), 0, None) * brain_b
        sample_ml: dict[float, tuple[float, ...]] = {}
        if sample_cuts_s:
            voxel_ml = float(np.prod([float(v) for v in spacing_zyx])) / 1000.0
            per_sample = [from_grid(t, geo) for t in tmax]  # one sample at a time on the input grid
            sample_ml = {float(cut): tuple(float(((t > cut) & brain_b).sum()) * voxel_ml for t in per_sample)
                         for cut in sample_cuts_s}
        return SynthesisResult(
            mean=mean.astype(np.float32),
            sd=sd.astype(np.float32),
            steps=1000 if ancestral else steps,
            samples=samples,
            seconds=time.perf_counter() - t0,
            inference_path="+".join(dict.fromkeys(m.runtime.path for m in self.members if m.runtime)),
            sample_ml=sample_ml,
        )
