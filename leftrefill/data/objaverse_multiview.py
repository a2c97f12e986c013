"""Multi-view novel-view-synthesis data: one reference and v target views per object, for the block-causal
autoregressive NVS of METHOD 3.3, read from the Objaverse renders of leftrefill.data.objaverse_nvs
(METHOD 2.1: ``<views_root>/<uid>/000.png ... 011.png`` and ``000.npy ... 011.npy``).

The paper shows this task only in figures (each view a stitched ``[reference_i | masked target_i]`` with its
own pose, the v views denoised jointly under a block lower-triangular attention mask) and the release has
no code for it, so the layout below is ours:

* An item is one object's reference view R and v target views T_0 ... T_{v-1}, v + 1 distinct renders. The
  model sees v canvases ``[R | T_i]`` with the same reference on every one: a later view's further
  references are the earlier targets, which it reaches through the block-causal attention, not through
  the data.
* Canvas i has its own pose ``pose_i = relative_pose(T_i camera, R camera)``, the Zero123 pose of the
  target seen from the reference with the argument order of the one-reference pairs (METHOD 2.2), and its
  own mask on the target half.
* Training draws R and then the v targets at random without replacement among the object's renders; the
  targets keep the draw order, which is their autoregressive order, so every order is trained. Each
  target's mask is the adaptive mask of its own silhouette (METHOD 2.5), exactly as NVSTrainingPairs
  draws it for its single target, the v masks one after another from the item's generator.
* Testing uses fixed views: ``reference_view`` (2, as the one-reference test) and ``target_views``, by
  default the first v render indices other than the reference in increasing order ([0, 1, 3] for v = 3),
  so that the first target is the one-reference test's target, view 0. The Zero-1-to-3 renders are 12
  random viewpoints, not a turntable, so no index order follows the camera round the object.
* Test masks per target, by ``mask_mode`` as NVSTestPairs: "reference" (default: the reference's
  silhouette on every target, the targets unseen and white), "complete" (the whole target) or "fixed"
  (``<mask_path>/<uid>/<view:03d>.png`` for each target view): the region each view is generated in. The
  paper's adaptive inference masks for the generated views (dilated blobs) depend on what was generated,
  so they belong to the sampler: once a view is known to the later ones (given or generated), it carries
  the adaptive mask of its own silhouette, drawn from its own seed (leftrefill.nvs_autoregressive,
  ``known_masks="adaptive"``), and these test masks only with ``known_masks="given"``.

Items, each key of the one-reference schema (docs/data.md) with a leading view dimension v where it is per
target, images float32 in [-1, 1], masks float32 in {0, 1} with 1 = fill::

    "id": str (the uid)                 "reference": (3, S, S)          "reference_view": int
    "target": (v, 3, S, S)              "mask": (v, 1, S, S)            "pose": float32 (v, 4)
    "target_views": int64 (v,)
    test only: "index": int, "target_visible": (v, 3, S, S), "reference_silhouette": (1, S, S),
               "mask_resized": bool (v,)

``num_views`` is the number of target views v here; the number of renders per object is ``num_renders``
(what the one-reference data calls ``num_views``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.nvs_masks import adaptive_mask, read_fixed_mask
from leftrefill.data.objaverse_nvs import (MASK_MODES, NUM_VIEWS, NVSDataError, _check_complete, _object_uids,
                                           load_view, read_camera, readable_training_item, reference_mask)
from leftrefill.data.test_pairs import problem_listing
from leftrefill.images import mask_to_tensor
from leftrefill.nvs_pose import relative_pose

log = logging.getLogger(__name__)

DEFAULT_NUM_VIEWS = 3  # target views per item


# ------------------------------------------------------------------------------------ arguments


def check_view_counts(size: int, num_views: int, num_renders: int) -> None:
    """ValueError naming the first bad one of the image size, the number of target views and of renders."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if num_views < 1:
        raise ValueError(f"num_views (target views per item) must be >= 1, got {num_views}")
    if num_views + 1 > num_renders:
        raise ValueError(f"num_views {num_views} target views and one reference need {num_views + 1} distinct "
                         f"renders, but num_renders is {num_renders}")


def default_target_views(reference_view: int, num_views: int) -> list[int]:
    """The first ``num_views`` render indices other than ``reference_view``, increasing: [0, 1, 3] for
    reference 2 and v = 3."""
    return [view for view in range(num_views + 1) if view != reference_view][:num_views]


def check_test_views(num_views: int, num_renders: int, reference_view: int,
                     target_views: Sequence[int] | None) -> list[int]:
    """The test's target views (``target_views``, or :func:`default_target_views`), checked: v of them,
    distinct, none the reference, all in [0, num_renders). A bad one raises ValueError naming it."""
    if not 0 <= reference_view < num_renders:
        raise ValueError(f"reference_view {reference_view} is outside [0, {num_renders}): the renders are "
                         f"000.png ... {num_renders - 1:03d}.png")
    if target_views is None:
        return default_target_views(reference_view, num_views)
    views = list(target_views)
    if any(not isinstance(view, (int, np.integer)) or isinstance(view, bool) for view in views):
        raise ValueError(f"target_views {views}: expected render indices (integers)")
    views = [int(view) for view in views]
    if len(views) != num_views:
        raise ValueError(f"target_views {views} has {len(views)} views, but num_views is {num_views}")
    if outside := [view for view in views if not 0 <= view < num_renders]:
        raise ValueError(f"target_views {views}: {outside} outside [0, {num_renders}): the renders are "
                         f"000.png ... {num_renders - 1:03d}.png")
    if reference_view in views:
        raise ValueError(f"target_views {views} contains the reference_view {reference_view}")
    if repeated := sorted({view for view in views if views.count(view) > 1}):
        raise ValueError(f"target_views {views} repeats {repeated}: the target views must be distinct")
    return views


def check_mask_mode(mask_mode: str, mask_path: str | Path | None) -> None:
    """ValueError for a mask mode other than those of NVSTestPairs, or "fixed" without its folder."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode {mask_mode!r} is unknown; use one of {', '.join(MASK_MODES)}")
    if mask_mode == "fixed" and mask_path is None:
        raise ValueError("mask_mode fixed needs mask_path (the folder of <uid>/<view:03d>.png masks)")


def view_poses(folder: Path, reference_view: int, target_views: Sequence[int]) -> torch.Tensor:
    """float32 (v, 4): per target, ``relative_pose(target camera, reference camera)`` (METHOD 2.2)."""
    targets = np.stack([read_camera(folder / f"{view:03d}.npy") for view in target_views])  # (v, 3, 4)
    return relative_pose(targets, read_camera(folder / f"{reference_view:03d}.npy"))


# -------------------------------------------------------------------------------------- training


class NVSMultiviewTrainingItems(Dataset):
    """Training items of the module docstring, one per object: a random reference and ``num_views`` random
    targets among the object's ``num_renders`` renders, each target with its adaptive mask.

    The draws come from a numpy generator seeded per item from torch's RNG, and an object whose files
    cannot be read is skipped with a warning, as NVSTrainingPairs (leftrefill.data.objaverse_nvs).
    """

    def __init__(self, views_root: str | Path, uids: list[str], *, size: int = 256,
                 num_views: int = DEFAULT_NUM_VIEWS, num_renders: int = NUM_VIEWS):
        check_view_counts(size, num_views, num_renders)
        self.views_root = Path(views_root)
        self.uids = uids
        self.size, self.num_views, self.num_renders = size, num_views, num_renders
        _check_complete(self.views_root, uids, list(range(num_renders)))

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict:
        return readable_training_item(self.uids, index, self.item)

    def item(self, uid: str, rng: np.random.Generator) -> dict:
        """The item of object ``uid``; every random draw comes from ``rng``: the v + 1 views (reference
        first), then the targets' masks in target order."""
        reference_view, *target_views = (int(v) for v in rng.choice(self.num_renders, self.num_views + 1,
                                                                     replace=False))
        folder = self.views_root / uid
        reference, _ = load_view(folder / f"{reference_view:03d}.png", self.size, "reference")
        targets, masks = [], []
        for view in target_views:
            target, silhouette = load_view(folder / f"{view:03d}.png", self.size, "target")
            targets.append(target)
            masks.append(mask_to_tensor(adaptive_mask(silhouette[0].numpy() > 0, rng)))
        return {"id": uid, "reference": reference, "target": torch.stack(targets), "mask": torch.stack(masks),
                "pose": view_poses(folder, reference_view, target_views), "reference_view": reference_view,
                "target_views": torch.tensor(target_views, dtype=torch.long)}


def nvs_multiview_training_items(views_root: str, object_list: str | None = None, *, size: int = 256,
                                 num_views: int = DEFAULT_NUM_VIEWS,
                                 num_renders: int = NUM_VIEWS) -> NVSMultiviewTrainingItems:
    """The multi-view NVS training set of a config's ``data`` section: the objects of ``object_list`` (or
    every folder of ``views_root``), each checked to hold all ``num_renders`` renders and cameras; items of
    one reference and ``num_views`` targets."""
    check_view_counts(size, num_views, num_renders)
    root = Path(views_root)
    uids = _object_uids(root, object_list)
    log.info("multi-view NVS training: %d objects under %s, %d target views per item", len(uids), root, num_views)
    return NVSMultiviewTrainingItems(root, uids, size=size, num_views=num_views, num_renders=num_renders)


# ------------------------------------------------------------------------------------------ test


class NVSMultiviewTestItems(Dataset):
    """Test items of the module docstring, one per object: the fixed ``reference_view`` and
    ``target_views`` (default :func:`default_target_views`), masks by ``mask_mode``.

    ``target_visible`` is what the model may see of each target, as NVSTestPairs: the ground truth for
    "fixed" and "complete", white for "reference" (the targets are unknown). ``mask_resized`` says, per
    target, that its fixed mask file had another size.
    """

    def __init__(self, views_root: str | Path, uids: list[str], *, size: int = 256,
                 num_views: int = DEFAULT_NUM_VIEWS, num_renders: int = NUM_VIEWS, reference_view: int = 2,
                 target_views: Sequence[int] | None = None, mask_mode: str = "reference",
                 mask_path: str | Path | None = None):
        check_view_counts(size, num_views, num_renders)
        self.target_views = check_test_views(num_views, num_renders, reference_view, target_views)
        check_mask_mode(mask_mode, mask_path)
        self.views_root = Path(views_root)
        self.uids = uids
        self.size, self.reference_view, self.mask_mode = size, reference_view, mask_mode
        self.mask_path = Path(mask_path) if mask_path is not None else None
        _check_complete(self.views_root, uids, sorted({reference_view, *self.target_views}))
        if mask_mode == "fixed":
            self._check_mask_files()

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict:
        uid = self.uids[index]
        folder = self.views_root / uid
        reference, reference_silhouette = load_view(folder / f"{self.reference_view:03d}.png", self.size,
                                                    "reference")
        target = torch.stack([load_view(folder / f"{view:03d}.png", self.size, "target")[0]
                              for view in self.target_views])  # (v, 3, S, S)
        mask, resized, visible = self._masks(uid, reference_silhouette, target)
        return {"id": uid, "index": index, "reference": reference, "target": target, "target_visible": visible,
                "mask": mask, "reference_silhouette": reference_silhouette,
                "pose": view_poses(folder, self.reference_view, self.target_views),
                "reference_view": self.reference_view,
                "target_views": torch.tensor(self.target_views, dtype=torch.long), "mask_resized": resized}

    def _masks(self, uid: str, reference_silhouette: torch.Tensor,
               target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask (v, 1, S, S), mask_resized bool (v,), target_visible (v, 3, S, S))."""
        views = len(self.target_views)
        not_resized = torch.zeros(views, dtype=torch.bool)
        if self.mask_mode == "reference":
            # As NVSTestPairs: the silhouette as is, the whole view when it is empty.
            mask = reference_mask(reference_silhouette, uid)
            return mask.expand(views, -1, -1, -1).clone(), not_resized, torch.ones_like(target)
        if self.mask_mode == "complete":
            return torch.ones(views, 1, self.size, self.size), not_resized, target
        read = [read_fixed_mask(self.mask_file(uid, view), self.size) for view in self.target_views]
        mask = torch.stack([mask_to_tensor(mask) for mask, _ in read])
        return mask, torch.tensor([resized for _, resized in read]), target

    def mask_file(self, uid: str, view: int) -> Path:
        """The fixed test mask of object ``uid``'s view ``view`` (mask_mode "fixed")."""
        return self.mask_path / uid / f"{view:03d}.png"

    def _check_mask_files(self) -> None:
        if not self.mask_path.is_dir():
            raise NVSDataError(f"mask_path {self.mask_path}: not a folder")
        wanted = [self.mask_file(uid, view) for uid in self.uids for view in self.target_views]
        missing = [str(path) for path in wanted if not path.is_file()]
        if missing:
            raise NVSDataError(f"mask_path {self.mask_path}: {len(missing)} of {len(wanted)} test mask files are "
                               f"missing (expected <mask_path>/<uid>/<view:03d>.png for the target views "
                               f"{self.target_views}):{problem_listing(missing)}")


def nvs_multiview_test_items(views_root: str, object_list: str | None = None, *, size: int = 256,
                             num_views: int = DEFAULT_NUM_VIEWS, num_renders: int = NUM_VIEWS,
                             reference_view: int = 2, target_views: Sequence[int] | None = None,
                             mask_mode: str = "reference", mask_path: str | None = None,
                             limit: int | None = None) -> NVSMultiviewTestItems:
    """The multi-view NVS test set: per object of ``object_list`` (or every folder of ``views_root``; the
    first ``limit`` of them), ``reference_view`` -> ``target_views`` (default: the first ``num_views``
    indices other than the reference), with the masks of ``mask_mode``: "reference" (the reference's
    silhouette, targets unseen), "complete" (whole targets) or "fixed" (``<mask_path>/<uid>/<view:03d>.png``)."""
    check_view_counts(size, num_views, num_renders)
    check_test_views(num_views, num_renders, reference_view, target_views)
    check_mask_mode(mask_mode, mask_path)
    root = Path(views_root)
    return NVSMultiviewTestItems(root, _object_uids(root, object_list)[:limit], size=size, num_views=num_views,
                                 num_renders=num_renders, reference_view=reference_view,
                                 target_views=target_views, mask_mode=mask_mode, mask_path=mask_path)
