"""Process group from torchrun's environment (as nanoGPT): one process is the plain case, not a special mode.

    env = setup("auto")        # reads RANK / WORLD_SIZE / LOCAL_RANK; nccl on GPU, gloo on CPU
    keys_all = gather(keys)    # (world x N) x D, rank order, no gradient
    if any_true_host(batch is None): ...   # every rank takes the same decision (host flag, gloo side group)
    teardown(env)

A peer that dies or hangs must not hang the others: ``setup(..., timeout_s)`` sets the process group's timeout
(collectives that wait longer raise), and :func:`peer_failure` turns what gloo/nccl raise into one clear line.

Elastic restarts (``torchrun --max-restarts N``): torchrun's agent keeps one TCPStore server for every generation
of workers (``TORCHELASTIC_USE_AGENT_STORE=True``), and torch's ``env://`` rendezvous uses it without a per-generation
prefix, so a restarted rank can read the address a dead rank of the failed generation left there (gloo:
"connectFullMesh failed ... Connection refused"; nccl: a stale unique id) or pass a barrier counted by the old
generation (a hang). :func:`setup` therefore scopes the process group's keys to a token that rank 0 of *this*
generation makes and every other rank confirms (:func:`_generation_token`); torchrun's own restart counts cannot
serve, they are per node and differ between nodes (pytorch/pytorch#135712, #108158).

Stopping on a signal: :class:`StopSignals` turns SIGINT / SIGTERM / SIGUSR1 into a request that the training loops
read at a step boundary; ``host_max([..., stop.signum])`` makes every rank see it at the same step, so all ranks
write the checkpoint of the same step and raise :class:`Interrupted`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ctbench.errors import UserError

_control: dist.ProcessGroup | None = None  # gloo group for host flags under nccl (None: the default gloo group)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    restart: int = 0  # torchrun's TORCHELASTIC_RESTART_COUNT, the highest over the ranks (0 outside torchrun)

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
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            store = _generation_store(timeout or default_pg_timeout)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=world, device_id=dev if dev.type == "cuda" else None, timeout=timeout)
            # host-side control flags go through gloo: with nccl they would sync the GPU stream at every step
            _control = dist.new_group(backend="gloo", timeout=timeout) if dev.type == "cuda" else None
            restart = host_max([restart])[0]
        except (*PEER_FAILURES, TimeoutError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"rank {rank}/{world}: could not form the process group at {where}: {first}") from e
    return DistEnv(rank, world, local_rank, dev, restart)


def _generation_store(timeout: timedelta) -> dist.Store:
    """The store of ``env://`` (MASTER_ADDR / MASTER_PORT, as torch's own rendezvous), scoped to this generation of
    workers when it is torchrun's agent store, which outlives the workers of a failed generation."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store  # rank 0 hosts a fresh store: nothing is left from an earlier generation
    return dist.PrefixStore(f"ctbench/{_generation_token(store, rank, world, timeout)}/", store)


_HANDSHAKE = "ctbench/handshake"


def _generation_token(store: dist.Store, rank: int, world: int, timeout: timedelta) -> str:
    """A token every rank of this generation agrees on and no earlier generation used.

    Rank 0 makes a fresh token T. Every other rank r posts a fresh token h_r and waits until rank 0 answers
    ``h_r T``, then confirms with the same text; rank 0 answers whatever ``h_r`` it reads (the key may still hold a
    dead rank's value, and is answered again once the new value arrives) until every rank has confirmed. An answer
    holding h_r can only come from a rank 0 that read this process's h_r, and a confirmation holding T only from a
    rank that read this rank 0's answer, so stale keys of a failed generation are never taken for current ones."""
    deadline = time.monotonic() + timeout.total_seconds()

    def key(kind: str, r: int) -> str:
        return f"{_HANDSHAKE}/{kind}/{r}"

    def value(k: str) -> str | None:
        return store.get(k).decode() if store.check([k]) else None

    def wait() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout.total_seconds():g} s waiting for the other ranks to join")
        time.sleep(0.02)

    if rank == 0:
        token = uuid.uuid4().hex
        answered: dict[int, str] = {}
        pending = set(range(1, world))
        while pending:
            for r in sorted(pending):
                hello = value(key("hello", r))
                if hello is None:
                    continue
                if answered.get(r) != hello:
                    store.set(key("answer", r), f"{hello} {token}")
                    answered[r] = hello
                if value(key("confirm", r)) == f"{hello} {token}":
                    pending.discard(r)
            if pending:
                wait()
        return token
    mine = uuid.uuid4().hex
    store.set(key("hello", rank), mine)
    while True:
        answer = value(key("answer", rank))
        if answer is not None and answer.startswith(mine + " "):
            store.set(key("confirm", rank), answer)
            return answer.split(" ", 1)[1]
        wait()


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
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) - env.restart
    then = (f"torchrun restarts the workers ({left} restart(s) left), which resume from the last checkpoint"
            if left > 0 else "restart the same command to resume from the last checkpoint")
    return UserError(f"rank {env.rank}/{env.world_size}: lost another process of the run{wait}: {first}. It died or "
                     f"hung (see its log); {then}")


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


def host_max(values: list[int]) -> list[int]:
    """Element-wise maximum of small host-side integers over ranks, in one small collective on the CPU (the gloo
    side group under nccl, so the GPU stream is not synchronised); no collective on one process. Every rank must
    call it. ``host_max([batch is None, stop.signum])``: any rank's unreadable batch, any rank's stop request."""
    if world_size() == 1:
        return [int(v) for v in values]
    v = torch.tensor([int(x) for x in values], dtype=torch.int64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=_control)
    return v.tolist()


def any_true_host(flag: bool) -> bool:
    """Logical OR of a host-side flag over ranks (:func:`host_max` of one flag)."""
    return bool(host_max([int(bool(flag))])[0])


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


# ---- stopping on a signal ------------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C; kill, SLURM preemption; SLURM --signal


class Interrupted(KeyboardInterrupt):
    """Raised by a training loop after a stop signal, once the checkpoint of the step it stopped at is written
    (a KeyboardInterrupt, so ``cli_main`` prints "interrupted" and exits with 130)."""


class StopSignals:
    """While active, SIGINT / SIGTERM / SIGUSR1 only record a request (:attr:`signum`) that a training loop reads at
    its next step boundary; a second SIGINT raises KeyboardInterrupt at once (no checkpoint). Handlers are installed
    from the main thread only (elsewhere signals keep their behaviour) and the previous ones come back on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def worker_ignores_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders a training loop reads: their workers ignore the stop signals.

    ``timeout -s INT``, a terminal's Ctrl-C, SLURM and torchrun's agent signal the whole process group, data-loader
    workers included; torch's workers die of SIGTERM (and SIGUSR1), and the training process then raises "DataLoader
    worker ... is killed by signal" in the middle of a step instead of stopping at the step boundary with a
    checkpoint. Ignoring them leaves the decision to the training process; a worker still ends when its parent
    does (torch's watchdog)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
