"""Multi-view reference-guided inpainting data (METHOD 3.2): one target, ``v - 1`` references, ``v`` views.

Training (the original's ``InpaintingMultiViewDataset`` in train mode, whose training path crashes,
METHOD 3.2 / 7.4): an extended multi-view manifest (scripts/extend_multiview.py) gives each target its
references in manifest order; the first ``v - 1`` are used, unshuffled (``source_shuffle: False``: the
first is the pair's own, highest-overlap reference). Every image gets its own random view (METHOD 1.12);
only the target is masked, with the matching-based mask from the target's own keypoints and view (the
release used the source's, METHOD 7.4) with p = ``match_mask_rate``, else a random inpainting mask. The
views are not stitched, so there is no left / right choice.

Testing (the original's ``test_multiview_inpainting.py``)::

    <test_path>/<id>/source.jpg, source_1.jpg, source_2.jpg, source_3.jpg   (or .png) the references, in order
    <test_path>/<id>/target.jpg   (or .png)                                   the ground-truth target
    <test_path>/<id>/mask.png                                                 255 = hole

The first ``view_num - 1`` sources are used; the folder search, mask folder and file checks are those of
:mod:`leftrefill.data.test_pairs`, whose one-reference layout is the case ``view_num = 2``.

Items follow the batch schema of docs/data.md with ``references`` (V - 1, 3, S, S) instead of ``reference``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.cross_view import CrossViewPairDataset
from leftrefill.data.manifest import MultiViewPair, drop_missing_images, read_multiview_pairs
from leftrefill.data.masks import MaskFileList, RandomInpaintingMask
from leftrefill.data.test_pairs import (IMAGE_SUFFIXES, TestPair, check_pair_images, find_image, find_test_pairs,
                                        problem_listing)
from leftrefill.data.views import ViewTransform, random_view
from leftrefill.images import load_mask, load_rgb, mask_to_tensor, resize_mask, resize_rgb, rgb_to_tensor

log = logging.getLogger(__name__)


def _check_num_views(num_views: int, name: str) -> None:
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 2:
        raise ValueError(f"{name} must be an integer >= 2 (the target and at least one reference), got {num_views!r}")


def reference_stem(k: int) -> str:
    """The file stem of reference ``k`` in a test folder: source, source_1, source_2, ..."""
    return "source" if k == 0 else f"source_{k}"


# ------------------------------------------------------------------------------------------------ training


def select_references(pairs: Sequence[MultiViewPair], num_views: int,
                      source: str | None = None) -> list[MultiViewPair]:
    """The pairs with at least ``num_views - 1`` references, each cut to its first ``num_views - 1`` in
    manifest order; the others are left out with one warning counting them. ValueError naming ``source``
    (the manifest) and ``num_views`` when none is left."""
    _check_num_views(num_views, "num_views")
    needed, where = num_views - 1, source or "the multi-view pair list"
    kept = [dataclasses.replace(p, references=p.references[:needed]) for p in pairs if len(p.references) >= needed]
    if pairs and not kept:
        most = max(len(p.references) for p in pairs)
        raise ValueError(f"{where}: no pair has the {needed} references num_views={num_views} needs (at most "
                         f"{most}); use a smaller num_views or extend the pairs further (scripts/extend_multiview.py)")
    if len(kept) < len(pairs):
        log.warning("%s: leaving out %d of %d pairs with fewer than the %d references num_views=%d needs",
                    where, len(pairs) - len(kept), len(pairs), needed, num_views)
    return kept


class MultiViewRefDataset(CrossViewPairDataset):
    """Items ``{"target": (3, S, S) in [-1, 1], "mask": (1, S, S) in {0, 1} (1 = fill, target only),
    "references": (V - 1, 3, S, S) in [-1, 1] in manifest order, "id": pair id}``.

    A cross-view dataset with several references and the mask always on the target: it shares
    CrossViewPairDataset's ``scenes`` (balanced sampler), unreadable-image skipping (the next pair, at most
    MAX_BAD_ITEMS_IN_A_ROW in a row), per-item generator seeded from torch's RNG, and matching-file reading
    (``<match_path>/<id:08d>.npz``: the target's keypoints of the pair's own match, followed through the
    target's view). ``pairs`` with fewer than ``num_views - 1`` references are left out (select_references);
    ``source`` names the manifest in messages.
    """

    def __init__(self, pairs: Sequence[MultiViewPair], *, num_views: int = 2, size: int = 512,
                 random_mask: RandomInpaintingMask | None = None, match_path: str | Path | None = None,
                 match_mask_rate: float = 0.25, source: str | None = None):
        self.num_views = num_views
        super().__init__(select_references(pairs, num_views, source), size=size, random_mask=random_mask,
                         match_path=match_path, match_mask_rate=match_mask_rate, constant_place=True)

    def item(self, pair: MultiViewPair, rng: np.random.Generator) -> dict:
        references = [random_view(load_rgb(path, f"reference {k}"), rng, self.size)[0]
                      for k, path in enumerate(pair.references)]
        target, target_view = random_view(load_rgb(pair.target, "target"), rng, self.size)
        return {"target": rgb_to_tensor(target), "mask": mask_to_tensor(self.mask(pair, target_view, rng)),
                "references": torch.stack([rgb_to_tensor(r) for r in references]), "id": pair.id}

    def mask(self, pair: MultiViewPair, target_view: ViewTransform, rng: np.random.Generator) -> np.ndarray:
        """Bool (S, S), True = hole, on the target view: matching-based with p = match_mask_rate (a random
        mask when the file is missing or has too few confident matches), else a random inpainting mask."""
        if rng.random() < self.match_mask_rate:
            matched = self.matching_mask(pair, target_view, rng)
            if matched is not None:
                return matched
        return self.random_mask(rng)


def multiview_ref_pairs(train_pair: str, *, size: int = 512, num_views: int = 2, match_path: str | None = None,
                        match_mask_rate: float = 0.25, irregular_masks: str | None = None,
                        segmentation_masks: str | None = None,
                        max_missing_fraction: float = 0.01) -> MultiViewRefDataset:
    """The training set of a config's ``data`` section: the extended multi-view manifest ``train_pair``
    (which names its own image table), pairs with fewer than ``num_views - 1`` references left out, then
    those with a missing used image (at most ``max_missing_fraction``); mask options as cross_view_pairs."""
    if not 0.0 <= match_mask_rate <= 1.0:
        raise ValueError(f"data.params.match_mask_rate must be in [0, 1], got {match_mask_rate}")
    pairs = select_references(read_multiview_pairs(train_pair), num_views, source=train_pair)
    pairs = drop_missing_images(pairs, max_missing_fraction, source=train_pair,
                                images_of=lambda pair: (*pair.references, pair.target))
    irregular = MaskFileList(irregular_masks, size) if irregular_masks else None
    segmentation = MaskFileList(segmentation_masks, size) if segmentation_masks else None
    return MultiViewRefDataset(pairs, num_views=num_views, size=size, random_mask=RandomInpaintingMask(
                               size, irregular=irregular, segmentation=segmentation), match_path=match_path,
                               match_mask_rate=match_mask_rate, source=train_pair)


# ---------------------------------------------------------------------------------------------------- test


@dataclass(frozen=True)
class MultiViewTestItem:
    id: str
    references: tuple[Path, ...]  # <id>/source.jpg, <id>/source_1.jpg, ... (view_num - 1 of them)
    target: Path
    mask: Path
    folder: Path


def find_multiview_test_items(test_path: str | Path, view_num: int, mask_path: str | Path | None = None,
                              limit: int | None = None) -> list[MultiViewTestItem]:
    """The items under ``test_path`` in sorted folder order (the first ``limit``), with the first
    ``view_num - 1`` references of each; ``mask_path`` as in find_test_pairs. One FileNotFoundError
    listing every folder with fewer references than ``view_num`` asks for; ValueError for view_num < 2."""
    _check_num_views(view_num, "--view_num")
    items, problems = [], []
    for pair in find_test_pairs(test_path, mask_path, limit):  # source.jpg, target.jpg and the mask exist
        folder = pair.reference.parent
        extra = [find_image(folder, reference_stem(k), IMAGE_SUFFIXES) for k in range(1, view_num - 1)]
        found = next((k for k, path in enumerate(extra, start=1) if path is None), view_num - 1)
        if found < view_num - 1:
            stem = reference_stem(found)
            problems.append(f"{folder}: {found} source image(s) in order, no {stem}.jpg or {stem}.png")
        else:
            items.append(MultiViewTestItem(pair.id, (pair.reference, *extra), pair.target, pair.mask, folder))
    if problems:
        raise FileNotFoundError(f"--test_path {test_path}: {len(problems)} folder(s) hold fewer than the "
                                f"{view_num - 1} source images --view_num {view_num} asks for (source, source_1, "
                                f"..., source_{view_num - 2}):{problem_listing(problems)}")
    return items


def check_multiview_test_images(items: Sequence[MultiViewTestItem]) -> None:
    """Check that every image of ``items`` decodes; one ImageInputError listing each bad file
    (test_pairs.check_pair_images, each file checked once)."""
    check_pair_images([TestPair(item.id, reference, item.target, item.mask)
                       for item in items for reference in item.references])


class MultiViewTestDataset(Dataset):
    """Items: ``{"id", "index", "references": (V - 1, 3, S, S), "target": (3, S, S) in [-1, 1],
    "mask": (1, S, S) in {0, 1}, "mask_resized"}``, S = ``test_size``, V = ``view_num``; every image is
    resized to S x S with INTER_AREA and the mask with nearest (METHOD 1.14). Images of different sizes in
    one folder change aspect differently: a warning says so the first time (once per dataset copy, so once
    per DataLoader worker)."""

    def __init__(self, test_path: str | Path, test_size: int = 512, view_num: int = 2,
                 mask_path: str | Path | None = None, limit: int | None = None):
        self.items = find_multiview_test_items(test_path, view_num, mask_path, limit)
        self.test_size = test_size
        self.view_num = view_num
        self._warned_sizes = False

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item, size = self.items[index], (self.test_size, self.test_size)
        target = load_rgb(item.target, "target")
        references = [load_rgb(path, f"reference {k}") for k, path in enumerate(item.references)]
        self._warn_sizes(item, target, references)
        mask = load_mask(item.mask, "mask")
        return {
            "id": item.id,
            "index": index,
            "references": torch.stack([rgb_to_tensor(resize_rgb(r, size)) for r in references]),
            "target": rgb_to_tensor(resize_rgb(target, size)),
            "mask": mask_to_tensor(resize_mask(mask, size, rule="nearest")),
            "mask_resized": torch.tensor(mask.shape != target.shape[:2]),
        }

    def full_size(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index``'s target RGB uint8 (H, W, 3) and hole bool (H, W) at the target's own size (a mask
        of another size resized to it with nearest), as TestPairDataset.full_size."""
        item = self.items[index]
        target, hole = load_rgb(item.target, "target"), load_mask(item.mask, "mask")
        return target, resize_mask(hole, target.shape[:2], rule="nearest")

    def _warn_sizes(self, item: MultiViewTestItem, target: np.ndarray, references: list[np.ndarray]) -> None:
        sizes = [f"{image.shape[1]}x{image.shape[0]}" for image in (target, *references)]
        if self._warned_sizes or len(set(sizes)) == 1:
            return
        self._warned_sizes = True
        log.warning("%s: the target (%s) and references (%s) differ in size; each is resized to %dx%d, so their "
                    "aspect ratios change differently (said once for this test set)", item.folder, sizes[0],
                    ", ".join(sizes[1:]), self.test_size, self.test_size)


def multiview_test_items(image_path: str, *, size: int = 512, num_views: int = 2,
                         mask_path: str | None = None) -> MultiViewTestDataset:
    """The validation set of a config's ``validation.target``: the multi-view test layout under
    ``image_path``, every file checked up front (cheaply) so that a bad one stops the run before training."""
    dataset = MultiViewTestDataset(image_path, size, num_views, mask_path)
    check_multiview_test_images(dataset.items)
    return dataset
