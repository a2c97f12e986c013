"""A tiny synthetic MegaDepth tree with LoFTR-style scene index files, for the data-preparation tests and
the worked example in docs/data.md:  python tests/synthetic_megadepth.py <root>

Scenes 0001 (6 images) and 0002 (4 images) under Undistorted_SfM/<scene>/images/; index files with the
keys and dtypes of LoFTR's (image_paths and pair_infos as object arrays, plus depth_paths, intrinsics and
poses). One listed image is missing on disk and one image path is None, as in the real index files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

# (i, j, overlap) per index file; the training range [0.4, 0.7] keeps the marked ones.
TRAIN_INDEX = {
    "0001_0.1_0.3.npz": [(0, 1, 0.25), (1, 2, 0.15)],
    "0001_0.3_0.5.npz": [(0, 2, 0.45), (0, 3, 0.42), (2, 3, 0.38), (1, 4, 0.5)],  # 0.45, 0.42, 0.5 kept
    "0001_0.5_0.7.npz": [(3, 4, 0.6), (4, 5, 0.7), (0, 5, 0.55), (2, 5, 0.65)],  # all kept; image 5 is missing
    "0002_0.3_0.5.npz": [(0, 1, 0.41), (1, 2, 0.44), (2, 3, 0.2), (0, 3, None)],  # (0, 3): a None path
}
TEST_INDEX = {"0002_val.npz": [(0, 1, 0.3), (1, 3, 0.9)]}
SCENES = {"0001": 6, "0002": 4}
MISSING = ("0001", 5)  # listed in the index, absent on disk


def image_path(scene: str, k: int) -> str:
    return f"Undistorted_SfM/{scene}/images/{k:04d}.jpg"


def write_index(path: Path, scene: str, pairs: list) -> None:
    count = SCENES[scene]
    image_paths = np.array([image_path(scene, k) for k in range(count)], dtype=object)
    infos = np.empty(len(pairs), dtype=object)
    for n, (i, j, overlap) in enumerate(pairs):
        if overlap is None:  # an entry whose image path is None in the index
            image_paths[j] = None
            overlap = 0.5
        infos[n] = ((i, j), np.float64(overlap), np.zeros((4, 2), dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image_paths=image_paths, pair_infos=infos,
             depth_paths=np.array([p.replace("images", "depths") if p else None for p in image_paths], dtype=object),
             intrinsics=np.tile(np.eye(3), (count, 1, 1)), poses=np.tile(np.eye(4), (count, 1, 1)))


def build(root: str | Path) -> Path:
    root = Path(root)
    rng = np.random.default_rng(0)
    for scene, count in SCENES.items():
        for k in range(count):
            if (scene, k) == MISSING:
                continue
            path = root / image_path(scene, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    for name, pairs in TRAIN_INDEX.items():
        write_index(root / "index" / "scene_info_0.1_0.7" / name, name[:4], pairs)
    for name, pairs in TEST_INDEX.items():
        write_index(root / "index" / "scene_info_val_1500" / name, name[:4], pairs)
    return root


if __name__ == "__main__":
    print(build(sys.argv[1]))
