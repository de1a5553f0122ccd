"""Training loop: resumable, checkpointing, EMA, perfusion-weighted loss, loss-curve PNG.

Re-running the same command resumes: RUN_DIR/checkpoint.pt holds network, EMA, optimiser, RNG
state, step and loss history; it is rewritten every ``checkpoint_minutes`` and at the end, and each
time the EMA weights are exported to RUN_DIR/export/ (safetensors + config + sha256) so a run can be
evaluated or shipped at any moment.

Beyond one machine (the MONAI convention): started by ``torchrun`` (WORLD_SIZE > 1 in the
environment), the loop runs under DistributedDataParallel, NCCL on CUDA and gloo on the CPU. Every
rank draws its own batches (its generator is seeded with its rank, so the global batch is
``batch_size`` x world size) and the gradients are averaged across ranks, so all ranks hold the same
weights after every step; rank 0 alone builds the slice cache, writes the run's config, checkpoints,
exports and plots, and the others only train. A stop (signal, --max-minutes) is agreed by all ranks
at the same step, so none waits forever in a collective. The single-process path is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch

from models.registry import resolve
from models.tmax_ddpm.checkpoint import CheckpointError, export_weights, load_weights, read_info
from models.tmax_ddpm.config import Config, model_config_hash
from models.tmax_ddpm.data import SliceBank, StepBatches, build_cache, draw_batch, step_loader
from models.tmax_ddpm.diffusion import make_scheduler, training_target
from models.tmax_ddpm.loss import perfusion_weights, weighted_mse
from models.tmax_ddpm.network import build_network, count_parameters
from models.tmax_ddpm.runtime import choose_training_precision

log = logging.getLogger("synthperf.models.train")

CKPT = "checkpoint.pt"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Dist:
    """This process's place in a torchrun job; world 1 (no process group) when started alone."""

    def __init__(self, dev_name: str) -> None:
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        self.started = False
        if self.world <= 1:
            return
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = dev_name.startswith("cuda") or (dev_name == "auto" and torch.cuda.is_available())
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            self.started = True
        self.rank = dist.get_rank()
        if cuda:
            torch.cuda.set_device(self.local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        dev = _device(name)
        if self.world > 1 and dev.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return dev

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one tiny all-reduce)."""
        if self.world <= 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if self.world <= 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj):  # noqa: ANN001, ANN201 - any picklable object
        if self.world <= 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):  # noqa: ANN001, ANN201 - rank 0's object on every rank
        if self.world <= 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the module's tensors in order: equal digests, equal weights (ranks are compared by it)."""
    import hashlib

    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def plot_loss(history: list[tuple[int, float]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    vals = [h[1] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, vals, lw=0.8, alpha=0.5, label="loss (per log interval)")
    if len(vals) >= 10:
        w = max(5, len(vals) // 30)
        sm = [sum(vals[max(0, i - w + 1) : i + 1]) / len(vals[max(0, i - w + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({w})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("perfusion-weighted MSE")
    ax.set_title("synthperf Tmax DDPM training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class ThreadTuner:
    """Pick the intra-op thread count by measurement, again and again.

    Why: on a small shared CPU, OpenMP threads that spin-wait for each other collapse when other
    processes compete (measured here: a tiny step took 0.13 s on 1 thread, 2.8 s on 2 threads while
    other jobs ran). ``requested`` > 0 fixes the count; 0 probes 1 thread against all cores for a few
    steps every ``period`` steps and keeps the faster.
    """

    def __init__(self, requested: int, period: int = 300, probe: int = 6):
        import os

        self.fixed = requested > 0
        self.cands = [requested] if self.fixed else sorted({1, max(1, os.cpu_count() or 1)})
        self.period, self.probe = period, probe
        self.current = self.cands[-1]
        self.times: dict[int, list[float]] = {}
        self.phase: int | None = None
        torch.set_num_threads(self.current)

    def before(self, step: int) -> None:
        if self.fixed or len(self.cands) == 1:
            return
        k = step % self.period
        if k < self.probe * len(self.cands):
            self.phase = self.cands[k // self.probe]
            if k % self.probe == 0 or self.phase not in self.times:
                self.times[self.phase] = []
            self._set(self.phase)
        elif self.phase is not None:
            med = {n: sorted(v)[len(v) // 2] for n, v in self.times.items() if v}
            self._set(min(med, key=med.get))
            log.info("threads: %s -> using %d", {n: round(t, 3) for n, t in med.items()}, self.current)
            self.phase = None

    def after(self, seconds: float) -> None:
        if self.phase is not None:
            self.times[self.phase].append(seconds)

    def _set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n


def _training_precision(dev: torch.device, tc, bank, sched, net: torch.nn.Module, channels_last: bool):
    """bf16 autocast or fp32 for this run, measured on one real batch (runtime.choose_training_precision).

    Its own generator, and gradients cleared afterwards: the measurement leaves the run's random stream
    and weights exactly as they were, so a resumed run stays reproducible.
    """
    g = torch.Generator().manual_seed(987654321)
    ids = torch.randint(0, len(bank), (tc.batch_size,), generator=g).tolist()
    cond, x0 = bank.batch(ids, g, augment=False)
    cond, x0 = cond.to(dev), x0.to(dev)
    t = torch.randint(0, sched.num_train_timesteps, (x0.shape[0],), generator=g).to(dev)
    inp = torch.cat([cond, sched.add_noise(x0, torch.randn(x0.shape, generator=g).to(dev), t)], 1)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)

    def time_step(dtype: torch.dtype | None) -> float:
        t0 = time.perf_counter()
        ctx = torch.autocast(device_type=dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = net(inp, t)
        out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return choose_training_precision(dev, tc.bf16_cpu, time_step)


def lr_at(step: int, cfg, restart: int = 0) -> float:
    """Linear warm-up then cosine decay to 10 %.

    ``restart`` is the step a warm start began at: its fresh optimiser gets its own short linear
    warm-up (Adam's moment estimates are empty, and a full-size step on them would undo the weights).
    """
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    p = min(1.0, (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
    lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    if restart and step - restart < cfg.lr_warmup:
        lr *= (step - restart + 1) / cfg.lr_warmup
    return lr


def warm_start(init_from: str | Path, cfg: Config, net: torch.nn.Module, ema: torch.nn.Module) -> tuple[int, float]:
    """Load exported EMA weights into the network and its EMA; return (step, train_seconds) they had.

    Why: a run folder lives on one machine, but exported weights travel with the repository. Starting
    a new run from them (the shipped demo weights, say) continues the training where it was exported
    instead of from scratch; only the optimiser state is new. The model section of the config must
    be the one the weights were trained with.
    """
    src = resolve(init_from)
    loaded, wcfg = load_weights(src)
    if model_config_hash(wcfg.model) != model_config_hash(cfg.model):
        raise CheckpointError(
            f"--init-from {init_from}: the weights were trained with a different model config than this run's "
            f"({src / 'config.json'}); start the run with that config (--config {src / 'config.json'})"
        )
    state = loaded.state_dict()
    net.load_state_dict(state)
    ema.load_state_dict(state)
    info = read_info(src)
    step = int(info.get("step", 0))
    if step >= cfg.train.steps:
        log.warning("--init-from %s: weights are at step %d >= %d target steps; nothing left to train",
                    init_from, step, cfg.train.steps)
    return step, float(info.get("train_seconds", 0.0))


def train(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: Config | None = None,
    device: str = "auto",
    max_minutes: float | None = None,
    progress: bool = True,
    init_from: str | Path | None = None,
) -> dict:
    """Train (or resume) a run. Returns a summary dict. Stops at cfg.train.steps or after max_minutes.

    ``init_from`` (a registry name or a weights folder) starts a new run from exported weights and
    their step count; it is ignored once the run has a checkpoint of its own (that resumes exactly).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    dist = _Dist(device)
    try:
        return _train(dist, data_dir, run, cfg, device, max_minutes, progress, init_from)
    finally:
        dist.close()


def _train(dist: _Dist, data_dir, run: Path, cfg, device, max_minutes, progress, init_from) -> dict:  # noqa: ANN001
    """train() on this rank (world 1 when not under torchrun)."""
    cfg_file = run / "config.json"
    existed = cfg_file.exists()
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes into it
    if existed:
        saved = Config.from_dict(json.loads(cfg_file.read_text()))
        if cfg is not None and cfg.to_dict() != saved.to_dict():
            raise ValueError(
                f"{run}: this run was started with a different config ({cfg_file}); resume with the same "
                "--config, or choose a new --out folder"
            )
        cfg = saved
    else:
        cfg = cfg or Config()
        if dist.main:
            cfg_file.write_text(cfg.to_json() + "\n")
    tc, mc = cfg.train, cfg.model
    threads = ThreadTuner(tc.num_threads)
    dev = dist.device(device)

    if not dist.main:
        dist.barrier()  # rank 0 builds the slice cache; the others then load it
    cache_name = f"grid{mc.grid}" if tc.input_mask == "brain" else f"grid{mc.grid}-{tc.input_mask}"
    cache = build_cache(data_dir, mc.grid, run / "cache" / cache_name, progress=progress and dist.main,
                        input_mask=tc.input_mask)
    if dist.main:
        dist.barrier()
    bank = SliceBank(cache, mc.inputs, mc.slices, tc)

    with torch.random.fork_rng(devices=[]):  # the initial weights from the run's seed; the caller's RNG untouched
        torch.manual_seed(tc.seed)
        net = build_network(mc).to(dev)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = make_scheduler(mc)
    gen = torch.Generator().manual_seed(tc.seed)
    step, history, train_seconds, restart = 0, [], 0.0, 0

    ck = run / CKPT
    if ck.exists():
        state = torch.load(ck, map_location=dev, weights_only=False)
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        restart = state.get("restart", 0)
        log.info("resumed %s at step %d", run, step)
    elif init_from is not None:
        step, train_seconds = warm_start(init_from, cfg, net, ema)
        restart = step
        # a different seed stream from a fresh run's, so the warm start does not replay its batches
        gen.manual_seed(tc.seed + step)
        log.info("warm start of %s from %s at step %d", run, init_from, step)
    if dist.rank:  # each rank its own batches, reproducible from the step a run starts or resumes at
        gen.manual_seed(tc.seed + 7919 * dist.rank + step)

    use_cl = tc.channels_last and dev.type == "cpu"
    if use_cl:
        net = net.to(memory_format=torch.channels_last)
    choice = _training_precision(dev, tc, bank, sched, net, use_cl) if dist.main else None
    amp_dtype, precision = dist.broadcast(choice)  # one precision for all ranks: rank 0's measurement
    model = net
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    log.info("training precision %s (%s)", precision["precision"], precision)

    def export(final: bool = False) -> None:
        info = {
            "step": step,
            "target_steps": tc.steps,
            "train_seconds": round(train_seconds, 1),
            "cases": len(cache["ids"]),
            "slices": len(bank),
            "finished": step >= tc.steps,
            "parameters": count_parameters(net),
            "data": str(data_dir),
            "cpu_precision": precision,
        }
        if restart:
            info["warm_start_step"] = restart
        export_weights(ema.state_dict(), cfg, run / "export", info=info)

    def checkpoint() -> None:
        if not dist.main:  # rank 0 alone writes the run folder
            return
        _save_atomic(
            {
                "net": net.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "step": step,
                "history": history,
                "train_seconds": train_seconds,
                "restart": restart,
            },
            ck,
        )
        export()
        plot_loss(history, run / "loss.png")
        (run / "history.json").write_text(json.dumps({"step": step, "train_seconds": train_seconds, "history": history}))

    stop = {"flag": False}

    def _on_signal(signum, _frame) -> None:  # checkpoint, then exit: `kill PID` loses no work
        log.warning("signal %s: checkpointing and stopping", signum)
        stop["flag"] = True

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, _on_signal)

    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="training", unit="step", mininterval=5, dynamic_ncols=False)
    t_start = time.perf_counter()
    last_ck = time.perf_counter()
    acc, acc_n = 0.0, 0
    loader = None
    if tc.loader_workers > 0:
        batches = StepBatches(bank, tc.batch_size, mc.num_train_timesteps, tc.seed, dist.rank)
        loader = iter(step_loader(batches, step, tc.steps, tc.loader_workers, pin_memory=dev.type == "cuda"))
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    net.train()
    while step < tc.steps:
        timed_out = max_minutes is not None and (time.perf_counter() - t_start) > max_minutes * 60
        if dist.any(stop["flag"] or timed_out):  # all ranks stop at the same step
            break
        threads.before(step)
        t_step = time.perf_counter()
        batch = next(loader) if loader is not None else draw_batch(bank, tc.batch_size, mc.num_train_timesteps, gen)
        cond, x0, noise, t = (v.to(dev, non_blocking=loader is not None) for v in batch)
        xt = sched.add_noise(x0, noise, t)
        target = training_target(sched, x0, noise, t)
        w = perfusion_weights(x0, tc.hypo_threshold_s, tc.hypo_weight, tc.border_weight, tc.border_px)
        inp = torch.cat([cond, xt], 1)
        if use_cl:
            inp = inp.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc, restart)
        if amp_dtype is not None:
            with torch.autocast(device_type=dev.type, dtype=amp_dtype):
                out = model(inp, t)
        else:
            out = model(inp, t)
        loss = weighted_mse(out, target, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(tc.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, net_params, 1 - d)  # one fused update, not one per tensor
            for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
                be.copy_(bn)
        step += 1
        dt = time.perf_counter() - t_step
        train_seconds += dt
        threads.after(dt)
        acc = acc + loss.detach()  # summed on the device: no wait for the GPU at every step
        acc_n += 1
        if step % tc.log_every == 0 or step == tc.steps:
            history.append((step, dist.mean(float(acc) / acc_n)))
            if bar is not None:
                bar.set_postfix(loss=f"{history[-1][1]:.4f}", lr=f"{lr_at(step, tc, restart):.1e}", threads=threads.current)
            acc, acc_n = 0.0, 0
        if bar is not None:
            bar.update(1)
        if time.perf_counter() - last_ck > tc.checkpoint_minutes * 60:
            checkpoint()
            last_ck = time.perf_counter()
    loader = None  # stops the batch workers
    checkpoint()
    if bar is not None:
        bar.close()
    for sig, h in old_handlers.items():
        signal.signal(sig, h)
    summary = {"step": step, "target_steps": tc.steps, "train_seconds": train_seconds, "finished": step >= tc.steps,
               "last_loss": history[-1][1] if history else None, "run_dir": str(run)}
    if dist.world > 1:  # each rank's own weights, hashed: DDP keeps them equal, this shows it
        summary.update(world_size=dist.world, rank=dist.rank, weight_digests=dist.gather(weights_digest(net)))
        dist.barrier()
    return summary
