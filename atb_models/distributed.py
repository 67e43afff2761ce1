"""Tensor-parallel process state and the few collectives the model needs.

torchrun starts one process per device and sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); `init_distributed` joins the torch.distributed process group with the backend the
platform plan chose (hccl, nccl or gloo); `atb_models.ranks` reads those variables. With one rank nothing is
initialised and every collective is a no-op.
"""
import atexit
import functools
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from atb_models.errors import RankLost
from atb_models.ranks import ParallelState, env_int

logger = logging.getLogger("atb_models")

# How long a collective may wait for a missing rank before the job fails instead of hanging.
DEFAULT_TIMEOUT_S = 300

_state = ParallelState()

LOST_RANK_MESSAGE = "a collective failed, most likely because another rank stopped"


def _collective(fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # gloo, nccl and hccl each raise their own error types
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"{LOST_RANK_MESSAGE} ({fn.__name__}: {detail})") from e
    return guarded


def init_distributed(plan, state: ParallelState) -> None:
    """Join the process group (once per process) and share this node's CPU cores among its ranks."""
    global _state
    _state = state
    if state.world_size == 1:
        return
    if plan.kind == "cpu":
        # Ranks of one node share its cores; more threads than cores makes every collective wait on stragglers.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.local_world_size))
    if dist.is_initialized():
        return
    plan.make_current()
    timeout = timedelta(seconds=env_int("ATB_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(plan.dist_backend, rank=state.rank, world_size=state.world_size, timeout=timeout)
    # A process group left to the interpreter's teardown can abort the process ("terminate called without an
    # active exception" from gloo's threads): leave it explicitly.
    atexit.register(shutdown)
    logger.info("rank %d of %d joined the %s process group", state.rank, state.world_size, plan.dist_backend)


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.world_size


@_collective
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state.world_size > 1:
        dist.all_reduce(x)
    return x


@_collective
def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension, in rank order."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


@_collective
def broadcast_from_rank0(values: list) -> list:
    """Rank 0's object on every rank: the sampled tokens (every rank must continue with the same ones), or the
    error of a draw that failed there, which every rank then raises."""
    if _state.world_size == 1:
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@_collective
def gather_objects(obj) -> list:
    """Every rank's picklable object, indexed by rank."""
    if _state.world_size == 1:
        return [obj]
    out = [None] * _state.world_size
    dist.all_gather_object(out, obj)
    return out


@_collective
def barrier() -> None:
    if _state.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()
