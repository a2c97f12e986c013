"""Test pairs in the layout of the original ``test_inpainting.py`` (METHOD 1.14)::

    <test_path>/<id>/source.jpg   (or .png)   the reference view (the file name kept from the original)
    <test_path>/<id>/target.jpg   (or .png)   the ground-truth target view
    <test_path>/<id>/mask.png                 255 = hole; optional when masks come from --mask_path

Both images are resized to ``test_size`` x ``test_size`` with INTER_AREA, the mask with nearest, as the
original loader; a mask is binarised at 127 (the original test loader only divided by 255), and a mask
stored as 0 / 1 is read as such (leftrefill.images.load_mask).

``check_pair_images`` checks every file cheaply up front, so a bad file stops a run before the model is
loaded; ``TestPairDataset.full_size`` gives a pair's target and hole at the target's own size, read
again from disk when needed, so batches hold only ``test_size`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.images import (ImageInputError, image_file_problem, load_mask, load_rgb, mask_to_tensor, resize_mask,
                               resize_rgb, rgb_to_tensor)

IMAGE_SUFFIXES = (".jpg", ".png")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_LISTED = 10  # problems listed one per line in an error message; the rest are counted


@dataclass(frozen=True)
class TestPair:
    id: str
    reference: Path  # <id>/source.jpg
    target: Path
    mask: Path


def find_test_pairs(test_path: str | Path, mask_path: str | Path | None = None,
                    limit: int | None = None) -> list[TestPair]:
    """The pairs under ``test_path`` in sorted folder order (the first ``limit``); with ``mask_path`` the
    masks are that folder's images in sorted order, cycled over the pairs."""
    test_path = Path(test_path)
    if not test_path.is_dir():
        raise FileNotFoundError(f"--test_path {test_path}: no such directory")
    folders = sorted(p for p in test_path.iterdir() if p.is_dir())[:limit]
    if not folders:
        raise FileNotFoundError(f"--test_path {test_path}: no pair folders in it (expected <id>/source.jpg, "
                                f"<id>/target.jpg, <id>/mask.png)")
    masks = _mask_folder(Path(mask_path)) if mask_path is not None else None
    pairs, problems = [], []
    for i, folder in enumerate(folders):
        reference, target = find_image(folder, "source", IMAGE_SUFFIXES), find_image(folder, "target", IMAGE_SUFFIXES)
        mask = masks[i % len(masks)] if masks else find_image(folder, "mask", (".png",))
        files = (("source", reference), ("target", target), ("mask", mask))  # file stems on disk
        missing = [stem for stem, path in files if path is None]
        if missing:
            problems.append(f"{folder}: no {' / '.join(_expected(stem) for stem in missing)}")
        else:
            pairs.append(TestPair(folder.name, reference, target, mask))
    if problems:
        raise FileNotFoundError(f"--test_path {test_path}: {len(problems)} incomplete pair folder(s):"
                                f"{problem_listing(problems)}")
    return pairs


def check_pair_images(pairs: list[TestPair]) -> None:
    """Check that every image of ``pairs`` decodes (cheaply, leftrefill.images.image_file_problem); raise one
    ImageInputError listing each bad file and its problem. A mask shared by several pairs is checked once."""
    files = dict.fromkeys(path for pair in pairs for path in (pair.reference, pair.target, pair.mask))
    problems = [f"{path}: {problem}" for path in files if (problem := image_file_problem(path)) is not None]
    if problems:
        raise ImageInputError(f"{len(problems)} of the {len(files)} test image files cannot be read, nothing was "
                              f"run:{problem_listing(problems)}")


def problem_listing(problems: list[str]) -> str:
    """The first MAX_LISTED problems, one per indented line, then how many more."""
    more = f"\n  (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    return "\n  " + "\n  ".join(problems[:MAX_LISTED]) + more


def find_image(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """``folder/<stem><suffix>`` for the first of ``suffixes`` that is a file, or None."""
    return next((folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()), None)


def _expected(name: str) -> str:
    return "mask.png" if name == "mask" else f"{name}.jpg or {name}.png"


def _mask_folder(mask_path: Path) -> list[Path]:
    if not mask_path.is_dir():
        raise FileNotFoundError(f"--mask_path {mask_path}: no such directory")
    masks = sorted(p for p in mask_path.iterdir() if p.suffix.lower() in MASK_SUFFIXES and p.is_file())
    if not masks:
        raise FileNotFoundError(f"--mask_path {mask_path}: no mask images ({', '.join(MASK_SUFFIXES)}) in it")
    return masks


class TestPairDataset(Dataset):
    """Items: ``{"id", "index", "reference", "target", "mask", "mask_resized"}`` with reference and target
    (3, S, S) in [-1, 1], mask (1, S, S) in {0, 1}, S = ``test_size``; ``mask_resized`` says the mask file
    had another size than the target image."""

    def __init__(self, test_path: str | Path, test_size: int = 512, mask_path: str | Path | None = None,
                 limit: int | None = None):
        self.pairs = find_test_pairs(test_path, mask_path, limit)
        self.test_size = test_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair, size = self.pairs[index], (self.test_size, self.test_size)
        target = load_rgb(pair.target, "target")
        mask = load_mask(pair.mask, "mask")
        return {
            "id": pair.id,
            "index": index,
            "reference": rgb_to_tensor(resize_rgb(load_rgb(pair.reference, "reference"), size)),
            "target": rgb_to_tensor(resize_rgb(target, size)),
            "mask": mask_to_tensor(resize_mask(mask, size, rule="nearest")),
            "mask_resized": torch.tensor(mask.shape != target.shape[:2]),
        }

    def full_size(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``index``'s target RGB uint8 (H, W, 3) and hole bool (H, W) at the target's own size; a mask
        of another size is resized to it with nearest, as ``LeftRefillPipeline.__call__`` does."""
        pair = self.pairs[index]
        target, hole = load_rgb(pair.target, "target"), load_mask(pair.mask, "mask")
        return target, resize_mask(hole, target.shape[:2], rule="nearest")
