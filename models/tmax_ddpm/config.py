"""Model, training and sampling configuration as plain dataclasses serialised to JSON.

Why one object: the same config travels with a checkpoint (config.json beside the safetensors file),
so inference rebuilds exactly the network that was trained and normalises inputs identically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Conditioning images a model may use, in channel order. "core" is the infarct-core mask.
KNOWN_INPUTS = ("dwi", "flair", "core", "adc")

#: Named input ablations from the paper (plus ADC).
ABLATIONS: dict[str, tuple[str, ...]] = {
    "dwi": ("dwi",),
    "dwi+flair": ("dwi", "flair"),
    "dwi+flair+core": ("dwi", "flair", "core"),
    "dwi+flair+core+adc": ("dwi", "flair", "core", "adc"),
}

TMAX_MAX_S = 20.0


@dataclass
class ModelConfig:
    """Network and data geometry. Changing any field makes old weights incompatible."""

    inputs: tuple[str, ...] = ("dwi", "flair", "core")
    slices: int = 5  # k adjacent slices of each conditioning image (2.5D), odd
    grid: int = 64  # in-plane model grid (square); inference resamples to and from it
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    num_head_channels: int = 32
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"  # "epsilon" | "v_prediction" | "sample"

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        bad = [i for i in self.inputs if i not in KNOWN_INPUTS]
        if bad or not self.inputs:
            raise ValueError(f"inputs: unknown or empty {bad or self.inputs}; choose from {KNOWN_INPUTS}")
        if len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs: duplicates in {self.inputs}")
        if self.slices < 1 or self.slices % 2 == 0:
            raise ValueError(f"slices: must be odd and >= 1, got {self.slices}")
        if self.grid < 16 or self.grid % (2 ** (len(self.channels) - 1)) != 0:
            raise ValueError(f"grid: {self.grid} must be >= 16 and divisible by 2**(levels-1)")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels: needs one entry per channels entry")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups: {self.norm_num_groups} must divide every channel count")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type: unknown {self.prediction_type!r}")

    @property
    def in_channels(self) -> int:
        return len(self.inputs) * self.slices + 1


# The masks a model's inputs can be normalised in (TrainConfig.input_mask), by the case file's name.
INPUT_MASKS = ("brain", "brain_served")


def check_input_mask(name: str) -> str:
    """``name`` if it is one of INPUT_MASKS; else ValueError naming the argument and the choices."""
    if name not in INPUT_MASKS:
        raise ValueError(f"input_mask: unknown {name!r}; choose from {INPUT_MASKS}")
    return name


@dataclass
class TrainConfig:
    """Optimisation, loss weighting, augmentation and checkpointing."""

    steps: int = 16000
    batch_size: int = 16
    lr: float = 4e-4
    lr_warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    # perfusion-weighted loss: weight = 1 + hypo_weight*[Tmax>6] + border_weight*[border band]
    hypo_weight: float = 2.0
    border_weight: float = 2.0
    border_px: int = 2
    hypo_threshold_s: float = 6.0
    # only slices with brain (fraction of brain pixels) are sampled; empty slices waste steps
    min_brain_fraction: float = 0.02
    # how much more often a hypoperfused slice of a case without any core is drawn than any other slice
    # (1 = uniform, today's recipe): the studies whose hypoperfusion rests on FLAIR alone are few, and
    # the model paints too little of it there (issue 15)
    no_core_hypo_draw: float = 1.0
    # how much more often a slice of a study with neither core nor hypoperfusion (a healthy brain) is
    # drawn (1 = uniform): the guard for no_core_hypo_draw, whose extra hypoperfusion without a core
    # taught the model false hypoperfusion on healthy brains (sessions 15 and 19, issue 15)
    no_stroke_draw: float = 1.0
    # the mask the inputs are normalised in and cut to: "brain" (the data's brain.nii.gz; for the phantom
    # its true brain) or "brain_served" (the service's own mask from the b0, written beside it by
    # `synthperf dataset served-masks`), so the model learns the rim of CSF and skull the service's
    # mask adds (issue 15: train as served)
    input_mask: str = "brain"
    # augmentation
    aug_flip: float = 0.5
    aug_intensity: float = 0.15  # +- relative scale of DWI/FLAIR/ADC
    aug_rotate_deg: float = 8.0
    aug_scale: float = 0.08
    aug_shift: float = 0.05  # fraction of the field of view
    aug_prob_affine: float = 0.7
    # appearance randomisation on the fly (SynthSeg-style, issue 15): per sample and per grey-level
    # image, with probability aug_prob_appearance each of: gamma exp(U(-g, g)) on (x + 1), a smooth
    # multiplicative bias field of amplitude up to aug_bias, Gaussian blur up to aug_blur_px (sigma,
    # model-grid pixels), resolution loss (down by up to aug_lowres along a random axis, then back up)
    # and Rician-like noise up to aug_noise (in units of the brain median). 0 switches one off.
    aug_prob_appearance: float = 0.8
    aug_gamma: float = 0.35
    aug_bias: float = 0.3
    aug_blur_px: float = 1.0
    aug_lowres: float = 2.0
    aug_noise: float = 0.08
    # a random monotone intensity curve (issue 15's "intensity curves"): piecewise linear over knots at
    # CURVE_KNOTS (multiples of the brain median), each segment's slope exp(U(-c, c)), rescaled so the
    # median stays where it was. Unlike one gamma for the whole image it moves the grey-white contrast
    # apart from the CSF and lesion contrasts. 0 switches it off (the shipped weights never saw it).
    aug_curve: float = 0.0
    # runtime
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    # 0: batches built in the training process from the run's one generator (the CPU recipe);
    # N: built ahead by N worker processes, batch k from its own generator (data.StepBatches), so the
    # GPU is not left waiting; the stream then does not depend on N
    loader_workers: int = 0
    num_threads: int = 0  # 0: measure 1 vs all cores periodically and use the faster (see train.ThreadTuner)
    # True = bf16 autocast on a CPU only where it is native (AVX512_BF16/AMX) and measured faster than
    # fp32 on a real batch at the start of the run (runtime.choose_training_precision); False = fp32.
    bf16_cpu: bool = True
    channels_last: bool = True
    val_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_input_mask(self.input_mask)


@dataclass
class SampleConfig:
    """Inference defaults, chosen from bench/sampling.py (docs/benchmarks.md). With the demo model,
    2 DDIM steps x 8 samples gave a higher Dice than 10 x 4 or 20 x 2 in less than half the time;
    1 step x 8 samples then matched it (Tmax>6 s Dice 0.827 vs 0.828 on 16 held-out cases) in 0.54x
    the time, which the demo config uses. The uncertainty map needs the 8 samples: its correlation
    with a 32-sample map was 0.66 / 0.84 / 0.92 / 0.95 at 2 / 4 / 8 / 16 samples (2 steps), 0.89 at
    1 step x 8."""

    steps: int = 2
    samples: int = 8
    eta: float = 0.0
    slice_noise_correlation: float = 0.9  # AR(1) correlation of initial noise along z
    max_batch: int = 128
    # bf16 may be a candidate inference path (CPU: only with native bf16, and only if measured fastest
    # within tolerance; see models.tmax_ddpm.runtime); False keeps it out.
    bf16: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a (possibly partial) dict; unknown keys are an error so typos don't pass silently."""
        out = cls()
        for section, klass in (("model", ModelConfig), ("train", TrainConfig), ("sample", SampleConfig)):
            values = dict(data.get(section) or {})
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"config section {section!r}: unknown keys {sorted(unknown)}")
            base = dataclasses.asdict(getattr(out, section))
            base.update(values)
            setattr(out, section, klass(**base))
        extra = set(data) - {"model", "train", "sample", "ablation"}
        if extra:
            raise ValueError(f"config: unknown sections {sorted(extra)}")
        if "ablation" in data:
            name = data["ablation"]
            if name not in ABLATIONS:
                raise ValueError(f"ablation: unknown {name!r}; choose from {sorted(ABLATIONS)}")
            out.model = ModelConfig(**{**dataclasses.asdict(out.model), "inputs": ABLATIONS[name]})
        return out

    @classmethod
    def load(cls, path: str | Path) -> Config:
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return cls.from_dict(data)


def model_config_hash(model: ModelConfig) -> str:
    """Stable hash of the architecture-defining config; stored in the weights' metadata."""
    text = json.dumps(dataclasses.asdict(model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
