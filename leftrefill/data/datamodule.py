"""The training data as a LightningDataModule: the config's training set (``data.target``, built through
``ldm.util.instantiate_from_config``) with the balanced scene sampler (or a plain distributed shuffle for a
dataset without ``scenes``), and validation pairs in the test_inpainting.py layout or from a dataset
(``validation.target``). Training and validation items share one batch schema (docs/data.md)."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ldm.util import ConfigError, instantiate_from_config
from leftrefill.data.sampler import BalancedSceneSampler
from leftrefill.data.test_pairs import TestPairDataset, check_pair_images


class LeftRefillDataModule(L.LightningDataModule):
    """``config`` is an ExperimentConfig (leftrefill.train_config)."""

    def __init__(self, config: DictConfig, required_keys: tuple[str, ...] = ()):
        super().__init__()
        self.config = config
        self.required_keys = tuple(required_keys)  # batch keys the model's conditioner reads (the NVS pose)
        self.train_set: Dataset | None = None
        self.val_set: Subset | None = None
        self._preview: dict | None = None

    def setup(self, stage: str) -> None:
        data, val = self.config.data, self.config.validation
        if self.train_set is None:
            node = {"target": data.target, "params": {**data.params, "size": data.image_size}}
            self.train_set = instantiate_from_config(node, where="data")
        _check_keys(self.train_set, self.required_keys, f"data.target ({data.target})")
        if self.val_set is None and val.target:
            node = {"target": val.target, "params": {**val.params, "size": data.image_size}}
            self.val_set = _spread(instantiate_from_config(node, where="validation"), val.limit)
        elif self.val_set is None and val.image_path:
            pairs = TestPairDataset(val.image_path, data.image_size, val.mask_path)
            self.val_set = _spread(pairs, val.limit)
            check_pair_images([pairs.pairs[i] for i in self.val_set.indices])  # every file decodes, or one error
        if self.val_set is not None:
            where = f"validation.target ({val.target})" if val.target else f"validation.image_path ({val.image_path})"
            if len(self.val_set) == 0:
                raise ConfigError(f"{where}: no validation pairs")
            _check_keys(self.val_set, self.required_keys, where)

    def train_dataloader(self) -> DataLoader:
        data = self.config.data
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if hasattr(self.train_set, "scenes"):
            sampler = BalancedSceneSampler(self.train_set.scenes, data.n_sample_per_scene, num_replicas=world,
                                           rank=rank, seed=self.config.trainer.seed,
                                           replacement=data.sample_with_replacement)
        else:  # a dataset without scene groups (NVS objects): a plain shuffle, split across ranks
            sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                         seed=self.config.trainer.seed, drop_last=True)
        if len(sampler) < data.batch_size:  # Lightning would only warn and "finish" a run that never trained
            raise ConfigError(f"data: each of {world} rank(s) gets {len(sampler)} training item(s) per epoch, fewer "
                              f"than data.batch_size {data.batch_size}: not one batch. Use a smaller batch size or "
                              f"more data ({len(self.train_set)} items)")
        return DataLoader(self.train_set, batch_size=data.batch_size, sampler=sampler, drop_last=True,
                          num_workers=data.num_workers, persistent_workers=data.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        shard = list(range(rank, len(self.val_set), world))  # unpadded: no pair is scored twice
        if not shard:  # fewer pairs than ranks: Lightning refuses an empty loader, so one pair, left unscored
            return DataLoader(_Unscored(self.val_set[0]), batch_size=1)
        return DataLoader(self.val_set, batch_size=self.config.validation.batch_size, sampler=shard,
                          num_workers=min(2, self.config.data.num_workers))

    def preview_batch(self) -> dict | None:
        """The first validation pair as a batch of one (read once), for the preview grids during training; a
        run without validation previews the training set's ``preview_item()`` when it has one (RealFill: the
        target with its real mask)."""
        if self._preview is None:
            if self.val_set is not None and len(self.val_set) > 0:
                item = self.val_set[0]
            elif hasattr(self.train_set, "preview_item"):
                item = self.train_set.preview_item()
            else:
                return None
            self._preview = {k: (v[None] if hasattr(v, "shape") and v.ndim else [v]) for k, v in item.items()}
        return self._preview


def _spread(dataset: Dataset, limit: int) -> Subset:
    """At most ``limit`` items spread evenly over ``dataset`` (the original validates every k-th pair)."""
    step = max(1, len(dataset) // limit)
    return Subset(dataset, list(range(0, len(dataset), step))[:limit])


class _Unscored(Dataset):
    """One validation item with an empty mask: validation skips it (an empty mask is not scored), so a rank
    without pairs of its own still runs the validation loop in step with the others."""

    def __init__(self, item: dict):
        self.item = {**item, "mask": torch.zeros_like(item["mask"])}

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        return self.item


def _check_keys(dataset: Dataset, keys: tuple[str, ...], where: str) -> None:
    """The first item holds every key the conditioner reads, or a ConfigError naming the dataset (before any
    step: an NVS model validated on pose-less pairs would otherwise fail at its first validation)."""
    if not keys or len(dataset) == 0:
        return
    missing = [key for key in keys if key not in dataset[0]]
    if missing:
        raise ConfigError(f"{where}: its items have no {', '.join(map(repr, missing))}, which the model's "
                          f"conditioner needs (docs/data.md, batch schema)")
