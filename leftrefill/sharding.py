"""Sharded evaluation: an evaluation script started by torchrun on N processes (ranks), on one machine or
many, each rank evaluating a disjoint part of the test set, and rank 0 writing the files one process would
have written (docs/inference.md, "Evaluating on many GPUs and nodes").

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``, ``MASTER_PORT``).
A process that SLURM's ``srun`` started without torchrun (one task per GPU, as Lightning trains) takes the
same from srun's (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, the step's first node, a port
from the job id unless ``MASTER_PORT`` is set): ``srun_variables``. Without either, or
with ``WORLD_SIZE`` 1, there is one shard and nothing here starts a process group.

The rule: the test set is cut into the batches one process makes (items [0, B), [B, 2B), ...), and at step
s rank r evaluates batch ``s * world_size + r``. Every batch is thus a batch of the one-process run, the
same items sampled together with the same seeds (each item's seed comes from its index in the whole set),
so the results are the same whatever the number of ranks; an uneven count leaves the last ranks without a
batch at the last step. After each step the ranks exchange what they produced: rank order is then the
one-process order, and a rank that failed stops every rank at once instead of leaving them waiting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)

# How long a rank waits at an exchange: for the slowest rank's batch (a RealFill scene: minutes) and, at the
# first, for every rank's model to load
EXCHANGE_TIMEOUT = timedelta(hours=2)


class LaunchError(ValueError):
    """torchrun's variables do not describe a run: one line naming them."""


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail, when another one did: the run stops on every rank. ``rank`` is
    None when that rank left without a word (its process ended before or during an exchange)."""

    def __init__(self, rank: int | None, error: str):
        super().__init__(f"rank {rank} failed: {error}" if rank is not None else f"another rank left the run: {error}")
        self.rank = rank


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks of a run; ``Shard()`` is the whole set in one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank on its machine: which GPU it takes

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, which writes the merged files."""
        return self.rank == 0

    def steps(self, num_items: int, batch_size: int = 1) -> list[list[int]]:
        """This rank's batch at each step (item indices in the whole set; [] when it has none), for every
        step of the run: each rank takes part in each exchange, with or without a batch."""
        num_steps = math.ceil(math.ceil(num_items / batch_size) / self.world_size)
        starts = ((step * self.world_size + self.rank) * batch_size for step in range(num_steps))
        return [list(range(start, min(start + batch_size, num_items))) for start in starts]

    def device(self, requested: str | None) -> str | None:
        """This rank's device flag: with several ranks, ``None`` (when CUDA is there) and ``"cuda"`` become
        ``cuda:<LOCAL_RANK>``, one GPU per rank; a device with an index is kept as given."""
        if not self.sharded or requested not in (None, "cuda"):
            return requested
        if requested is None and not torch.cuda.is_available():
            return None
        return f"cuda:{self.local_rank}"

    def exchange(self, part: Any, failure: Any = None) -> tuple[list[Any], dict[int, Any]]:
        """Every rank's ``part`` of a step in rank order (the one-process order), and the ``failure`` of each
        rank that gives one (not None), by rank. ``part`` and ``failure`` must pickle."""
        gathered = [(part, failure)]
        if self.sharded:
            gathered = [None] * self.world_size
            try:
                dist.all_gather_object(gathered, (part, failure))
            except RuntimeError as err:  # torch.distributed.DistBackendError included: a rank's process is gone
                raise RankFailedError(None, f"{type(err).__name__}: {str(err)[:300]}") from None
        return [part for part, _ in gathered], {rank: failure for rank, (_, failure) in enumerate(gathered)
                                                if failure is not None}

    def barrier(self) -> None:
        """Wait for every rank: before a failed run raises, so that no rank exits (and has torchrun stop the
        others) before rank 0 has written its files. A rank already gone is logged, not raised: the error
        that stopped the run is the one to report."""
        if not self.sharded:
            return
        try:
            dist.barrier()
        except RuntimeError as err:  # torch.distributed.DistBackendError included
            log.warning("rank %d: the other ranks could not be reached: %s", self.rank, err)

    def summary(self) -> dict:
        """summary.json's entry: {} in one process, so that its summary is the one it always was."""
        return {"world_size": self.world_size} if self.sharded else {}


def shard_from_env(environ: Mapping[str, str] = os.environ) -> Shard:
    """The shard torchrun's variables describe; ``Shard()`` without them. A bad value is a LaunchError."""
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        given = ", ".join(f"{name}={environ.get(name)!r}" for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        raise LaunchError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {given}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}: need WORLD_SIZE >= 1 and "
                          f"0 <= RANK < WORLD_SIZE (start the script with torchrun)")
    return Shard(rank, world_size, local_rank)


def srun_variables(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's variables for a process that ``srun`` started as one task of a step, without torchrun; {}
    otherwise: when torchrun's own are set, or outside an srun step (``SLURM_STEP_NUM_TASKS`` unset: a plain
    ``python`` in the batch script of a many-task job stays one process). The rendezvous is the step's first
    node (Lightning's SLURM node-list parsing) on ``MASTER_PORT``, else 15000 + the job id's last four digits
    (Lightning's rule for training). Nothing is written to the environment."""
    if "WORLD_SIZE" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    try:
        world_size = int(environ["SLURM_STEP_NUM_TASKS"])
        port = environ.get("MASTER_PORT") or str(15000 + int(environ.get("SLURM_JOB_ID", "0")[-4:] or 0))
        variables = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world_size),
                     "LOCAL_RANK": environ["SLURM_LOCALID"], "MASTER_PORT": port,
                     "MASTER_ADDR": environ.get("MASTER_ADDR") or SLURMEnvironment.resolve_root_node_address(
                         environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1"))}
    except (KeyError, ValueError) as err:  # a missing or malformed SLURM_* variable
        raise LaunchError(f"srun started this process, but its SLURM variables do not describe a run: "
                          f"{type(err).__name__}: {err}") from None
    return variables if world_size > 1 else {}


@contextmanager
def sharded_run(environ: Mapping[str, str] = os.environ) -> Iterator[Shard]:
    """This process's shard; with several ranks, a process group for the exchanges, destroyed on leaving.

    The exchanges carry only a step's table rows (kB), so the group is gloo on CPUs and GPUs alike: no NCCL
    communicator holds GPU memory, and the images never travel (each rank writes its own files). Started by
    srun alone, the process takes torchrun's variables from ``srun_variables``."""
    srun = srun_variables(environ)
    shard = shard_from_env({**environ, **srun})
    if not shard.sharded:
        yield shard
        return
    rendezvous = f"tcp://{srun['MASTER_ADDR']}:{srun['MASTER_PORT']}" if srun else "env://"  # torchrun's: env://
    dist.init_process_group("gloo", init_method=rendezvous, rank=shard.rank, world_size=shard.world_size,
                            timeout=EXCHANGE_TIMEOUT)
    try:
        yield shard
    finally:
        dist.destroy_process_group()
