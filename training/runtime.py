"""What every training loop here shares: torchrun/DDP set-up, mixed precision, resumable run state,
graceful interrupts and logs (JSON lines + TensorBoard), with writes on rank 0 only."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from bundle import write_atomic

from .data.views import collate_skipping

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN_STATE = "run_state.pt"
# Settings that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"workers", "device", "output_dir", "track_eval"}


class Schedule(Protocol):
    epochs: int
    lr: float
    warmup_epochs: int
    warmup_lr: float


def lr_at(epoch: int, cfg: Schedule) -> float:
    """The lr of epoch `epoch` (counted from 0), as the authors' Dassl schedule sets it: the constant warm-up lr,
    then a cosine whose count restarts at 0 after the warm-up (WARMUP_RECOUNT) and spans all `epochs`
    (CosineAnnealingLR, T_max = MAX_EPOCH), stepped once after each epoch. So the first epoch after the warm-up
    runs at `lr` and the last one above zero (20 epochs, 1 warm-up: cos(pi * 18/20), about 2.4% of `lr`)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max(1, cfg.epochs)))


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this setup() started the process group, so its teardown() ends it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Runtime:
    """One process per device. Under torchrun (WORLD_SIZE > 1) this joins the process group: NCCL on GPUs,
    gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        index = local_rank if world > 1 or device in ("auto", "cuda") else torch.device(device).index or 0
        chosen = torch.device("cuda", index)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return Runtime(rank, world, local_rank, chosen, owns_group)


def teardown(rt: Runtime) -> None:
    """End the process group only where this runtime started it: a protocol runner keeps one group over
    the many stages it runs."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def reduce_sum(rt: Runtime, *values: float) -> list[float]:
    """Sum numbers over all ranks (metrics are reported for the whole job, not one shard)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor.tolist()


def autocast(rt: Runtime, precision: str):
    """bf16/fp16 autocast where asked; fp32 runs as is. No module is ever cast by hand."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=dtype)


def grad_scaler(rt: Runtime, precision: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def read_tagged(path: Path, fmt: str, kind: str) -> dict:
    """A checkpoint written by this project with format tag `fmt`; a clear error for anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {kind} checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path} is not a PromptKD {kind} checkpoint (format {fmt})")
    return ckpt


def load_run_state(path: Path, config: dict) -> dict:
    """A run state saved by this engine, refused when the run's settings have changed since."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = {k for k in config if k not in RESUMABLE_CHANGES and state["config"].get(k) != config[k]}
    if changed:
        raise ValueError(f"cannot resume {path}: settings changed since it was saved ({', '.join(sorted(changed))})")
    return state


class Interrupt:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so it can save and exit cleanly. An
    Interrupt around this one (a pipeline running the loop as one of its steps) gets the request too: a signal after
    the loop's last check would otherwise be lost when the loop ends."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "Interrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True
        outer = getattr(self._previous.get(signum), "__self__", None)
        if isinstance(outer, Interrupt):
            outer.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(RuntimeError):
    """Training stopped on a signal after saving its state; `--resume` continues it."""


class RunState:
    """The run_state.pt of a resumable run: saved after every epoch and on an interrupt (rank 0 only), and
    loaded by `--resume` unless the run's settings changed since."""

    def __init__(self, folder: Path, config: dict, rt: Runtime) -> None:
        self.path, self.config, self.rt = folder / RUN_STATE, config, rt

    def load(self, resume: bool, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> dict | None:
        """With `resume` and a saved state: the optimiser and loss scaler restored, and the state (epoch, step and
        what the loop saved) returned for the loop to restore the rest."""
        if resume and self.path.is_file():
            state = load_run_state(self.path, self.config)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            log.info("resuming at epoch %d, step %d", state["epoch"] + 1, state["step"])
            return state
        if resume:
            log.warning("--resume: no %s in %s, starting from scratch", RUN_STATE, self.path.parent)
        return None

    def save(self, epoch: int, step: int, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             **progress) -> None:
        if self.rt.is_main:
            save_atomic(self.path, {"config": self.config, "epoch": epoch, "step": step,
                                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), **progress})


def stage_bar(name: str, epochs: int, images_per_epoch: int, start_epoch: int, start_step: int,
              batch_size: int, rt: Runtime) -> tqdm:
    """One progress bar for a whole training stage, counted in this process's images: its rate is images/s and
    its ETA is the stage's, a resumed run starting where it stopped. Shown by rank 0 on a terminal only."""
    done = min(start_epoch * images_per_epoch + start_step * batch_size, epochs * images_per_epoch)
    return tqdm(total=epochs * images_per_epoch, initial=done, desc=name, unit="img", dynamic_ncols=True,
                disable=None if rt.is_main else True)


class EpochSteps:
    """One epoch of a resumable loop over this process's shard: iterating yields (images, indices, labels) per
    step and advances the stage's progress bar. Steps done before a resume are skipped, as are batches whose every
    image was unreadable (counted in `skipped`). After each step an interrupt is honoured: `save(epoch,
    next_step)`, then Interrupted."""

    def __init__(self, dataset, sampler, batch_size: int, workers: int, drop_last: bool, epoch: int, epochs: int,
                 start_step: int, stop: Interrupt, save: Callable[[int, int], None], name: str, bar: tqdm) -> None:
        sampler.set_epoch(epoch)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                 collate_fn=collate_skipping, drop_last=drop_last)
        self.epoch, self.epochs, self.start_step = epoch, epochs, start_step
        self.stop, self.save, self.name, self.bar = stop, save, name, bar
        self.skipped = 0

    def __iter__(self):
        self.bar.set_description(f"{self.name} epoch {self.epoch + 1}/{self.epochs}")
        for step, (images, indices, labels, skipped) in enumerate(self.loader):
            if step < self.start_step:
                continue
            self.skipped += skipped
            self.bar.update(len(indices) + skipped)
            if not len(indices):
                continue
            yield images, indices, labels
            if self.stop.requested:
                self.save(self.epoch, step + 1)
                raise Interrupted(f"stopped at epoch {self.epoch + 1}, step {step + 1}; rerun with --resume")

    def show(self, loss: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class RunLog:
    """metrics.jsonl (one JSON object per event) and TensorBoard events, written by rank 0 only."""

    def __init__(self, folder: Path, rt: Runtime) -> None:
        self.enabled = rt.is_main
        self.path = folder / "metrics.jsonl"
        self.writer = None
        if self.enabled:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: writing metrics.jsonl only")

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
