"""RealFill scenes (RealBench layout) and the per-scene training set (METHOD 5.1, 5.2, 7.1).

A scene folder::

    <scene>/ref/*.jpg|jpeg|png      1 to MAX_REFERENCES reference images (sorted by file name)
    <scene>/target/target.png       the target photo
    <scene>/target/mask.png         white (> 127) = the region to fill
    <scene>/target/gt.png           optional ground truth, the target's size (RealBench only)

``read_scene`` checks all of it up front and raises one ``SceneError`` naming the file or folder.

The training set follows the public re-implementations (diffusers ``research_projects/realfill``,
thuanz123/realfill @ 9d8d335), METHOD 7.1:

* one item per image of the scene (every reference, then the target), so a loader with
  ``batch_size >= len(dataset)`` holds each image once per step: the recipe's "batch 16";
* each item gets a fresh random resize of the short side to [size, int(1.125 * size)) (torchvision
  ``RandomResize``: an integer drawn with the upper end excluded) and a uniform random size x size crop,
  the same for the image and the target's mask;
* references get ``random_box_mask`` (the reference's ``make_mask``), replaced by an all-ones mask with
  p = 0.1: that replacement is in the dataset's ``__getitem__`` there, not in ``make_mask``, and so here;
* the target gets a random box mask as the references (diffusers' variant, the one METHOD 5.1 recommends:
  the model must generate parts of the target's known content too), joined with the target's own hole,
  whose pixels are unknown and so never shown; ``target_random_mask=False`` gives thuanz123's latest
  variant, the hole alone. Its loss weight is 1 on its known pixels only (mask resized with the image,
  known = below the midpoint, as the reference's ``weighting < 0``);
* the prompt "a photo of sks" becomes "" with p = 0.1;
* the target's unknown pixels are replaced by mid-gray (HIDDEN_VALUE) once, when the scene is read: the
  reference trains on ``target.png`` as it is, and a target that holds the ground truth in its hole (as
  RealBench's whole photos, and the bundled scene) would otherwise reach the VAE latent, x_t and, with
  random target masks, the model's input.

Differences from the reference: randomness comes from a numpy generator seeded per item from torch's RNG
(as ``cross_view``), not from Python's ``random`` / numpy's global state, so a torch seed reproduces a run;
images are resized with OpenCV (INTER_AREA when shrinking, INTER_LINEAR when enlarging) instead of PIL's
antialiased bilinear; the long side is rounded (torchvision truncates); images are decoded once, when the
dataset is built, instead of at every step; the target's input mask under the real-mask variant is
exactly ``1 - loss_weight`` (thuanz123 also derives it from the weighting), and it is never replaced by
an all-ones mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from leftrefill.data.test_pairs import problem_listing
from leftrefill.data.views import ViewTransform, short_side_resized
from leftrefill.images import (ImageInputError, image_file_problem, load_mask, load_rgb, mask_to_tensor, resize_mask,
                               rgb_to_tensor)

log = logging.getLogger(__name__)

MAX_REFERENCES = 5  # RealFill's setting: 1 to 5 references (METHOD 5.1)
REFERENCE_SUFFIXES = (".jpg", ".jpeg", ".png")
PROMPT = "a photo of sks"  # DreamBooth-style rare-token identifier (METHOD 5.1)
PROMPT_DROPOUT = 0.1  # "" instead of the prompt, per item [re-impl]
FULL_MASK_RATE = 0.1  # all-ones mask (nothing known) instead of the box mask, per reference item [re-impl]
MAX_RESIZE = 1.125  # short side drawn in [size, int(1.125 * size)): 512 -> [512, 576) [re-impl]
HIDDEN_VALUE = 128  # the target's unknown pixels in training: mid-gray, about 0 in [-1, 1] (the masked-image value)

# make_mask's constants (diffusers research_projects/realfill), as fractions of the resolution.
BOX_COUNT_END = 30  # np.random.randint(1, 30): 1 to 29 boxes
BOX_MIN, BOX_MAX, BOX_MARGIN = 0.03, 0.25, 0.01
INVERT_RATE = 0.5  # boxes become holes (inpainting-like) instead of the known region (outpainting-like)


class SceneError(ValueError):
    """A scene folder that cannot be used; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class Scene:
    path: Path
    references: tuple[Path, ...]  # sorted by file name
    target: Path  # target/target.png
    mask: Path  # target/mask.png, white = fill
    gt: Path | None = None  # target/gt.png when present

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def images(self) -> tuple[Path, ...]:
        """The training images in item order: the references, then the target (the reference's order)."""
        return (*self.references, self.target)


# -- reading a scene -----------------------------------------------------------------------------------
def read_scene(path: str | Path) -> Scene:
    """Find and check a RealBench scene folder; raise ``SceneError`` naming the bad file or folder.

    Checked: ``ref/`` holds 1 to MAX_REFERENCES images, ``target/target.png`` and ``target/mask.png`` exist,
    every image decodes, the mask marks something to fill and leaves something known, and ``gt.png`` (when
    present) has the target's size. A mask of another size than the target is only warned about: it is
    resized with nearest (``load_target``).
    """
    path = Path(path)
    if not path.is_dir():
        raise SceneError(f"scene {path}: no such directory")
    scene = Scene(path, _find_references(path), path / "target" / "target.png", path / "target" / "mask.png",
                  gt if (gt := path / "target" / "gt.png").exists() else None)
    for required in (scene.target, scene.mask):
        if not required.exists():
            raise SceneError(f"scene {path}: {required} is missing (the RealBench layout has target/target.png "
                             f"and target/mask.png, white = fill)")
    problems = [f"{file}: {problem}" for file in (*scene.images, scene.mask, scene.gt)
                if file is not None and (problem := image_file_problem(file)) is not None]
    if problems:
        raise SceneError(f"scene {path}: {len(problems)} image file(s) cannot be read:{problem_listing(problems)}")
    target, hole = load_target(scene)
    if not hole.any():
        raise SceneError(f"{scene.mask}: the mask marks nothing to fill (no pixel is white)")
    if hole.all():
        raise SceneError(f"{scene.mask}: the mask is all white, so the target {scene.target} has no known pixel "
                         f"to train on")
    if scene.gt is not None:
        gt_shape = _load(load_rgb, scene.gt, "ground truth").shape[:2]
        if gt_shape != target.shape[:2]:
            raise SceneError(f"{scene.gt}: {_size(gt_shape)} but the target {scene.target} is "
                             f"{_size(target.shape[:2])}; the ground truth must have the target's size")
    return scene


def load_target(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The target RGB uint8 (H, W, 3) and its hole bool (H, W) (True = fill) at the target's size; a mask
    of another size is resized with nearest, with a warning naming the file."""
    target = _load(load_rgb, scene.target, "target")
    hole = _load(load_mask, scene.mask, "mask")
    if hole.shape != target.shape[:2]:
        log.warning("%s: %s, the target %s is %s; the mask is resized to the target with nearest", scene.mask,
                    _size(hole.shape), scene.target, _size(target.shape[:2]))
        hole = resize_mask(hole, target.shape[:2], rule="nearest")
    return target, hole


def _find_references(path: Path) -> tuple[Path, ...]:
    folder = path / "ref"
    if not folder.is_dir():
        raise SceneError(f"scene {path}: no {folder} folder (the RealBench layout keeps the references in ref/)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    references = tuple(p for p in files if p.suffix.lower() in REFERENCE_SUFFIXES)
    ignored = [p.name for p in files if p.suffix.lower() not in REFERENCE_SUFFIXES]
    if ignored:
        log.warning("%s: %d file(s) that are not %s are not used as references: %s", folder, len(ignored),
                    "/".join(REFERENCE_SUFFIXES), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if not references:
        raise SceneError(f"{folder}: no reference images ({', '.join(REFERENCE_SUFFIXES)}) in it")
    if len(references) > MAX_REFERENCES:
        raise SceneError(f"{folder}: {len(references)} reference images, RealFill takes at most {MAX_REFERENCES}")
    return references


def _load(loader, file: Path, name: str) -> np.ndarray:
    try:
        return loader(file, name)
    except ImageInputError as err:
        raise SceneError(str(err)) from None


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# -- random box masks (make_mask) ----------------------------------------------------------------------
def random_box_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's ``make_mask`` (METHOD 5.1): bool (size, size), True = fill.

    1 to 29 boxes with width and height uniform in [int(0.03 size), int(0.25 size)) (512: [15, 128)), placed
    uniformly at least int(0.01 size) px from the border, are the known region of an all-hole mask; with
    p = 0.5 the mask is inverted (the boxes are the holes). The all-ones replacement (p = 0.1) is the
    dataset's, not this function's.
    """
    min_size, max_size, margin = np.array([BOX_MIN, BOX_MAX, BOX_MARGIN]) * size
    min_size, max_size, margin = int(min_size), int(min(max_size, size - 2 * margin)), int(margin)
    if max_size <= min_size:
        raise ValueError(f"random_box_mask needs size >= 4 (boxes up to 0.25 size), got {size}")
    mask = np.ones((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, BOX_COUNT_END))):
        width, height = rng.integers(min_size, max_size), rng.integers(min_size, max_size)
        x = int(rng.integers(margin, size - margin - width + 1))
        y = int(rng.integers(margin, size - margin - height + 1))
        mask[y:y + height, x:x + width] = False
    return ~mask if rng.random() < INVERT_RATE else mask


# -- the joint random resize + crop --------------------------------------------------------------------
def random_resized_crop(image: np.ndarray, hole: np.ndarray | None, rng: np.random.Generator, size: int,
                        max_resize: float = MAX_RESIZE) -> tuple[np.ndarray, np.ndarray | None, ViewTransform]:
    """Resize the short side to an integer drawn in [size, int(max_resize * size)), then crop a uniform
    size x size square, the same for ``image`` uint8 (H, W, 3) and ``hole`` bool (H, W) (or None).

    The hole is resized as a float map (linear) and thresholded at the midpoint, as the reference resizes
    its mask image with the photo and keeps ``< 0.5`` as known. Returns the crops and the transform."""
    height, width = image.shape[:2]
    short = int(rng.integers(size, max(size + 1, int(max_resize * size))))
    new_width, new_height = short_side_resized(width, height, short)
    enlarge = new_width * new_height > width * height
    image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR if enlarge else cv2.INTER_AREA)
    x, y = int(rng.integers(0, new_width - size + 1)), int(rng.integers(0, new_height - size + 1))
    crop = np.ascontiguousarray(image[y:y + size, x:x + size])
    if hole is not None:
        hole = cv2.resize(hole.astype(np.float32), (new_width, new_height), interpolation=cv2.INTER_LINEAR)
        hole = np.ascontiguousarray(hole[y:y + size, x:x + size] >= 0.5)
    return crop, hole, ViewTransform(new_width / width, new_height / height, x, y, size)


# -- the model's view of the target at inference ------------------------------------------------------
def model_inputs(target: np.ndarray, hole: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target as the model samples it (METHOD 5.1): squashed to size x size, aspect not kept, as the
    reference's pipeline call with height = width = 512 does. target uint8 (H, W, 3), hole bool (H, W) ->
    image (3, size, size) in [-1, 1], mask (1, size, size) in {0, 1}. The mask is resized with the "cover"
    rule (a pixel is hole when any hole pixel falls in it), so no hole pixel is left unfilled."""
    height, width = target.shape[:2]
    enlarge = size * size > height * width
    image = cv2.resize(target, (size, size), interpolation=cv2.INTER_CUBIC if enlarge else cv2.INTER_AREA)
    return rgb_to_tensor(image), mask_to_tensor(resize_mask(hole, (size, size), rule="cover"))


# -- the training set ----------------------------------------------------------------------------------
class RealFillTrainingSet(Dataset):
    """One item per image of a scene, references first, then the target:
    ``{"id": "ref/<file>" or "target/target.png", "image": (3, S, S) in [-1, 1], "mask": (1, S, S) in {0, 1}
    (1 = fill), "loss_weight": (1, S, S) in {0, 1}, "prompt": str, "is_target": bool}``.

    Randomness comes from a numpy generator seeded per item from torch's RNG, which Lightning seeds per run
    and DataLoader per worker and epoch: reproducible with a seed, different every epoch.
    """

    def __init__(self, scene: Scene, *, size: int = 512, prompt: str = PROMPT, prompt_dropout: float = PROMPT_DROPOUT,
                 full_mask_rate: float = FULL_MASK_RATE, max_resize: float = MAX_RESIZE,
                 target_random_mask: bool = True):
        for name, rate in (("prompt_dropout", prompt_dropout), ("full_mask_rate", full_mask_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {rate}")
        if max_resize < 1.0:
            raise ValueError(f"max_resize must be >= 1, got {max_resize}")
        self.scene, self.size, self.prompt = scene, size, prompt
        self.prompt_dropout, self.full_mask_rate, self.max_resize = prompt_dropout, full_mask_rate, max_resize
        self.target_random_mask = target_random_mask
        # Decoded once: a scene is at most six photos, read at every one of ~2,000 epochs otherwise.
        self.references = [_load(load_rgb, path, "reference") for path in scene.references]
        target, self.hole = load_target(scene)
        # The unknown pixels never reach training: a target.png may hold the ground truth there (RealBench
        # ships whole photos), which the loss weight alone would not hide from the VAE latent and x_t.
        self.target = np.where(self.hole[..., None], np.uint8(HIDDEN_VALUE), target)
        self.ids = [f"{p.parent.name}/{p.name}" for p in scene.images]

    def __len__(self) -> int:
        return len(self.references) + 1

    def __getitem__(self, index: int) -> dict:
        return self.item(index, np.random.default_rng(int(torch.randint(0, 2**62, ()).item())))

    def item(self, index: int, rng: np.random.Generator) -> dict:
        """Item ``index`` drawn with ``rng``: 1. joint resize + crop, 2. input mask, 3. prompt."""
        is_target = index == len(self) - 1
        image = self.target if is_target else self.references[index]
        image, hole, _ = random_resized_crop(image, self.hole if is_target else None, rng, self.size,
                                             self.max_resize)
        known = ~hole if is_target else np.ones((self.size, self.size), dtype=bool)  # where the loss looks
        if is_target:
            mask = self.random_mask(rng) | hole if self.target_random_mask else hole
        else:
            mask = self.random_mask(rng)
        prompt = "" if rng.random() < self.prompt_dropout else self.prompt
        return {"id": self.ids[index], "image": rgb_to_tensor(image), "mask": mask_to_tensor(mask),
                "loss_weight": mask_to_tensor(known), "prompt": prompt, "is_target": is_target}

    def preview_item(self) -> dict:
        """The target as inference sees it (:func:`model_inputs`) with its real mask and the prompt, for the
        training previews: {"id", "image", "mask", "prompt"}."""
        image, mask = model_inputs(self.target, self.hole, self.size)
        return {"id": self.ids[-1], "image": image, "mask": mask, "prompt": self.prompt}

    def random_mask(self, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.full_mask_rate:
            return np.ones((self.size, self.size), dtype=bool)
        return random_box_mask(self.size, rng)


def realfill_training_set(scene: str | Path | Scene, *, size: int = 512, prompt: str = PROMPT,
                          prompt_dropout: float = PROMPT_DROPOUT, full_mask_rate: float = FULL_MASK_RATE,
                          max_resize: float = MAX_RESIZE, target_random_mask: bool = True) -> RealFillTrainingSet:
    """The training set of one scene (a folder in the RealBench layout, or a ``Scene``), as a config's
    ``data.target``; see the module docstring for the recipe and where it differs from the reference."""
    scene = scene if isinstance(scene, Scene) else read_scene(scene)
    return RealFillTrainingSet(scene, size=size, prompt=prompt, prompt_dropout=prompt_dropout,
                               full_mask_rate=full_mask_rate, max_resize=max_resize,
                               target_random_mask=target_random_mask)
