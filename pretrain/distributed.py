"""Process group from torchrun's environment (as nanoGPT): one process is the plain case, not a special mode.

    env = setup("auto")        # reads RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPU, gloo on CPU
    keys_all = gather(keys)    # (world x N) x D, rank order, no gradient
    if any_true_host(batch is None): ...   # every rank takes the same decision (host flag, gloo side group)
    teardown(env)

A peer that dies or hangs must not hang the others: ``setup(..., timeout_s)`` sets the process group's timeout
(collectives that wait longer raise), and :func:`peer_failure` turns what gloo/nccl raise into one clear line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ctbench.errors import UserError

_control: dist.ProcessGroup | None = None  # gloo group for host flags under nccl (None: the default gloo group)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Pick the device and, under torchrun (``WORLD_SIZE`` > 1), join the process group; a collective waiting
    longer than ``timeout_s`` (default: torch's) raises instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = cuda but no CUDA device is visible; use train.device=cpu")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    global _control
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None, timeout=timeout)
        # host-side control flags go through gloo: with nccl they would sync the GPU stream at every step
        _control = dist.new_group(backend="gloo", timeout=timeout) if dev.type == "cuda" else None
    return DistEnv(rank, world, local_rank, dev)


def teardown(env: DistEnv) -> None:
    global _control
    _control = None
    if env.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, dist.DistError):  # a dead peer: nothing left to tear down cleanly
            pass


# What a collective raises when another process died (connection reset/closed) or hung (timeout).
PEER_FAILURES: tuple[type[BaseException], ...] = (dist.DistError, RuntimeError)
_PEER_SIGNS = ("connection", "timed out", "timeout", "peer", "gloo", "nccl", "socket", "broken pipe")


def peer_failure(env: DistEnv, e: BaseException, timeout_s: float | None) -> BaseException:
    """The one-line :class:`UserError` for a collective that failed because another process died or hung;
    ``e`` itself when it is not such a failure (a bug must keep its traceback)."""
    text = str(e).strip()
    if not isinstance(e, dist.DistError) and not any(s in text.lower() for s in _PEER_SIGNS):
        return e
    first = text.splitlines()[0][:160] if text else type(e).__name__
    wait = f" (process-group timeout {timeout_s:g} s)" if timeout_s else ""
    return UserError(f"rank {env.rank}/{env.world_size}: lost another process of the run{wait}: {first}. It died or "
                     "hung (see its log); restart the same command to resume from the last checkpoint")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0; identity on one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_true(flag: torch.Tensor) -> torch.Tensor:
    """Logical AND of a boolean tensor over ranks."""
    if world_size() == 1:
        return flag
    v = flag.to(torch.int32)
    dist.all_reduce(v, op=dist.ReduceOp.MIN)
    return v.bool()


def any_true_host(flag: bool) -> bool:
    """Logical OR of a host-side flag over ranks, in one small collective on the CPU (the gloo side group under
    nccl, so the GPU stream is not synchronised); no collective on one process. Every rank must call it."""
    if world_size() == 1:
        return bool(flag)
    v = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=_control)
    return bool(v.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics, queue, pointer) to every rank; no-op on one process.

    DDP hands rank 0's query-encoder buffers to every rank at the start of each forward, but each rank then updates
    its own copy (and the key encoder's), so after the last step the ranks hold different running statistics. The
    checkpoint is rank 0's; calling this when saving makes every rank's model equal to what was saved."""
    if world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, 0)
