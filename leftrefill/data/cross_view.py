"""Cross-view training pairs (METHOD 1.12, the original's ``InpaintingCrossViewDataset`` in train mode).

Each item: the reference and the target each get an independent random view (direct resize or
short-side resize + random crop, p = 0.5) and the canvas [reference | target] gets one mask:
* with p = ``match_mask_rate``, a matching-based mask on the target half, from the pair's matching file
  (falling back to a random mask when the file is missing or has too few confident matches);
* otherwise a random inpainting mask (irregular / segmentation / union), put on the left or right half
  with p = 0.5 each (always right with ``constant_place``).

Items follow the batch schema of docs/data.md: ``reference``, ``target``, ``mask`` (the target half's),
plus ``reference_mask`` (the reference half's: the original trains the symmetric task) and ``id``.
``cross_view_pairs`` builds the dataset from manifest paths, as a config's ``data.target``.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.manifest import Pair, drop_missing_images, read_pairs
from leftrefill.data.masks import MaskFileList, RandomInpaintingMask, choose_side, matching_mask, place_on_half
from leftrefill.data.views import ViewTransform, random_view
from leftrefill.images import ImageInputError, load_rgb, mask_to_tensor, rgb_to_tensor

log = logging.getLogger(__name__)

MAX_BAD_ITEMS_IN_A_ROW = 10  # unreadable images replaced by the next pair before training stops


class CrossViewPairDataset(Dataset):
    """Items ``{"reference", "target": (3, S, S) in [-1, 1], "mask", "reference_mask": (1, S, S) in {0, 1},
    "id": pair id}``; exactly one of the two masks is non-empty.

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
        reference, _ = random_view(load_rgb(pair.reference, "reference"), rng, self.size)
        target, target_view = random_view(load_rgb(pair.target, "target"), rng, self.size)
        mask = self.mask(pair, target_view, rng)  # bool (S, 2S), over the canvas [reference | target]
        return {"reference": rgb_to_tensor(reference), "target": rgb_to_tensor(target),
                "mask": mask_to_tensor(mask[:, self.size:]), "reference_mask": mask_to_tensor(mask[:, :self.size]),
                "id": pair.id}

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


def cross_view_pairs(image_path: str, train_pair: str, *, size: int = 512, match_path: str | None = None,
                     match_mask_rate: float = 0.25, constant_place: bool = False, irregular_masks: str | None = None,
                     segmentation_masks: str | None = None, max_missing_fraction: float = 0.01) -> CrossViewPairDataset:
    """The training set of a config's ``data`` section: the pair manifest ``train_pair`` over the image table
    ``image_path``, less missing images (at most ``max_missing_fraction``); optional mask list files
    (one image path per line) beside the built-in irregular generator."""
    if not 0.0 <= match_mask_rate <= 1.0:
        raise ValueError(f"data.params.match_mask_rate must be in [0, 1], got {match_mask_rate}")
    pairs = drop_missing_images(read_pairs(train_pair, image_path), max_missing_fraction, source=train_pair)
    irregular = MaskFileList(irregular_masks, size) if irregular_masks else None
    segmentation = MaskFileList(segmentation_masks, size) if segmentation_masks else None
    return CrossViewPairDataset(pairs, size=size, random_mask=RandomInpaintingMask(size, irregular=irregular,
                                segmentation=segmentation), match_path=match_path, match_mask_rate=match_mask_rate,
                                constant_place=constant_place)
