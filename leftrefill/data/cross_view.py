"""Cross-view training pairs (METHOD 1.12, the original's ``InpaintingCrossViewDataset`` in train mode).

Each item: source and target each get an independent random view (direct resize or short-side resize +
random crop, p = 0.5), are stitched as the canvas [source | target], and get one mask:
* with p = ``match_mask_rate``, a matching-based mask on the target half, from the pair's matching file
  (falling back to a random mask when the file is missing or has too few confident matches);
* otherwise a random inpainting mask (irregular / segmentation / union), put on the left or right half
  with p = 0.5 each (always right with ``constant_place``).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.manifest import Pair
from leftrefill.data.masks import RandomInpaintingMask, choose_side, matching_mask, place_on_half
from leftrefill.data.views import ViewTransform, random_view
from leftrefill.images import ImageInputError, load_rgb, mask_to_tensor, rgb_to_tensor

log = logging.getLogger(__name__)

MAX_BAD_ITEMS_IN_A_ROW = 10  # unreadable images replaced by the next pair before training stops


class CrossViewPairDataset(Dataset):
    """Items ``{"canvas": (3, S, 2S) in [-1, 1], "mask": (1, S, 2S) in {0, 1}, "pair_id": int}``.

    Randomness comes from a numpy generator seeded per item from torch's RNG, which Lightning seeds per
    run and DataLoader per worker and epoch: reproducible with a seed, different every epoch.
    """

    def __init__(self, pairs: list[Pair], *, size: int = 512, random_mask: RandomInpaintingMask | None = None,
                 match_path: str | Path | None = None, match_mask_rate: float = 0.25, constant_place: bool = False):
        if not pairs:
            raise ValueError("the training manifest holds no usable pairs")
        self.pairs = pairs
        self.size = size
        self.random_mask = random_mask if random_mask is not None else RandomInpaintingMask(size)
        self.match_path = Path(match_path) if match_path is not None else None
        self.match_mask_rate = match_mask_rate if match_path is not None else 0.0
        self.constant_place = constant_place

    @property
    def scenes(self) -> list[str]:
        return [pair.scene for pair in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(MAX_BAD_ITEMS_IN_A_ROW):
            pair = self.pairs[(index + attempt) % len(self.pairs)]
            try:
                return self.item(pair, np.random.default_rng(int(torch.randint(0, 2**62, ()).item())))
            except ImageInputError as err:
                log.warning("skipping pair %d: %s", pair.id, err)
        raise RuntimeError(f"{MAX_BAD_ITEMS_IN_A_ROW} pairs in a row from index {index} could not be read; "
                           f"see the warnings above")

    def item(self, pair: Pair, rng: np.random.Generator) -> dict:
        source, _ = random_view(load_rgb(pair.source, "source"), rng, self.size)
        target, target_view = random_view(load_rgb(pair.target, "target"), rng, self.size)
        mask = self.mask(pair, target_view, rng)  # bool (S, 2S)
        canvas = np.concatenate([source, target], axis=1)  # (S, 2S, 3) uint8, [source | target]
        return {"canvas": rgb_to_tensor(canvas), "mask": mask_to_tensor(mask), "pair_id": pair.id}

    def mask(self, pair: Pair, target_view: ViewTransform, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.match_mask_rate:
            matched = self.matching_mask(pair, target_view, rng)
            if matched is not None:
                return place_on_half(matched, "right")
        return place_on_half(self.random_mask(rng), choose_side(rng, self.constant_place))

    def matching_mask(self, pair: Pair, target_view: ViewTransform, rng: np.random.Generator) -> np.ndarray | None:
        path = self.match_path / f"{pair.id:08d}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as matches:
                points, confidence = matches["target_points"], matches["confidence"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            log.warning("%s: unusable matching file (%s); a random mask is used", path, err)
            return None
        return matching_mask(points, confidence, target_view, rng)
