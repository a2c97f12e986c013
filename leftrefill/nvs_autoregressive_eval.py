"""Evaluating block-causal autoregressive NVS (METHOD 3.3) with test_nvs.py's loop (leftrefill.evaluation): the
last of K target views, scored as one-view NVS scores its view.

Per object the test item holds the reference, K - 1 earlier target views and the scored ``target_view``
(leftrefill.data.objaverse_multiview test items with ``target_views = earlier_views + [target_view]``). The
scored view is generated as view K - 1 after the earlier ones, which are either

* given: their ground-truth renders are known views ("n-to-1" NVS: the last view given K - 1 earlier ones,
  the setting of ``nvs_mv.jpg`` where growing sets of views predict one view), or
* generated (``autoregressive``): each generated in turn from the reference alone, then the scored one from
  them (``nvs_ar.jpg``); every generated view is written to ``generated/<render:03d>/<id>.png``.

A known view carries in its concat channels the adaptive mask of its own silhouette, as in training
(``known_masks`` "adaptive", the default), or the mask of the item (``"given"``); see
leftrefill.nvs_autoregressive. The scored view draws its noise from seed slot 0 and the earlier views from
slots 1..K-1 (leftrefill.nvs_autoregressive.scored_last_slots), so K = 1 is one-reference NVS through the
multi-view model with the same seed, and the scored view is the same render with the same noise for every K:
a sweep over K scores one view with more and more views before it and nothing else changed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.objaverse_multiview import NVSMultiviewTestItems, nvs_multiview_test_items
from leftrefill.data.objaverse_nvs import (NUM_VIEWS, NVSDataError, NVSPair, raise_file_problems,
                                           view_file_problems)
from leftrefill.evaluation import NVSTask
from leftrefill.grid import model_view_panels
from leftrefill.images import tensor_to_rgb
from leftrefill.nvs_autoregressive import AutoregressiveNVSPipeline, scored_last_slots


def default_earlier_views(reference_view: int, target_view: int, count: int) -> list[int]:
    """The first ``count`` render indices other than the reference and the scored target, increasing."""
    return [view for view in range(NUM_VIEWS) if view not in (reference_view, target_view)][:count]


class LastViewTestItems(Dataset):
    """Multi-view NVS test items as one-view NVS test pairs of their last target view, the schema of
    ``NVSTestPairs`` (``reference``, ``target``, ``target_visible``, ``mask``, ``pose``, ``target_view``:
    the scored view; ``mask_resized``: any of the item's masks), plus the K - 1 earlier views:
    ``earlier_targets`` and ``earlier_visible`` (K-1, 3, S, S) in [-1, 1], ``earlier_masks``
    (K-1, 1, S, S) in {0, 1}, ``earlier_poses`` (K-1, 4) and ``earlier_views`` int64 (K-1,)."""

    def __init__(self, items: NVSMultiviewTestItems):
        self.items = items
        self.views_root, self.reference_view = items.views_root, items.reference_view
        self.mask_mode, self.mask_path = items.mask_mode, items.mask_path
        *self.earlier_views, self.target_view = items.target_views
        self.pairs = [NVSPair(uid, self.views_root / uid / f"{self.reference_view:03d}.png",
                              self.views_root / uid / f"{self.target_view:03d}.png") for uid in items.uids]

    @property
    def num_views(self) -> int:
        """K: the earlier views and the scored one."""
        return len(self.earlier_views) + 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"id": item["id"], "index": index, "reference": item["reference"],
                "reference_silhouette": item["reference_silhouette"], "reference_view": item["reference_view"],
                "target": item["target"][-1], "target_visible": item["target_visible"][-1],
                "mask": item["mask"][-1], "pose": item["pose"][-1], "target_view": self.target_view,
                "mask_resized": item["mask_resized"].any(),
                "earlier_targets": item["target"][:-1], "earlier_visible": item["target_visible"][:-1],
                "earlier_masks": item["mask"][:-1], "earlier_poses": item["pose"][:-1],
                "earlier_views": item["target_views"][:-1]}


def last_view_test_items(views_root: str, object_list: str | None = None, *, size: int = 256, views: int = 1,
                         reference_view: int = 2, target_view: int = 0, earlier_views: list[int] | None = None,
                         mask_mode: str = "reference", mask_path: str | None = None,
                         limit: int | None = None) -> LastViewTestItems:
    """Test items scoring ``target_view`` after ``views`` - 1 earlier views (``earlier_views``, default
    :func:`default_earlier_views`) of the same object, all seen from ``reference_view``."""
    if views < 1:
        raise ValueError(f"--views must be >= 1, got {views}")
    if earlier_views is None:
        earlier_views = default_earlier_views(reference_view, target_view, views - 1)
    if len(earlier_views) != views - 1:
        raise ValueError(f"--earlier_views {earlier_views}: {len(earlier_views)} views, but --views {views} needs "
                         f"{views - 1} views before the scored --target_view")
    try:
        items = nvs_multiview_test_items(views_root, object_list, size=size, num_views=views,
                                         reference_view=reference_view, target_views=[*earlier_views, target_view],
                                         mask_mode=mask_mode, mask_path=mask_path, limit=limit)
    except NVSDataError:
        raise
    except ValueError as err:  # the data module names its own arguments: say which flags set them
        raise ValueError(f"--earlier_views {earlier_views} + --target_view {target_view}: {err}") from None
    return LastViewTestItems(items)


def check_test_files(dataset: LastViewTestItems) -> None:
    """Every render, fixed mask and camera the items will read, checked cheaply before the model loads (as
    ``leftrefill.data.objaverse_nvs.check_test_files`` for one view); one NVSDataError listing them all."""
    items, problems = dataset.items, []
    views = [dataset.reference_view, *items.target_views]
    for uid in items.uids:
        masks = [items.mask_file(uid, view) for view in items.target_views] if items.mask_mode == "fixed" else []
        problems += view_file_problems(dataset.views_root / uid, views, masks)
    raise_file_problems(problems, len(items.uids))


class AutoregressiveNVSTask(NVSTask):
    """The last view of each item (:class:`LastViewTestItems`) generated by an autoregressive NVS model after
    the earlier views, given (ground truth) or generated (``autoregressive``), which carry ``known_masks``
    ("adaptive" or "given", leftrefill.nvs_autoregressive.generate_views). Grid: reference | the earlier
    views | target as seen | result | ground truth."""

    dataset: LastViewTestItems

    def __init__(self, dataset: LastViewTestItems, autoregressive: bool = False, known_masks: str = "adaptive"):
        super().__init__(dataset)
        self.autoregressive, self.known_masks = autoregressive, known_masks
        kind = "gen." if autoregressive else "given"  # short: a label is cut at its panel's edge
        self.grid_labels = ("reference", *(f"{kind} {view:03d}" for view in dataset.earlier_views),
                            "target as seen", "result", "ground truth")
        self._earlier: torch.Tensor | None = None  # the batch's earlier views (B, K-1, 3, S, S), for its grids

    def sample(self, pipe: AutoregressiveNVSPipeline, batch: dict, **sampling) -> torch.Tensor:
        poses = torch.cat([batch["earlier_poses"], batch["pose"][:, None]], dim=1)  # (B, K, 4)
        masks = torch.cat([batch["earlier_masks"], batch["mask"][:, None]], dim=1)  # (B, K, 1, S, S)
        options = {"known_masks": self.known_masks, "slots": scored_last_slots(poses.shape[1])} | sampling
        if self.autoregressive:
            visible = torch.cat([batch["earlier_visible"], batch["target_visible"][:, None]], dim=1)
            views = pipe.synthesize_views(batch["reference"], poses, masks, target_visible=visible, **options)
            self._earlier = views[:, :-1].cpu().nan_to_num()
            return views[:, -1]
        self._earlier = batch["earlier_targets"]
        return pipe.synthesize_views(batch["reference"], poses, masks, batch["earlier_targets"],
                                     batch["target_visible"][:, None], **options)[:, 0]

    def panels(self, batch: dict, j: int, result: torch.Tensor) -> list[np.ndarray]:
        reference, seen, filled, truth = model_view_panels(batch["reference"][j], batch["target_visible"][j],
                                                           batch["mask"][j], result, batch["target"][j])
        return [reference, *(tensor_to_rgb(view) for view in self._earlier[j]), seen, filled, truth]

    def extra_images(self, batch: dict, j: int, result: np.ndarray) -> dict[str, np.ndarray]:
        if not self.autoregressive:
            return {}
        earlier = {f"generated/{view:03d}": tensor_to_rgb(image)
                   for view, image in zip(self.dataset.earlier_views, self._earlier[j])}
        return earlier | {f"generated/{self.dataset.target_view:03d}": result}

    def summary(self) -> dict:
        data = self.dataset
        return {"task": self.name, "nvs": {
            "views_root": str(data.views_root), "reference_view": data.reference_view,
            "target_view": data.target_view, "views": data.num_views, "earlier_views": list(data.earlier_views),
            "earlier_views_are": "generated" if self.autoregressive else "ground truth",
            "known_masks": self.known_masks,
            "mask_mode": data.mask_mode, "mask_path": None if data.mask_path is None else str(data.mask_path),
            "metric_region": "the whole generated view, not blended with the ground truth"}}

