"""The ranks torchrun describes in the environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE).

Torch-free, so an entry point knows its rank (which one prints, which one writes) while it checks its flags and
files, before torch loads; `atb_models.distributed` joins the process group these describe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from atb_models.errors import UserError


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def node_leader(self) -> int:
        """The global rank of this node's LOCAL_RANK 0 (torchrun numbers a node's ranks contiguously)."""
        return self.rank - self.local_rank

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def env_state() -> ParallelState:
    """The ranks torchrun describes in the environment (a plain `python` run is one rank)."""
    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world = env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise UserError(f"inconsistent torchrun environment: RANK={rank} LOCAL_RANK={local_rank} "
                        f"WORLD_SIZE={world} LOCAL_WORLD_SIZE={local_world}")
    return ParallelState(rank, world, local_rank, local_world)
