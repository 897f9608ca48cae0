"""Several processes (one per GPU) training one run: the process group, gradient averaging, rank agreement.

torchrun starts the processes and describes the group in their environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR/PORT``); ``loraloom train CONFIG --gpus N`` and the Train steps node's ``gpus``
input start it for you (:func:`launch_command`). Every rank holds the whole model and adapter, trains on its own
share of the batches (the bucket sampler deals them) and averages the adapter's gradients with the others
before each optimizer step, so all ranks apply the same update and hold the same adapter. Rank 0 writes the
run folder. In a single process every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# A rank may wait this long at a collective while another finishes its share of the encoder caches or draws a
# preview. torchrun ends every rank when one fails, so a long limit never hides a dead rank.
TIMEOUT = datetime.timedelta(hours=2)


def launch_command(processes: int, module: str, args: list[str]) -> list[str]:
    """``python -m module args`` on ``processes`` ranks of this machine, through torchrun.

    ``--standalone`` picks a free port, so two runs on one machine do not meet.
    """
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ValueError(f"{processes} GPUs asked for, but this machine has {torch.cuda.device_count()}: "
                         "use at most that many (set CUDA_VISIBLE_DEVICES to choose them)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", module, *args]


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun describes in the environment; nothing to do in a single process.

    nccl with each rank on the GPU of its ``LOCAL_RANK``, gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # "cuda" means this rank's GPU from now on
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients of ``params`` and the 0-d ``loss`` over the ranks; returns the mean loss.

    One all_reduce of one flat buffer per optimizer step, after the last micro-batch: the adapter's gradients
    are small (a rank-16 Flux LoRA on attention and MLP: about 65M floats, a few ms on NVLink against a step of
    seconds), so DDP's overlap with backward would buy little, and this needs no model wrapper, no ``no_sync``
    for gradient accumulation and no care around gradient checkpointing. A NaN or inf on any rank reaches
    every rank's sums, so all ranks take the same skip decision.
    """
    world = rank_and_world()[1]
    if world == 1:
        return loss
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [loss.view(1)])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat[:-1].split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
    return flat[-1]


def from_main(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[T] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj`` on every rank, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[T] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a stop request seen by one rank stops all at one step."""
    return any(all_gather(flag))


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it: they find what it cached instead of redoing it."""
    main = rank_and_world()[0] == 0
    if not main:
        barrier()
    yield
    if main:
        barrier()
