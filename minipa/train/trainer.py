"""One training loop for every model of the tiny world: the habits of a real training tool, in ~200 lines.

- Determinism without saved RNG state: everything random at step s (which images, which noise,
  which timesteps, which captions are dropped) is drawn from a generator seeded with (seed, s),
  for the *global* batch. Resuming at step s therefore sees exactly the data an uninterrupted run
  would have seen, and `--resume` continues bit for bit from the model + optimizer + EMA state.
- Checkpoints are written atomically (a temporary file, then `os.replace`), so an interruption
  (Ctrl-C, a killed job) always leaves the last complete checkpoint in place.
- Scale-out: under `torchrun`, each of the W processes takes its 1/W slice of the same global batch
  and `DistributedDataParallel` averages the gradients (NCCL between GPUs, gloo between CPUs). The
  mean of equal-sized slice means is the global mean, so W processes follow the single-process run;
  gradient accumulation splits a process's slice once more, into micro-batches, for the same reason.
- Any device, any precision (`Compute`): the batch is drawn on the CPU (so a seed means the same data
  everywhere), then moved to the module's device (data tables stay in host memory: a stage moves the rows
  it reads); bf16/fp16 run the forward pass under autocast, the trainable parameters and the optimizer state
  stay float32, and fp16 scales the loss (`GradScaler`) so that small gradients do not underflow. fp32 on
  the CPU is exactly the loop without any of this. The tiny world's stages train on the CPU.

A stage gives `fit` a `TrainingModule`: an nn.Module whose frozen parts have requires_grad=False,
whose `forward(batch)` returns the loss, and whose `batch(generator, size)` draws a global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Schedule:
    """How long and how fast one stage trains."""

    steps: int
    batch_size: int  # the global batch, split evenly over the processes
    lr: float
    weight_decay: float = 0.0
    warmup: int = 50  # linear warm-up steps, then cosine decay to `final_lr_fraction`·lr
    final_lr_fraction: float = 0.1
    ema: float | None = None  # decay of an exponential moving average of the weights (None: no EMA)
    checkpoint_every: int = 200
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.final_lr_fraction + (1 - self.final_lr_fraction) * cosine)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """"cuda" when PyTorch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Compute:
    """Where and in which precision a stage trains. Apart from rounding, none of it changes what is learned:
    `accumulation` cuts each process's share of the batch into that many micro-batches (less memory, same step)."""

    device: str = "cpu"  # "cpu", "cuda" (under torchrun: this process's GPU) or "cuda:N"
    precision: str = "fp32"  # "fp32", "bf16" or "fp16": the dtype of the frozen models and of autocast
    accumulation: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ', a CPU-only build'}); train on the CPU with device cpu")
        if self.precision == "fp16" and torch.device(self.device).type == "cpu":
            raise ValueError("precision fp16 needs a CUDA device (PyTorch's CPU kernels and GradScaler are not made for it); "
                             "on the CPU use bf16 or fp32")
        if type(self.accumulation) is not int or self.accumulation < 1:
            raise ValueError(f"gradient accumulation must be a whole number ≥ 1, got {self.accumulation!r}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def autocast(self):
        """The forward pass's precision: bf16/fp16 matmuls and convolutions, float32 where autocast keeps it."""
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype, enabled=self.precision != "fp32")


class TrainingModule(nn.Module):
    """What a stage provides: the loss of a batch, and how to draw one.

    Checkpoints, the EMA and the optimizer know each parameter by its name in `named_parameters()`, where a
    parameter that two parts hold is named after the part registered first. `owners` are registered before
    anything else, so that shared parameters carry their owner's name: the IP-Adapter's Wk′/Wv′, which the
    UNet's attention layers also hold, are `adapter.*`."""

    def __init__(self, **owners: nn.Module):
        super().__init__()
        for name, part in owners.items():
            self.add_module(name, part)

    def at_step(self, step: int) -> None:
        """Told which step comes next, before its batch is drawn: a stage whose data change as it trains
        (a curriculum) overrides this; the batch stays a function of (seed, step), so resuming sees the same data."""

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def step_generator(seed: int, step: int) -> torch.Generator:
    """The only source of randomness at `step`: a pure function of (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ─── processes ───────────────────────────────────────────────────────────────────────────────────


def distributed(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size); starts the process group when run under torchrun (with one process too):
    NCCL for GPUs, gloo for CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return (dist.get_rank(), world) if dist.is_initialized() else (0, 1)


def process_device(device: str) -> torch.device:
    """This process's device: under torchrun, "cuda" means the GPU of its local rank (one process per GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` of a table kept in host memory, moved to where `index` is (the batch's device)."""
    return table[index.cpu()].to(index.device)


def local_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This process's share of a global batch: rows [rank·B/W, (rank+1)·B/W) of every tensor."""
    size = len(next(iter(batch.values())))
    if size % world:
        raise ValueError(f"the global batch ({size}) must divide evenly over {world} processes")
    share = size // world
    return {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}


def split_rows(fn: Callable[[int, int], torch.Tensor], n: int, rank: int, world: int) -> torch.Tensor:
    """fn(lo, hi) → rows lo…hi−1 of a table; each process computes its share, all_gather joins them."""
    if world == 1:
        return fn(0, n)
    share = -(-n // world)
    lo, hi = rank * share, min(n, (rank + 1) * share)
    part = fn(lo, hi)
    part = torch.cat([part, part.new_zeros(share - len(part), *part.shape[1:])])  # equal sizes for all_gather
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part)
    return torch.cat(parts)[:n]


# ─── checkpoints ─────────────────────────────────────────────────────────────────────────────────


def save_atomically(obj, path: Path) -> None:
    """torch.save to `path.tmp`, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters of `module` (the frozen rest is not in checkpoints)."""
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.copy_(state[name])


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (another stage, other settings)."""


def _load_checkpoint(path: Path, schedule: Schedule, name: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("stage") != name or state.get("schedule") != asdict(schedule):
        raise CheckpointError(
            f"{path}: this checkpoint is for stage {state.get('stage')!r} with settings {state.get('schedule')}; "
            f"resuming {name!r} with {asdict(schedule)} would not continue the same run. Delete it to start over."
        )
    return state


# ─── the loop ────────────────────────────────────────────────────────────────────────────────────


@dataclass
class _Run:
    """Everything a checkpoint holds besides the settings and the trainable weights."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scale (a no-op in fp32 and bf16)
    ema: dict
    step: int = 0
    losses: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def fit(module: TrainingModule, schedule: Schedule, checkpoint: Path, *, name: str, resume: bool = False,
        progress: bool = True, compute: Compute | None = None, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train the parameters of `module` that require grad; returns {"losses", "seconds", "ema"}.

    The EMA weights (or the raw weights, without EMA) are the result, in `result["ema"]`, and are
    also loaded into `module` at the end. Checkpoint every `schedule.checkpoint_every` steps and at
    the end; with `resume`, continue from `checkpoint` if it exists. `compute`: device, precision and
    gradient accumulation (default: the CPU, fp32). `on_step(n)` runs in the first process after step n
    (counted from 1) and its checkpoint: to export weights or draw samples on the way.
    """
    compute = compute or Compute()
    rank, world = distributed(compute.device)
    if schedule.batch_size % (world * compute.accumulation):
        raise ValueError(f"the batch ({schedule.batch_size}) must divide evenly over {world} process(es) × "
                         f"{compute.accumulation} micro-batch(es)")
    device = process_device(compute.device)
    checkpoint = Path(checkpoint)
    module.to(device)
    run = _Run(make_optimizer(module, schedule), torch.amp.GradScaler(device.type, enabled=compute.precision == "fp16"),
               trainable_state(module))
    if resume and checkpoint.is_file():
        _resume(module, run, checkpoint, schedule, name)
    model = _data_parallel(module, device) if dist.is_initialized() else module
    bar = tqdm(total=schedule.steps, initial=run.step, desc=name, disable=not progress or rank != 0, dynamic_ncols=True)
    began = time.perf_counter() - run.seconds
    try:
        for step in range(run.step, schedule.steps):
            loss = _train_step(model, module, run, schedule, compute, step, (rank, world), device)
            _update_ema(run.ema, module, schedule.ema)
            run.losses.append(_global_mean(loss, world))
            run.step, run.seconds = step + 1, time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(loss=f"{sum(run.losses[-20:]) / len(run.losses[-20:]):.4f}", refresh=False)
            if rank == 0 and (run.step % schedule.checkpoint_every == 0 or run.step == schedule.steps):
                _save(module, run, checkpoint, schedule, name)
            if rank == 0 and on_step is not None:
                on_step(run.step, run.losses[-1])
    except KeyboardInterrupt:
        bar.close()
        if rank == 0:
            print(f"\n{name}: interrupted at step {len(run.losses)}; the last checkpoint ({checkpoint}) is intact: rerun with --resume")
        raise
    bar.close()
    load_trainable(module, run.ema)
    return {"losses": run.losses, "seconds": run.seconds, "ema": run.ema}


def make_optimizer(module: nn.Module, schedule: Schedule) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, with weight decay on the weight matrices only."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.999),
    )


def _save(module: nn.Module, run: _Run, checkpoint: Path, schedule: Schedule, name: str) -> None:
    save_atomically({"stage": name, "schedule": asdict(schedule), "step": run.step, "model": trainable_state(module),
                     "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "ema": run.ema,
                     "losses": run.losses, "seconds": run.seconds}, checkpoint)


def _resume(module: nn.Module, run: _Run, checkpoint: Path, schedule: Schedule, name: str) -> None:
    """Load `checkpoint` into `module` and `run`, to continue from its step."""
    state = _load_checkpoint(checkpoint, schedule, name)
    if set(state["model"]) != {n for n, p in module.named_parameters() if p.requires_grad}:
        raise CheckpointError(f"{checkpoint}: its parameters are not those of stage {name!r}")
    load_trainable(module, state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    device = next(iter(run.ema.values())).device
    run.ema = {k: v.to(device) for k, v in state["ema"].items()}
    run.step, run.losses, run.seconds = state["step"], state["losses"], state["seconds"]


def _train_step(model: nn.Module, module: TrainingModule, run: _Run, schedule: Schedule, compute: Compute, step: int,
                process: tuple[int, int], device: torch.device) -> torch.Tensor:
    """One optimizer step on this process's slice of step `step`'s global batch, in `compute.accumulation`
    micro-batches whose gradients add up; returns the slice's loss."""
    module.at_step(step)
    batch = local_slice(module.batch(step_generator(schedule.seed, step), schedule.batch_size), *process)
    for group in run.optimizer.param_groups:
        group["lr"] = schedule.lr_at(step)
    n = compute.accumulation
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(n):
        piece = {k: v.to(device) for k, v in local_slice(batch, i, n).items()}
        sync = i == n - 1 or model is module  # DistributedDataParallel averages the gradients after the last micro-batch only
        with contextlib.nullcontext() if sync else model.no_sync():
            with compute.autocast():
                loss = model(piece)  # `model`: `module`, or its DistributedDataParallel wrapper
            run.scaler.scale(loss / n).backward()  # the mean over micro-batches is the mean over the slice
        total = total + loss.detach()
    run.scaler.step(run.optimizer)  # fp16: unscale, and skip the step if a gradient overflowed
    run.scaler.update()
    return total / n


def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel that does not re-send buffers before every step: ours are constants,
    equal in every process. torch 2.13 renamed the switch (and warns on the old name)."""
    ddp = nn.parallel.DistributedDataParallel
    devices = {"device_ids": [device.index]} if device.type == "cuda" else {}
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(module, forward_sync_buffers=False, **devices)
    return ddp(module, broadcast_buffers=False, **devices)


@torch.no_grad()
def _update_ema(ema: dict, module: nn.Module, decay: float | None) -> None:
    for name, p in module.named_parameters():
        if p.requires_grad:
            if decay is None:
                ema[name].copy_(p)
            else:
                ema[name].lerp_(p.detach(), 1 - decay)  # ema ← decay·ema + (1 − decay)·θ


def _global_mean(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)
