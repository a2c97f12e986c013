"""Novel-view-synthesis data: Objaverse renders in the Zero-1-to-3 layout (METHOD 2.1, 2.2, 2.5)::

    <views_root>/<uid>/000.png ... 011.png   RGBA renders (256 x 256 in the release)
    <views_root>/<uid>/000.npy ... 011.npy   3x4 world-to-camera [R | t] (Blender, camera looks down -Z)
    <object_list>                            optional: one uid per line (obj_train.txt / obj_test.txt,
                                             written by scripts/objaverse_lists.py)

Conventions of the release (``dataloaders/obj_nvs_dataset.py``), kept here:
* pixels with alpha == 0 become white; semi-transparent pixels keep their raw RGB (no compositing);
  alpha is dropped; the image is resized bilinearly (cv2.INTER_LINEAR) to S;
* the object silhouette is alpha > 0, resized with INTER_AREA and thresholded at > 0;
* training draws two distinct random views (target, reference) per object; testing uses target = view 0,
  reference = view 2; the pose is ``relative_pose(target, reference)`` (leftrefill.nvs_pose, Zero123's);
* training masks are the adaptive masks of leftrefill.data.nvs_masks.
Ours differ in: fixed test masks are binarised at 0.5 (the release divides by 255 and keeps grey);
an RGB render without alpha is read with a white background assumed (silhouette = not near white);
cameras and images are checked and a bad file is named (the release would train on NaN poses).

Items follow the batch schema of docs/data.md (``reference``, ``target``, ``mask``, ``pose``, ``id``),
plus the view indices ``reference_view`` and ``target_view``. NVS training shuffles with a plain
distributed sampler (METHOD 7.3), so the training set has no ``scenes``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from leftrefill.data.cross_view import MAX_BAD_ITEMS_IN_A_ROW
from leftrefill.data.nvs_masks import adaptive_mask, complete_mask, read_fixed_mask
from leftrefill.images import (ImageInputError, as_pil, image_file_problem, load_rgb, mask_to_tensor,
                               rgb_to_tensor)
from leftrefill.data.test_pairs import problem_listing
from leftrefill.nvs_pose import relative_pose
from leftrefill.prep.objaverse import npy_header

log = logging.getLogger(__name__)

NUM_VIEWS = 12
MASK_MODES = ("fixed", "complete", "reference")
MAX_LISTED = 10  # incomplete objects / missing files listed in an error message; the rest are counted
ORTHONORMAL_TOLERANCE = 1e-3  # max |R R^T - I|; Blender exports float32 matrices (~1e-7 off)
NEAR_WHITE = 250  # an RGB render without alpha: a pixel with every channel >= this is background
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_warned_no_alpha = False  # the white-background warning is logged once per process


class NVSDataError(ValueError):
    """Unusable NVS data (a camera file, an object list, incomplete object folders); the message names
    the files."""


class NVSPair(NamedTuple):
    """One test pair: the object's uid and the two renders it reads."""

    id: str
    reference: Path
    target: Path


# ------------------------------------------------------------------------------------------ files


def read_camera(path: str | Path) -> np.ndarray:
    """A camera file -> float64 (3, 4) world-to-camera [R | t].

    The ``.npy`` header is checked before any data is read (shape (3, 4), real dtype: a pickled object
    array is refused without unpickling), then the values: finite, R orthonormal (max |R R^T - I| <=
    1e-3) and a rotation (det R > 0). Any problem raises NVSDataError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            shape, dtype = npy_header(file)
            problem = _header_problem(shape, dtype)
            if problem is None:
                file.seek(0)
                camera = np.lib.format.read_array(file, allow_pickle=False).astype(np.float64)
    except OSError as err:
        raise NVSDataError(f"camera {path}: cannot be read ({_one_line(err)})") from None
    except (ValueError, EOFError) as err:
        raise NVSDataError(f"camera {path}: not a readable .npy file ({_one_line(err)})") from None
    if problem is not None:
        raise NVSDataError(f"camera {path}: {problem}")
    _check_rotation(camera, path)
    return camera


def _header_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    if dtype.kind not in "iuf":
        return f"dtype {dtype}, expected real numbers (object arrays are pickles and are not read)"
    if shape != (3, 4):
        return f"shape {shape}, expected a 3x4 world-to-camera [R | t]"
    return None


def _check_rotation(camera: np.ndarray, path: Path) -> None:
    if not np.isfinite(camera).all():
        raise NVSDataError(f"camera {path}: NaN or infinite entries")
    rotation = camera[:, :3]
    error = np.abs(rotation @ rotation.T - np.eye(3)).max()
    if error > ORTHONORMAL_TOLERANCE:
        raise NVSDataError(f"camera {path}: R is not orthonormal (max |R R^T - I| = {error:.3g} > "
                           f"{ORTHONORMAL_TOLERANCE})")
    if np.linalg.det(rotation) < 0:
        raise NVSDataError(f"camera {path}: R is a reflection (det R < 0), not a rotation")


def load_view(source: str | Path | Image.Image | np.ndarray, size: int,
              name: str = "view") -> tuple[torch.Tensor, torch.Tensor]:
    """An RGBA render -> (rgb float32 (3, S, S) in [-1, 1], silhouette float32 (1, S, S) in {0, 1}).

    ``source``: a path, a PIL image or a uint8 array (H, W, 4) or (H, W, 3). As the release: alpha == 0
    pixels become white, alpha is dropped, RGB is resized with INTER_LINEAR, the silhouette is alpha > 0
    resized with INTER_AREA, > 0. Without alpha, the background is assumed white and the silhouette is
    every pixel with a channel below 250 (a warning says so, once per process). A bad input raises
    ImageInputError naming it (and the file).
    """
    label = f"{name} {source}" if isinstance(source, (str, Path)) else name
    rgb, alpha = read_rgba(source, name)
    rgb = rgb.copy()  # writable, and never the caller's array
    if alpha is None:
        _warn_no_alpha(label)
        silhouette = (rgb < NEAR_WHITE).any(axis=2)
    else:
        silhouette = alpha > 0
        rgb[alpha == 0] = 255
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)
        silhouette = cv2.resize(silhouette.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0
    return rgb_to_tensor(rgb), mask_to_tensor(silhouette)


def read_rgba(source: str | Path | Image.Image | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 (H, W, 3), alpha uint8 (H, W) or None when the input has no alpha channel)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] not in (3, 4) or source.size == 0:
            raise ImageInputError(f"{name}: expected a uint8 array (H, W, 4) or (H, W, 3), got {source.dtype} "
                                  f"{source.shape}")
        array = source
    else:
        image = as_pil(source, name)  # decodes now: a truncated file fails here, naming it
        has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
        array = np.asarray(image.convert("RGBA")) if has_alpha else load_rgb(image, name)
    if array.shape[2] == 4:
        return np.ascontiguousarray(array[..., :3]), array[..., 3]
    return array, None


def _warn_no_alpha(label: str) -> None:
    global _warned_no_alpha
    if not _warned_no_alpha:
        _warned_no_alpha = True
        log.warning("%s has no alpha channel: a white background is assumed (silhouette = pixels with a "
                    "channel below %d); further renders without alpha are not reported", label, NEAR_WHITE)


def read_object_list(path: str | Path) -> list[str]:
    """The uids of an object list file (one per line; blank lines and lines starting with '#' skipped).

    A uid must name a folder directly under views_root: one with a path separator, '..', '.' or
    whitespace is refused, naming the file and line. An unreadable or empty list raises NVSDataError.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise NVSDataError(f"object list {path}: cannot be read ({_one_line(err)})") from None
    uids, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        uid = line.strip()
        if not uid or uid.startswith("#"):
            continue
        if any(sep in uid for sep in ("/", "\\", os.sep)) or ".." in uid or uid == "." or len(uid.split()) > 1:
            raise NVSDataError(f"object list {path}, line {number}: {uid!r} is not a uid (a folder name directly "
                               f"under views_root: no path separators, '..' or whitespace)")
        if uid in first_line:  # it would be evaluated twice, and counted twice in the means
            raise NVSDataError(f"object list {path}, line {number}: {uid!r} is listed again (first on line "
                               f"{first_line[uid]})")
        first_line[uid] = number
        uids.append(uid)
    if not uids:
        raise NVSDataError(f"object list {path}: lists no uids")
    return uids


def _object_uids(views_root: Path, object_list: str | Path | None) -> list[str]:
    """The uids of ``object_list``, or every non-hidden sub-folder of ``views_root`` in sorted order."""
    if not views_root.is_dir():
        what = "a file, not a folder" if views_root.exists() else "no such folder"
        raise NVSDataError(f"views folder {views_root}: {what} (expected the views_release folder: "
                           f"<uid>/000.png, 000.npy, ...)")
    if object_list is not None:
        return read_object_list(object_list)
    uids = sorted(p.name for p in views_root.iterdir() if not p.name.startswith(".") and p.is_dir())
    if not uids:
        raise NVSDataError(f"views_root {views_root}: no object folders in it (expected <uid>/000.png, 000.npy, ...)")
    return uids


def _check_complete(views_root: Path, uids: list[str], views: list[int]) -> None:
    """Raise one NVSDataError listing every object folder that lacks a PNG or NPY of ``views``."""
    wanted = [f"{view:03d}{suffix}" for view in views for suffix in (".png", ".npy")]
    problems = []
    for uid in uids:
        try:
            present = set(os.listdir(views_root / uid))  # one directory read per object, not 24 stats
        except OSError:
            problems.append(f"{uid}: no such folder")
            continue
        missing = [file for file in wanted if file not in present]
        if len(missing) == len(wanted):
            problems.append(f"{uid}: none of the {len(wanted)} files")
        elif missing:
            more = f" (+{len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
            problems.append(f"{uid}: missing {', '.join(missing[:MAX_LISTED])}{more}")
    if problems:
        raise NVSDataError(f"views_root {views_root}: {len(problems)} of {len(uids)} object folders are incomplete "
                           f"(each needs {', '.join(wanted[:2])} ... {wanted[-1]}):{problem_listing(problems)}")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -------------------------------------------------------------------------------------- training


class NVSTrainingPairs(Dataset):
    """Items ``{"id": uid, "reference", "target": (3, S, S) in [-1, 1], "mask": (1, S, S) in {0, 1},
    "pose": float32 (4,), "reference_view", "target_view": int}``, one per object.

    Each item draws two distinct views (target, reference) and the adaptive mask of the target's
    silhouette from a numpy generator seeded per item from torch's RNG, as the cross-view pairs: seeded
    by Lightning per run and by DataLoader per worker and epoch. An object whose files cannot be read is
    skipped with a warning (the next object is used), as in leftrefill.data.cross_view.
    """

    def __init__(self, views_root: str | Path, uids: list[str], *, size: int = 256, num_views: int = NUM_VIEWS):
        if num_views < 2:
            raise ValueError(f"num_views must be >= 2 (a pair needs two views), got {num_views}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.views_root = Path(views_root)
        self.uids = uids
        self.size = size
        self.num_views = num_views
        _check_complete(self.views_root, uids, list(range(num_views)))

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, index: int) -> dict:
        return readable_training_item(self.uids, index, self.item)

    def item(self, uid: str, rng: np.random.Generator) -> dict:
        target_view, reference_view = (int(v) for v in rng.choice(self.num_views, size=2, replace=False))
        folder = self.views_root / uid
        target, silhouette = load_view(folder / f"{target_view:03d}.png", self.size, "target")
        reference, _ = load_view(folder / f"{reference_view:03d}.png", self.size, "reference")
        mask = adaptive_mask(silhouette[0].numpy() > 0, rng)
        pose = relative_pose(read_camera(folder / f"{target_view:03d}.npy"),
                             read_camera(folder / f"{reference_view:03d}.npy"))
        return {"id": uid, "reference": reference, "target": target, "mask": mask_to_tensor(mask), "pose": pose,
                "reference_view": reference_view, "target_view": target_view}


def readable_training_item(uids: list[str], index: int, item: Callable[[str, np.random.Generator], dict]) -> dict:
    """``item(uid, rng)`` for the object at ``index``; an object whose files cannot be read is skipped with a
    warning and the next one is used, at most MAX_BAD_ITEMS_IN_A_ROW in a row. ``rng`` is a numpy generator
    seeded per call from torch's RNG, which Lightning seeds per run and DataLoader per worker and epoch."""
    for attempt in range(MAX_BAD_ITEMS_IN_A_ROW):
        uid = uids[(index + attempt) % len(uids)]
        try:
            return item(uid, np.random.default_rng(int(torch.randint(0, 2**62, ()).item())))
        except (ImageInputError, NVSDataError) as err:
            log.warning("skipping object %s: %s", uid, err)
    raise RuntimeError(f"{MAX_BAD_ITEMS_IN_A_ROW} objects in a row from index {index} could not be read; "
                       f"see the warnings above")


def nvs_training_pairs(views_root: str, object_list: str | None = None, *, size: int = 256,
                       num_views: int = NUM_VIEWS) -> NVSTrainingPairs:
    """The NVS training set of a config's ``data`` section: the objects of ``object_list`` (or every
    folder of ``views_root``), each checked to hold all ``num_views`` renders and cameras."""
    root = Path(views_root)
    uids = _object_uids(root, object_list)
    log.info("NVS training: %d objects under %s", len(uids), root)
    return NVSTrainingPairs(root, uids, size=size, num_views=num_views)


# ------------------------------------------------------------------------------------------ test


class NVSTestPairs(Dataset):
    """Items ``{"id": uid, "index", "reference", "target" (the ground truth), "target_visible": (3, S, S)
    in [-1, 1], "mask", "reference_silhouette": (1, S, S) in {0, 1}, "pose": float32 (4,),
    "reference_view", "target_view": int, "mask_resized": bool}``.

    ``target_visible`` is what the model may see of the target: the ground truth for the mask modes
    "fixed" and "complete"; pure white for "reference", where the target is unknown and the mask is the
    reference's silhouette (the release's ``use_ref_mask``; its masked image is white on the target half).
    ``pairs`` lists (uid, reference png, target png) per item.
    """

    def __init__(self, views_root: str | Path, uids: list[str], *, size: int = 256, num_views: int = NUM_VIEWS,
                 reference_view: int = 2, target_view: int = 0, mask_mode: str = "reference",
                 mask_path: str | Path | None = None):
        check_test_arguments(size, num_views, reference_view, target_view, mask_mode, mask_path)
        self.views_root = Path(views_root)
        self.size, self.mask_mode = size, mask_mode
        self.reference_view, self.target_view = reference_view, target_view
        self.mask_path = Path(mask_path) if mask_path is not None else None
        _check_complete(self.views_root, uids, sorted({reference_view, target_view}))
        self.pairs = [NVSPair(uid, self.views_root / uid / f"{reference_view:03d}.png",
                              self.views_root / uid / f"{target_view:03d}.png") for uid in uids]
        if mask_mode == "fixed":
            self._check_mask_files()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        reference, reference_silhouette = load_view(pair.reference, self.size, "reference")
        target, _ = load_view(pair.target, self.size, "target")
        folder = self.views_root / pair.id
        pose = relative_pose(read_camera(folder / f"{self.target_view:03d}.npy"),
                             read_camera(folder / f"{self.reference_view:03d}.npy"))
        mask, resized, visible = self._mask(pair.id, reference_silhouette, target)
        return {"id": pair.id, "index": index, "reference": reference, "target": target, "target_visible": visible,
                "mask": mask, "reference_silhouette": reference_silhouette, "pose": pose,
                "reference_view": self.reference_view, "target_view": self.target_view,
                "mask_resized": torch.tensor(resized)}

    def _mask(self, uid: str, reference_silhouette: torch.Tensor,
              target: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """(mask (1, S, S), whether the mask file was resized, target_visible (3, S, S))."""
        if self.mask_mode == "reference":
            # Used as is, not dilated, as the release's use_ref_mask; an empty one: the whole view.
            return reference_mask(reference_silhouette, uid), False, torch.ones_like(target)
        if self.mask_mode == "complete":
            return mask_to_tensor(complete_mask(self.size)), False, target
        mask, resized = read_fixed_mask(self._mask_file(uid), self.size)
        return mask_to_tensor(mask), resized, target

    def _mask_file(self, uid: str) -> Path:
        return self.mask_path / uid / f"{self.target_view:03d}.png"

    def _check_mask_files(self) -> None:
        if not self.mask_path.is_dir():
            raise NVSDataError(f"--mask_path {self.mask_path}: not a folder")
        missing = [str(path) for pair in self.pairs if not (path := self._mask_file(pair.id)).is_file()]
        if missing:
            raise NVSDataError(f"--mask_path {self.mask_path}: {len(missing)} of {len(self.pairs)} test mask files "
                               f"are missing (expected <mask_path>/<uid>/{self.target_view:03d}.png):"
                               f"{problem_listing(missing)}")


def reference_mask(silhouette: torch.Tensor, name: str = "the reference") -> torch.Tensor:
    """The region to generate when the target is unknown (1, S, S): the reference's silhouette, or the whole
    view when it is empty (with a warning naming ``name``), as NVSPipeline does."""
    if silhouette.any():
        return silhouette.clone()
    log.warning("%s: the reference has an empty silhouette (no object pixel): the whole view is generated", name)
    return torch.ones_like(silhouette)


def check_test_arguments(size: int, num_views: int, reference_view: int, target_view: int, mask_mode: str,
                          mask_path: str | Path | None) -> None:
    """ValueError naming the command-line argument of the first bad setting."""
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    if num_views < 2:
        raise ValueError(f"--num_views must be >= 2 (a pair needs two views), got {num_views}")
    for flag, view in (("--reference_view", reference_view), ("--target_view", target_view)):
        if not 0 <= view < num_views:
            raise ValueError(f"{flag} {view} is outside [0, {num_views}): the renders are 000.png ... "
                             f"{num_views - 1:03d}.png")
    if reference_view == target_view:
        raise ValueError(f"--reference_view and --target_view must differ, both are {target_view}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"--mask_mode {mask_mode!r} is unknown; use one of {', '.join(MASK_MODES)}")
    if mask_mode == "fixed" and mask_path is None:
        raise ValueError("--mask_mode fixed needs --mask_path (the folder of <uid>/<target_view:03d>.png masks)")


def nvs_test_pairs(views_root: str, object_list: str | None = None, *, size: int = 256, num_views: int = NUM_VIEWS,
                   reference_view: int = 2, target_view: int = 0, mask_mode: str = "reference",
                   mask_path: str | None = None, limit: int | None = None) -> NVSTestPairs:
    """The NVS test set: per object of ``object_list`` (or every folder of ``views_root``; the first
    ``limit`` of them), the pair (reference_view -> target_view), view 2 -> view 0 as the release, with the
    mask of ``mask_mode``: "fixed" (``<mask_path>/<uid>/<target_view:03d>.png``, the official test masks),
    "complete" (the whole target) or "reference" (the reference's silhouette, target unseen)."""
    check_test_arguments(size, num_views, reference_view, target_view, mask_mode, mask_path)
    root = Path(views_root)
    return NVSTestPairs(root, _object_uids(root, object_list)[:limit], size=size, num_views=num_views,
                        reference_view=reference_view, target_view=target_view, mask_mode=mask_mode,
                        mask_path=mask_path)


def check_test_files(dataset: NVSTestPairs) -> None:
    """Check every file the test pairs will read, cheaply, so a bad one stops a run before a model is
    loaded: each render and fixed mask decodes (leftrefill.images.image_file_problem) and each camera of
    the two views is a valid 3x4 rotation (:func:`read_camera`). Raise one NVSDataError listing them all."""
    problems = []
    for pair in dataset.pairs:
        masks = [dataset._mask_file(pair.id)] if dataset.mask_mode == "fixed" else []
        problems += view_file_problems(dataset.views_root / pair.id, (dataset.reference_view, dataset.target_view),
                                       masks)
    raise_file_problems(problems, len(dataset.pairs))


def view_file_problems(folder: Path, views, extra: list[Path] = ()) -> list[str]:
    """What is wrong with the renders and cameras of ``views`` in an object's ``folder`` and the ``extra``
    files (masks): one line each, empty when every file is usable."""
    problems = []
    for path in [*(folder / f"{view:03d}.png" for view in views), *extra]:
        if (problem := image_file_problem(path)) is not None:
            problems.append(f"{path}: {problem}")
    for view in views:
        try:
            read_camera(folder / f"{view:03d}.npy")
        except NVSDataError as err:
            problems.append(str(err))
    return problems


def raise_file_problems(problems: list[str], objects: int) -> None:
    """One NVSDataError listing ``problems`` found among the test files of ``objects`` objects, if any."""
    if len(problems) == 1:
        raise NVSDataError(f"{problems[0]} (nothing was run)")
    if problems:
        raise NVSDataError(f"{len(problems)} test files of {objects} objects cannot be used, nothing was "
                           f"run:{problem_listing(problems)}")