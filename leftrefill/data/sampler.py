"""Scene-balanced sampling of training pairs (METHOD 1.13, the original ``BalancedRandomSampler``).

Each epoch draws ``n_sample_per_scene`` items from every scene, so that scenes with many mined pairs do
not dominate training, shuffles them together and splits them over the data-parallel ranks.

Differences from the original, which are fixes:

* the epoch's randomness comes from ``np.random.default_rng([seed, epoch])``, not the global RNG, so
  every rank computes the same epoch list and ranks get disjoint slices of it;
* ``set_epoch`` changes the draw for any world size (the original only set the epoch when
  ``world_size == 1``, so multi-GPU runs repeated one epoch's draw);
* a scene with fewer items than ``n_sample_per_scene`` is an error naming it, unless ``replacement`` is
  set, rather than a numpy error deep inside an epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class BalancedSceneSampler(Sampler[int]):
    """Yields dataset indices: per epoch ``n_sample_per_scene`` items of every scene, shuffled, padded to a
    multiple of ``num_replicas`` by repeating from the start, and this rank's slice ``[rank::num_replicas]``.

    ``scenes[i]`` is the scene of dataset item ``i``. ``num_replicas`` / ``rank`` default to the
    torch.distributed world size / rank when a process group is initialised, else 1 / 0. With
    ``replacement`` a scene with too few items is sampled with replacement (the others still without).
    """

    def __init__(self, scenes: Sequence[str], n_sample_per_scene: int, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0, replacement: bool = False) -> None:
        if n_sample_per_scene < 1:
            raise ValueError(f"n_sample_per_scene must be at least 1, got {n_sample_per_scene}")
        if seed < 0:  # numpy seed sequences take non-negative integers only
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_replicas, self.rank = _replicas_and_rank(num_replicas, rank)
        self.n_sample_per_scene = n_sample_per_scene
        self.seed = seed
        self.replacement = replacement
        self.epoch = 0
        self.scene_items = _group_by_scene(scenes)
        self._check_scene_sizes()

    def _check_scene_sizes(self) -> None:
        short = {scene: len(items) for scene, items in self.scene_items.items()
                 if len(items) < self.n_sample_per_scene}
        if short and not self.replacement:
            listed = ", ".join(f"{scene!r} ({count})" for scene, count in short.items())
            raise ValueError(
                f"{len(short)} scene(s) have fewer than n_sample_per_scene={self.n_sample_per_scene} items: "
                f"{listed}; sample them with replacement (sample_with_replacement: true in the training "
                f"config) or use a smaller n_sample_per_scene")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw ``__iter__`` yields; call it before each epoch on every rank."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def global_indices(self) -> np.ndarray:
        """(n_scenes * n_sample_per_scene,) int64: the current epoch's shuffled list over all ranks,
        before padding; identical on every rank for the same seed and epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = self.n_sample_per_scene
        drawn = [rng.choice(items, size=n, replace=self.replacement and len(items) < n)
                 for items in self.scene_items.values()]  # sorted scene order, fixed for every rank
        return rng.permutation(np.concatenate(drawn))

    def __iter__(self) -> Iterator[int]:
        indices = self.global_indices()
        total = len(self) * self.num_replicas
        if total > len(indices):  # pad like DistributedSampler so every rank gets len(self) items
            indices = np.resize(indices, total)  # np.resize repeats from the start
        return iter(indices[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return math.ceil(len(self.scene_items) * self.n_sample_per_scene / self.num_replicas)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "seed"}``: what resuming needs to continue with the same draws."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s epoch and seed (a changed seed is logged: the draws then differ
        from the run being resumed)."""
        if int(state["seed"]) != self.seed:
            log.warning("sampler seed %d from the checkpoint replaces the configured seed %d",
                        int(state["seed"]), self.seed)
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))


def _replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas - 1}] for num_replicas={num_replicas}")
    return num_replicas, rank


def _group_by_scene(scenes: Sequence[str]) -> dict[str, np.ndarray]:
    """{scene: (n,) int64 item indices in ascending order}, scenes in sorted order."""
    if len(scenes) == 0:
        raise ValueError("BalancedSceneSampler: the dataset is empty (no scenes)")
    groups: dict[str, list[int]] = {}
    for index, scene in enumerate(scenes):
        groups.setdefault(scene, []).append(index)
    return {scene: np.asarray(groups[scene], dtype=np.int64) for scene in sorted(groups)}
