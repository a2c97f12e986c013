"""The training data as a LightningDataModule: cross-view pairs with the balanced scene sampler, and
validation pairs in the test_inpainting.py layout."""

from __future__ import annotations

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from leftrefill.data.cross_view import CrossViewPairDataset
from leftrefill.data.manifest import drop_missing_images, read_pairs
from leftrefill.data.masks import MaskFileList, RandomInpaintingMask
from leftrefill.data.sampler import BalancedSceneSampler
from leftrefill.data.test_pairs import TestPairDataset, check_pair_images


class LeftRefillDataModule(L.LightningDataModule):
    def __init__(self, config: DictConfig):
        super().__init__()
        self.config = config
        self.train_set: CrossViewPairDataset | None = None
        self.val_set: Subset | None = None
        self._preview: dict | None = None

    def setup(self, stage: str) -> None:
        config = self.config
        if self.train_set is None:
            pairs = read_pairs(config.train_pair, config.image_path)
            pairs = drop_missing_images(pairs, config.max_missing_fraction, source=config.train_pair)
            self.train_set = CrossViewPairDataset(
                pairs, size=config.image_size, random_mask=self._random_mask(), match_path=config.match_path,
                match_mask_rate=config.match_mask_rate, constant_place=config.constant_place)
        if self.val_set is None and config.val_image_path:
            pairs = TestPairDataset(config.val_image_path, config.image_size, config.val_mask_path)
            step = max(1, len(pairs) // config.val_limit)  # spread over the folder, as the original
            chosen = list(range(0, len(pairs), step))[: config.val_limit]
            check_pair_images([pairs.pairs[i] for i in chosen])  # every file decodes, or one error listing all
            self.val_set = Subset(pairs, chosen)

    def _random_mask(self) -> RandomInpaintingMask:
        lists = self.config.train_mask_path
        size = self.config.image_size
        irregular = MaskFileList(lists.irregular, size) if lists.irregular else None
        segmentation = MaskFileList(lists.segmentation, size) if lists.segmentation else None
        return RandomInpaintingMask(size, irregular=irregular, segmentation=segmentation)

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = BalancedSceneSampler(self.train_set.scenes, self.config.n_sample_per_scene, num_replicas=world,
                                       rank=rank, seed=self.config.seed,
                                       replacement=self.config.sample_with_replacement)
        return DataLoader(self.train_set, batch_size=self.config.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        shard = list(range(rank, len(self.val_set), world))  # unpadded: no pair is scored twice
        return DataLoader(self.val_set, batch_size=self.config.val_batch_size, sampler=shard,
                          num_workers=min(2, self.config.num_workers))

    def preview_batch(self) -> dict | None:
        """The first validation pair as a batch of one (read once), for the preview grids during training."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        if self._preview is None:
            item = self.val_set[0]
            self._preview = {k: (v[None] if hasattr(v, "shape") and v.ndim else [v]) for k, v in item.items()}
        return self._preview
