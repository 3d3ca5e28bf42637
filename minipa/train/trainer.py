"""One training loop for every model of the tiny world: the habits of a real training tool, in ~200 lines.

- Determinism without saved RNG state: everything random at step s (which images, which noise,
  which timesteps, which captions are dropped) is drawn from a generator seeded with (seed, s),
  for the *global* batch. Resuming at step s therefore sees exactly the data an uninterrupted run
  would have seen, and `--resume` continues bit for bit from the model + optimizer + EMA state.
- Checkpoints are written atomically (a temporary file, then `os.replace`), so an interruption
  (Ctrl-C, a killed job) always leaves the last complete checkpoint in place.
- Scale-out: under `torchrun`, each of the W processes takes its 1/W slice of the same global batch
  and `DistributedDataParallel` averages the gradients over gloo. The mean of equal-sized slice
  means is the global mean, so W processes follow the single-process run. Training runs on the CPU:
  nothing here places a tensor on a GPU (NCCL, the GPU backend, would need that), so a CUDA machine
  trains on its CPU cores too.

A stage gives `fit` a `TrainingModule`: an nn.Module whose frozen parts have requires_grad=False,
whose `forward(batch)` returns the loss, and whose `batch(generator, size)` draws a global batch.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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

    def batch(self, generator: torch.Generator, size: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def step_generator(seed: int, step: int) -> torch.Generator:
    """The only source of randomness at `step`: a pure function of (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ─── processes ───────────────────────────────────────────────────────────────────────────────────


def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when run under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # CPU tensors only (see the module docstring)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def local_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This process's share of a global batch: rows [rank·B/W, (rank+1)·B/W) of every tensor."""
    size = len(next(iter(batch.values())))
    if size % world:
        raise ValueError(f"the global batch ({size}) must divide evenly over {world} processes")
    share = size // world
    return {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()}


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


def fit(module: TrainingModule, schedule: Schedule, checkpoint: Path, *, name: str, resume: bool = False,
        progress: bool = True) -> dict:
    """Train the parameters of `module` that require grad; returns {"losses", "seconds", "ema"}.

    The EMA weights (or the raw weights, without EMA) are the result, in `result["ema"]`, and are
    also loaded into `module` at the end. Checkpoint every `schedule.checkpoint_every` steps and at
    the end; with `resume`, continue from `checkpoint` if it exists.
    """
    rank, world = distributed()
    checkpoint = Path(checkpoint)
    optimizer = make_optimizer(module, schedule)
    ema, start, losses, seconds = trainable_state(module), 0, [], 0.0
    if resume and checkpoint.is_file():
        ema, start, losses, seconds = _resume(module, optimizer, checkpoint, schedule, name)
    model = _data_parallel(module) if world > 1 else module

    def save(step: int):
        if rank == 0:
            save_atomically({"stage": name, "schedule": asdict(schedule), "step": step, "model": trainable_state(module),
                             "optimizer": optimizer.state_dict(), "ema": ema, "losses": losses, "seconds": seconds}, checkpoint)

    bar = tqdm(total=schedule.steps, initial=start, desc=name, disable=not progress or rank != 0, dynamic_ncols=True)
    began = time.perf_counter() - seconds
    try:
        for step in range(start, schedule.steps):
            loss = _train_step(model, module, optimizer, schedule, step, rank, world)
            _update_ema(ema, module, schedule.ema)
            losses.append(_global_mean(loss.detach(), world))
            seconds = time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", refresh=False)
            if (step + 1) % schedule.checkpoint_every == 0 or step + 1 == schedule.steps:
                save(step + 1)
    except KeyboardInterrupt:
        bar.close()
        if rank == 0:
            print(f"\n{name}: interrupted at step {len(losses)}; the last checkpoint ({checkpoint}) is intact: rerun with --resume")
        raise
    bar.close()
    load_trainable(module, ema)
    return {"losses": losses, "seconds": seconds, "ema": ema}


def make_optimizer(module: nn.Module, schedule: Schedule) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, with weight decay on the weight matrices only."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases and norms
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.999),
    )


def _resume(module: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path, schedule: Schedule,
            name: str) -> tuple[dict, int, list, float]:
    """Load `checkpoint` into `module` and `optimizer`; → (ema, step, losses, seconds) to continue from."""
    state = _load_checkpoint(checkpoint, schedule, name)
    if set(state["model"]) != {n for n, p in module.named_parameters() if p.requires_grad}:
        raise CheckpointError(f"{checkpoint}: its parameters are not those of stage {name!r}")
    load_trainable(module, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["ema"], state["step"], state["losses"], state["seconds"]


def _train_step(model: nn.Module, module: TrainingModule, optimizer: torch.optim.Optimizer, schedule: Schedule,
                step: int, rank: int, world: int) -> torch.Tensor:
    """One optimizer step on this process's slice of step `step`'s global batch; returns the slice's loss."""
    batch = local_slice(module.batch(step_generator(schedule.seed, step), schedule.batch_size), rank, world)
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr_at(step)
    loss = model(batch)  # `model`: `module`, or its DistributedDataParallel wrapper
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _data_parallel(module: nn.Module) -> nn.Module:
    """DistributedDataParallel that does not re-send buffers before every step: ours are constants,
    equal in every process. torch 2.13 renamed the switch (and warns on the old name)."""
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(module, forward_sync_buffers=False)
    return ddp(module, broadcast_buffers=False)


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
