"""Filling a RealFill scene and scoring it: what test_realfill.py (and the demo) run.

One scene (``fill_scene``), into ``<output>/``::

    samples/<k>.png        every sample k (seed + k), at the target's own size, soft-composited
    scores.csv             sample, seed, verified matches (sum and per reference), rank
    top/<rank>_<k>.png     the best ``keep`` samples by matches (or the first ``keep`` without ranking)
    grid.png               labelled: the target as the model sees it, then the kept samples with their scores

A benchmark (``evaluate_benchmark``): every scene of a folder that has a ground truth, each with its own
model directory ``<model_root>/<scene name>``, filled as above into ``<output>/<scene name>/``, then scored
against ``target/gt.png`` with leftrefill.realbench (masked and whole-image PSNR / SSIM / LPIPS, and
DreamSim / DINO / CLIP when their weights are given), over all samples and over the top-k after selection
(filter rates 0 / 25 / 50 / 75 %)::

    metrics.csv            scene, sample, rank, every metric
    summary.json           per scene and over scenes: {"all": {...}, "top": {"0": ..., "75": ...}}, settings

Under torchrun the ranks share out the scenes (leftrefill.sharding) and rank 0 writes these two files, the
ones one process writes, with ``world_size`` in summary.json.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.data.realfill import Scene, load_target, read_scene
from leftrefill.grid import labelled_row
from leftrefill.images import load_rgb
from leftrefill.paths import locate
from leftrefill.realbench import RealBenchMetrics, summarize_benchmark, summarize_scene
from leftrefill.realfill_pipeline import RealFillPipeline
from leftrefill.selection import CandidateScore, rank_by_matches
from leftrefill.sharding import RankFailedError, Shard

log = logging.getLogger(__name__)

MAX_GRID_SAMPLES = 8


@dataclass(frozen=True)
class SceneResult:
    """The samples of one scene (RGB uint8 (H, W, 3), sample order), the ranking (sample indices, best
    first) and the match scores (None without ranking)."""

    samples: list[np.ndarray]
    ranking: list[int]
    scores: list[CandidateScore] | None


def fill_scene(pipe: RealFillPipeline, scene: Scene | str | Path, output: str | Path, *, num_samples: int = 16,
               keep: int = 4, seed: int = 0, batch_size: int = 4, sampling: dict | None = None, rank: bool = True,
               match_method: str | None = None, match_region: str = "hole", device: str = "cpu",
               progress: Callable[[str, int, int], None] | None = None) -> SceneResult:
    """Sample ``num_samples`` fills of the scene's target, rank them by verified matches with its references
    (``rank``), write them (module docstring). ``sampling``: sampler, steps, cfg, eta for the pipeline.
    ``progress(stage, done, total)``, stage "sampling" or "matching" (default: tqdm bars)."""
    scene = scene if isinstance(scene, Scene) else read_scene(scene)
    output = Path(output)
    if not 1 <= keep <= num_samples:
        raise ValueError(f"keep must be in [1, num_samples {num_samples}], got {keep}")
    report = progress or _TqdmProgress(scene.name)
    target, hole = load_target(scene)
    _remove_earlier_results(output)
    # 1. samples
    report("sampling", 0, num_samples)
    samples = pipe(target, hole, num_samples=num_samples, seed=seed, batch_size=batch_size,
                   on_batch=lambda done, total: report("sampling", done, total), **(sampling or {}))
    for k, sample in enumerate(samples):
        _save_png(output / "samples" / f"{k}.png", sample)
    # 2. ranking
    scores = None
    if rank:
        references = [load_rgb(path, "reference") for path in scene.references]
        options = {"method": match_method} if match_method else {}
        report("matching", 0, num_samples)
        scores = rank_by_matches(samples, references, hole, region=match_region, device=device,
                                 on_candidate=lambda done, total: report("matching", done, total), **options)
        ranking = [score.index for score in scores]
    else:
        ranking = list(range(num_samples))
    # 3. scores, top-k, grid
    _write_scores(output / "scores.csv", scene, ranking, scores, seed)
    for position, k in enumerate(ranking[:keep]):
        _save_png(output / "top" / f"{position + 1}_{k}.png", samples[k])
    _save_png(output / "grid.png", _grid(target, hole, samples, ranking[:min(keep, MAX_GRID_SAMPLES)], scores))
    return SceneResult(samples, ranking, scores)


def evaluate_benchmark(benchmark_root: str | Path, model_root: str | Path, output: str | Path,
                       metrics: RealBenchMetrics, load_pipeline: Callable[[Path], RealFillPipeline], *,
                       filter_rates: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75), settings: dict | None = None,
                       shard: Shard = Shard(), **fill_options) -> dict:
    """Fill and score every scene of ``benchmark_root`` that has ``target/gt.png`` (module docstring); the
    model of scene s is ``load_pipeline(model_root / s)``. Returns the summary written to summary.json.

    ``shard``: this process's part of a run on several ranks (leftrefill.sharding): it fills and scores its
    scenes, the ranks exchange their rows after each scene, and rank 0 writes metrics.csv and summary.json as
    one process would, summary.json with ``world_size`` added. A failure on any rank stops every rank and
    nothing is written, as in one process: the failing rank raises its error, the others RankFailedError."""
    benchmark_root, model_root, output = Path(benchmark_root), locate(model_root, "checkpoints"), Path(output)
    scenes = benchmark_scenes(benchmark_root)
    missing = [scene.name for scene in scenes if not (model_root / scene.name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--model_path {model_root}: no model directory for scene(s) {', '.join(missing)} "
                                f"(expected {model_root}/<scene name>, as train_realfill.py --output_dir)")
    rows, per_scene = [], {}
    for indices in shard.steps(len(scenes)):  # a scene per rank and step; rank order is the scenes' order
        part, error = ([], {}), None
        try:
            for index in indices:
                _fill_and_score(scenes[index], load_pipeline(model_root / scenes[index].name), output, metrics,
                                filter_rates, fill_options, *part)
        except BaseException as err:
            error = err
        failure = None if error is None else f"scene {scenes[index].name}: {type(error).__name__}: {error}"
        parts, failures = shard.exchange(part, failure)
        for scene_rows, scene_summaries in parts:
            rows += scene_rows
            per_scene |= scene_summaries
        if failures:
            raise error or RankFailedError(min(failures), failures[min(failures)])
    summary = {"benchmark": summarize_benchmark(per_scene), "scenes": per_scene, "metrics": list(metrics.names),
               "skipped_metrics": dict(metrics.skipped), "settings": settings or {}, **shard.summary()}
    if shard.is_main:
        _write_metrics(output / "metrics.csv", rows, list(metrics.names))
        write_text_atomic(output / "summary.json", json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return summary


def _fill_and_score(scene: Scene, pipe: RealFillPipeline, output: Path, metrics: RealBenchMetrics,
                    filter_rates: tuple[float, ...], fill_options: dict, rows: list[dict], per_scene: dict) -> None:
    """Fill ``scene`` into ``output/<scene name>/`` and score its samples; its metrics.csv rows go to ``rows``,
    its summary to ``per_scene``."""
    result = fill_scene(pipe, scene, output / scene.name, **fill_options)
    scores = score_samples(metrics, scene, result.samples, metrics.device)
    per_scene[scene.name] = summarize_scene(scores, result.ranking, filter_rates)
    rank_of = {k: position + 1 for position, k in enumerate(result.ranking)}
    rows += [{"scene": scene.name, "sample": k, "rank": rank_of[k], **{name: values[k] for name, values in
                                                                       scores.items()}}
             for k in range(len(result.samples))]
    log.info("%s: %s", scene.name, ", ".join(f"{name} {value:.4f}" for name, value in
                                            per_scene[scene.name]["all"].items()))


def _json_safe(value):
    """``value`` with every non-finite float as None (strict JSON; a PSNR of identical images is infinite)."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _remove_earlier_results(output: Path) -> None:
    """An earlier run's samples and top-k (file names this module writes): a new run's must not mix with them."""
    for pattern in ("samples/*.png", "top/*_*.png"):
        for path in output.glob(pattern):
            if re.fullmatch(r"\d+(_\d+)?\.png", path.name):
                path.unlink()


def benchmark_scenes(root: Path) -> list[Scene]:
    """The scenes under ``root`` (sorted by name) that have a ground truth; each one checked (SceneError)."""
    if not root.is_dir():
        raise FileNotFoundError(f"--benchmark_root {root}: no such directory")
    folders = sorted(folder for folder in root.iterdir() if folder.is_dir())
    scenes = [read_scene(folder) for folder in folders if (folder / "target" / "gt.png").is_file()]
    skipped = [folder.name for folder in folders if not (folder / "target" / "gt.png").is_file()]
    if skipped:
        log.warning("--benchmark_root %s: %d folder(s) without target/gt.png are not scored: %s", root, len(skipped),
                    ", ".join(skipped))
    if not scenes:
        raise FileNotFoundError(f"--benchmark_root {root}: no scene with target/gt.png in it (RealBench layout)")
    return scenes


def score_samples(metrics: RealBenchMetrics, scene: Scene, samples: list[np.ndarray],
                  device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Every metric of every sample against the scene's ground truth, at the target's own size."""
    _, hole = load_target(scene)
    gt = _to_unit(load_rgb(scene.gt, "ground truth"), device)
    mask = torch.from_numpy(hole)[None, None].float().to(device)
    scores: dict[str, list[float]] = {name: [] for name in metrics.names}
    for sample in samples:  # one at a time: the feature networks at full size hold a lot of memory
        for name, value in metrics(_to_unit(sample, device), gt, mask).items():
            scores[name].append(float(value[0]))
    return scores


def _to_unit(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).to(device)  # a writable copy


class _TqdmProgress:
    def __init__(self, name: str):
        self.name, self.bars = name, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"{self.name}: {stage}", unit="sample")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def _grid(target: np.ndarray, hole: np.ndarray, samples: list[np.ndarray], shown: list[int],
          scores: list[CandidateScore] | None) -> np.ndarray:
    matches = {score.index: score.matches for score in scores} if scores else {}
    seen = np.where(hole[..., None], np.uint8(128), target)  # the hole mid-gray, as the model sees it
    labels = ["target (hole gray)"] + [f"#{position + 1}: sample {k}" + (f", {matches[k]} matches" if scores else "")
                                       for position, k in enumerate(shown)]
    return labelled_row([seen, *[samples[k] for k in shown]], labels)


def _write_scores(path: Path, scene: Scene, ranking: list[int], scores: list[CandidateScore] | None,
                  seed: int) -> None:
    by_index = {score.index: score for score in scores} if scores else {}
    references = [p.name for p in scene.references]
    rows = []
    for position, k in enumerate(ranking):
        score = by_index.get(k)
        rows.append({"sample": k, "seed": seed + k, "rank": position + 1 if scores else "",
                     "matches": score.matches if score else "",
                     **{f"matches_{name}": (score.per_reference[i] if score else "") for i, name in
                        enumerate(references)}})
    rows.sort(key=lambda row: row["sample"])
    _write_csv(path, rows, list(rows[0]))


def _write_metrics(path: Path, rows: list[dict], names: list[str]) -> None:
    _write_csv(path, [{**row, **{name: f"{row[name]:.6f}" for name in names}} for row in rows],
               ["scene", "sample", "rank", *names])


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
