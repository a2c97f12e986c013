"""Batch evaluation on test pairs (METHOD 1.14): fill every pair, write the images, score them.

Output folder::

    results/<id>.png      the filled target at test_size (what the metrics see)
    grids/<id>.jpg        reference | masked target | result | ground truth
                          (named <id>_RANDOM-WEIGHTS.jpg when the model has random weights)
    metrics.csv           one row per pair, rewritten after every batch
    summary.json          means, settings, seed, versions

Pair i (in sorted folder order) is sampled with seed ``seed + i``, so its result does not depend on the
batch size. A pair whose mask is empty is copied unchanged and left out of the metrics.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import leftrefill
from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.data.test_pairs import TestPairDataset
from leftrefill.images import tensor_to_rgb
from leftrefill.metrics import InpaintingMetrics
from leftrefill.pipeline import RANDOM_WEIGHTS_WARNING, LeftRefillPipeline

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "open_clip_torch", "lpips", "torchmetrics", "scikit-image", "numpy",
                      "opencv-python-headless", "pillow")


def evaluate(pipe: LeftRefillPipeline, dataset: TestPairDataset, output_path: str | Path, metrics: InpaintingMetrics,
             *, batch_size: int = 1, steps: int = 50, cfg: float = 2.5, eta: float = 1.0, seed: int = 42,
             settings: dict | None = None, progress: bool = True) -> dict:
    """Run the whole evaluation and return the summary (also written to ``summary.json``)."""
    output_path = Path(output_path)
    grid_suffix = "_RANDOM-WEIGHTS" if pipe.random_weights else ""
    rows: list[dict] = []
    problems: dict[str, list[str]] = {"empty_masks": [], "non_finite_outputs": []}
    resized_masks, started = 0, time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    bar = tqdm(total=len(dataset), desc="pairs", unit="pair", disable=not progress)
    for batch in loader:
        # 1. sample: one generator per pair, so pair i always gets seed + i
        generators = [torch.Generator().manual_seed(seed + int(i)) for i in batch["index"]]
        filled = pipe.inpaint(batch["reference"], batch["target"], batch["mask"], steps=steps, cfg=cfg, eta=eta,
                              generator=generators).cpu()
        empty = batch["mask"].flatten(1).amax(dim=1) < 0.5
        filled[empty] = batch["target"][empty]
        broken = ~torch.isfinite(filled).flatten(1).all(dim=1)  # e.g. an fp16 overflow
        filled = filled.nan_to_num()  # NaN -> 0, inf -> the largest float: saved as images, never scored
        # 2. score: [0, 1] images, prediction not clamped (as the original)
        scores = metrics((filled + 1) / 2, (batch["target"] + 1) / 2)
        # 3. write images and rows
        for j, pair_id in enumerate(batch["id"]):
            _save_images(output_path, pair_id, grid_suffix, batch, filled, j)
            row = {"id": pair_id, "seed": seed + int(batch["index"][j])}
            unscored = bool(empty[j] or broken[j])
            row.update({name: math.nan if unscored else float(scores[name][j]) for name in metrics.names})
            rows.append(row)
            if empty[j]:
                problems["empty_masks"].append(pair_id)
                log.warning("pair %s: the mask is empty; the target was copied unchanged and is left out of the "
                            "metrics", pair_id)
            elif broken[j]:
                problems["non_finite_outputs"].append(pair_id)
                log.error("pair %s: the result holds NaN or infinite values and is left out of the metrics; "
                          "with --precision fp16 try bf16 or fp32", pair_id)
        resized_masks += _note_resized_masks(batch, resized_masks == 0)
        _write_csv(output_path / "metrics.csv", rows, metrics.names)
        bar.update(len(batch["id"]))
        bar.set_postfix(_means(rows, metrics.names), refresh=False)
    bar.close()
    summary = _summary(pipe, rows, metrics.names, seed, resized_masks, problems, time.perf_counter() - started,
                       settings or {})
    write_text_atomic(output_path / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _save_images(output_path: Path, pair_id: str, grid_suffix: str, batch: dict, filled: torch.Tensor, j: int) -> None:
    result = tensor_to_rgb(filled[j])
    masked_target = batch["target"][j] * (1 - batch["mask"][j])  # holes mid-gray, as the model sees them
    columns = [tensor_to_rgb(batch["reference"][j]), tensor_to_rgb(masked_target), result,
               tensor_to_rgb(batch["target"][j])]
    _save(output_path / "results" / f"{pair_id}.png", result)
    _save(output_path / "grids" / f"{pair_id}{grid_suffix}.jpg", np.concatenate(columns, axis=1))


def _save(path: Path, image: np.ndarray) -> None:
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, **options)


def _note_resized_masks(batch: dict, first: bool) -> int:
    resized = [pair_id for pair_id, flag in zip(batch["id"], batch["mask_resized"]) if flag]
    if resized and first:
        log.warning("pair %s: the mask has another size than the target image; masks are resized to test_size "
                    "with nearest (counted in summary.json as masks_resized)", resized[0])
    return len(resized)


def _write_csv(path: Path, rows: list[dict], names: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "seed", *names], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())


def _means(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Mean of each metric over the scored pairs (NaN rows, i.e. empty masks, left out)."""
    means = {}
    for name in names:
        values = [row[name] for row in rows if not math.isnan(row[name])]
        means[name] = round(float(np.mean(values)), 6) if values else math.nan
    return means


def _summary(pipe, rows, names, seed, resized_masks, problems, seconds, settings) -> dict:
    unscored = len(problems["empty_masks"]) + len(problems["non_finite_outputs"])
    summary = {
        "random_weights": pipe.random_weights,
        **({"warning": RANDOM_WEIGHTS_WARNING} if pipe.random_weights else {}),
        "metrics": _means(rows, names),
        "num_pairs": len(rows),
        "num_scored": len(rows) - unscored,
        **problems,
        "masks_resized": resized_masks,
        "seed": seed,
        "seed_rule": "pair i (sorted folder order) is sampled with seed + i",
        "settings": settings,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "seconds": round(seconds, 2),
        "versions": _versions(),
    }
    return summary


def _versions() -> dict[str, str]:
    versions = {"leftrefill": leftrefill.__version__, "python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
