"""Batch evaluation on test pairs: sample every pair, write the images, score them. One loop for every
task; a task object says how a batch is sampled, what the grid shows and which extra images are written:

* :class:`InpaintingTask` (METHOD 1.14, test_inpainting.py): the hard-blended fill of the mask;
* :class:`NVSTask` (METHOD 2.5, test_nvs.py): the whole decoded target view, nothing blended;
* :class:`MultiViewInpaintingTask` (METHOD 3.2, test_multiview_inpainting.py): inpainting from all of a
  target's references at once, scored on the target (view 0) as inpainting.

Output folder::

    results/<id>.png           the result at test_size (what the metrics see)
    results_fullsize/<id>.png  inpainting only: the filled target at the target file's own size: the result
                               resized and pasted through the user's mask, as ``LeftRefillPipeline.__call__``
                               does, so every pixel outside the mask is the target file's, exactly
    grids/<id>.jpg             labelled panels: reference(s) | the target as the model saw it (mask mid-gray) |
                               result | ground truth (named <id>_RANDOM-WEIGHTS.jpg when the model has random
                               weights)
    metrics.csv                one row per pair, rewritten after every batch
    summary.json               status, task, means, settings, seed, loaded files, versions

With a :class:`MatchSelection` (inpainting only; test_inpainting.py or test_multiview_inpainting.py
--num_samples K --select_by_matches) each pair is sampled K times and the candidate whose filled region has
the most verified matches with the pair's reference(s) is the pair's result above; beside it::

    candidates/<id>/<k>.png    candidate k at the target file's own size (as results_fullsize/, which holds
                               the kept one bit for bit)
    selection.csv              one row per candidate: id, sample, seed, rank (1 = kept), matches,
                               matches_per_reference, its metrics, note
    metrics.csv                gains the columns ``sample`` (the kept candidate) and ``matches``

Pair i (in the dataset's order) is sampled with seed ``seed + i``, so its result does not depend on the
batch size; with K candidates per pair, candidate k of pair i uses ``seed + i * K + k`` (K = 1: seed + i).
A pair whose mask is empty is copied unchanged and left out of the metrics, as is a result
holding NaN or infinite values. Inpainting: the model sees the mask resized to test_size with nearest (the
protocol); hole pixels lost by that resize are filled in the full-size result with the resized model output.

Values that cannot be computed are never written as ``nan``:

- metrics.csv columns are ``id, seed, <metrics>, note``; a metric cell is empty when the pair was not
  scored or its value is not finite, and ``note`` says why (empty otherwise).
- summary.json is strict JSON (``allow_nan=False``): a mean that cannot be computed is ``null`` and
  ``metrics_null_reason`` gives the reason per metric.
- ``status`` is ``"complete"``, or ``"failed"`` when the run stopped early (an unreadable file, out of
  memory, Ctrl-C): summary.json is then still written, with ``failed_pair``, ``error`` (and
  ``failed_batch`` when the failing batch held several pairs), and the error is raised again.

Under torchrun each rank evaluates whole batches of the one-process run (leftrefill.sharding) and writes
their images; rank 0 writes metrics.csv, selection.csv and summary.json after every step, the files one
process writes, with ``world_size`` in summary.json (and ``failed_rank`` when a rank failed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from tqdm.auto import tqdm

import leftrefill
from leftrefill.arguments import item_generators
from leftrefill.atomic import atomic_path, write_text_atomic
from leftrefill.data.multiview import MultiViewTestDataset
from leftrefill.data.objaverse_nvs import NVSTestPairs
from leftrefill.data.test_pairs import TestPairDataset
from leftrefill.grid import (INPAINTING_LABELS, NVS_LABELS, inpainting_panels, labelled_row, model_view_panels,
                             multiview_labels, multiview_panels)
from leftrefill.images import load_rgb, tensor_to_rgb
from leftrefill.metrics import InpaintingMetrics
from leftrefill.multiview_pipeline import MultiViewPipeline
from leftrefill.nvs_pipeline import NVSPipeline
from leftrefill.pipeline import RANDOM_WEIGHTS_WARNING, LeftRefillPipeline, paste_filled
from leftrefill.prep.matching import DEFAULT_METHOD, check_options
from leftrefill.selection import CandidateScore, rank_by_matches
from leftrefill.sharding import RankFailedError, Shard

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "open_clip_torch", "lpips", "torchmetrics", "scikit-image", "numpy",
                      "opencv-python-headless", "pillow")
SELECTION_REGION = "hole"  # only matches in the filled region rank: the known pixels are the same in every candidate


@dataclass(frozen=True)
class MatchSelection:
    """Best of ``num_samples`` candidates per pair by correspondence, RealFill's seed selection (METHOD 5.1,
    leftrefill.selection): each candidate at the target's own size is matched with the pair's reference
    (``method``, images downscaled to ``max_side``) and the one with the most verified matches in its filled
    region is kept; ties keep the sampling order, and a candidate holding NaN or inf is never kept over a
    finite one. Every candidate is written and scored (selection.csv), so one run gives the kept result, the
    mean over candidates (what one unselected sample scores) and the best candidate by each metric."""

    num_samples: int
    method: str = DEFAULT_METHOD
    max_side: int = 512  # leftrefill.selection's default: the measured ranking on the bundled scene

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise ValueError(f"num_samples must be an integer of at least 2 to select among candidates, got "
                             f"{self.num_samples!r}")

    def summary(self) -> dict:
        return {"by": "verified matches with the reference", "method": self.method, "max_side": self.max_side,
                "region": SELECTION_REGION}


class EvaluationTask:
    """What differs between evaluations; the loop (:func:`evaluate`) does the rest. Batches are the
    dataset's items collated: at least ``id``, ``index``, ``reference``, ``target`` (the ground truth) and
    ``mask``, (B, 3 or 1, S, S), and ``mask_resized``."""

    name: str
    grid_labels: tuple[str, ...]  # one per panel
    skips_empty_masks = True  # an empty mask: the target copied unchanged and not scored (inpainting: nothing to fill)
    seed_rule: str  # for summary.json
    candidate_seed_rule: str | None = None  # the rule with several candidates per pair; None: no selection
    resized_masks_warning: str  # logged once, for the first pair whose mask file was resized

    def __init__(self, dataset):
        self.dataset = dataset

    def item_id(self, index: int) -> str:
        """The id of item ``index`` without reading its images (named in summary.json when reading fails)."""
        return self.dataset.pairs[index].id

    def sample(self, pipe: LeftRefillPipeline, batch: dict, **sampling) -> torch.Tensor:
        """The batch's results (B, 3, S, S) in [-1, 1], not clamped; ``sampling``: the pipeline's options,
        ``generator`` (one per pair) and ``progress`` included."""
        raise NotImplementedError

    def panels(self, batch: dict, j: int, result: torch.Tensor) -> list[np.ndarray]:
        """Pair j's grid panels (RGB uint8), one per ``grid_labels``."""
        raise NotImplementedError

    def extra_images(self, batch: dict, j: int, result: np.ndarray) -> dict[str, np.ndarray]:
        """Images written beside results/, by folder name: {} unless the task has some."""
        return {}

    def selection_views(self, batch: dict, j: int, results: list[np.ndarray]
                        ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Pair j's candidates ``results`` (RGB uint8 at test_size) as :func:`rank_by_matches` compares them:
        (candidates, references, hole). Only tasks with a ``candidate_seed_rule`` have one."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Task-specific entries of summary.json."""
        return {"task": self.name}


class InpaintingTask(EvaluationTask):
    """Reference-guided inpainting (METHOD 1.14): the fill blended into the target outside the mask, and
    also pasted into the target file at its own size (results_fullsize/)."""

    name = "inpainting"
    grid_labels = INPAINTING_LABELS
    seed_rule = "pair i (sorted folder order) is sampled with seed + i"
    candidate_seed_rule = "candidate k of pair i (sorted folder order) is sampled with seed + i * num_samples + k"
    resized_masks_warning = ("the mask has another size than the target image; masks are resized to test_size "
                             "with nearest (counted in summary.json as masks_resized)")
    dataset: TestPairDataset

    def sample(self, pipe: LeftRefillPipeline, batch: dict, **sampling) -> torch.Tensor:
        return pipe.inpaint(batch["reference"], batch["target"], batch["mask"], **sampling)

    def panels(self, batch: dict, j: int, result: torch.Tensor) -> list[np.ndarray]:
        return inpainting_panels(batch["reference"][j], batch["target"][j], batch["mask"][j], result)

    def extra_images(self, batch: dict, j: int, result: np.ndarray) -> dict[str, np.ndarray]:
        target, hole = self.dataset.full_size(int(batch["index"][j]))  # read again: batches hold test_size only
        return {"results_fullsize": paste_filled(result, target, hole)}

    def selection_views(self, batch: dict, j: int, results: list[np.ndarray]
                        ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        # Each candidate as results_fullsize/ would hold it (the user's mask, the target's own size), against
        # the reference file (source.jpg) at its own size.
        index = int(batch["index"][j])
        target, hole = self.dataset.full_size(index)
        return [paste_filled(result, target, hole) for result in results], self.reference_images(index), hole

    def reference_images(self, index: int) -> list[np.ndarray]:
        """Item ``index``'s reference files at their own size, RGB uint8 (H, W, 3)."""
        return [load_rgb(self.dataset.pairs[index].reference, "reference")]


class MultiViewInpaintingTask(InpaintingTask):
    """Multi-view reference-guided inpainting (METHOD 3.2; ``MultiViewPipeline.inpaint``): the target filled
    from all its references at once, then blended, written and scored as :class:`InpaintingTask`; the grid
    shows every reference. Items: leftrefill.data.multiview.MultiViewTestDataset's. ``view_num``: the
    model's number of views, for summary.json (None: the dataset's)."""

    name = "multiview_inpainting"
    seed_rule = "item i (sorted folder order) is sampled with seed + i"
    candidate_seed_rule = "candidate k of item i (sorted folder order) is sampled with seed + i * num_samples + k"
    dataset: MultiViewTestDataset

    def __init__(self, dataset: MultiViewTestDataset, view_num: int | None = None):
        super().__init__(dataset)
        self.view_num = dataset.view_num if view_num is None else view_num
        self.grid_labels = multiview_labels(dataset.view_num - 1)

    def item_id(self, index: int) -> str:
        return self.dataset.items[index].id

    def sample(self, pipe: MultiViewPipeline, batch: dict, **sampling) -> torch.Tensor:
        return pipe.inpaint(batch["references"], batch["target"], batch["mask"], **sampling)

    def panels(self, batch: dict, j: int, result: torch.Tensor) -> list[np.ndarray]:
        return multiview_panels(batch["references"][j], batch["target"][j], batch["mask"][j], result)

    def reference_images(self, index: int) -> list[np.ndarray]:
        return [load_rgb(path, f"reference {k}") for k, path in enumerate(self.dataset.items[index].references)]

    def summary(self) -> dict:
        return {"task": self.name, "multiview": {
            "view_num": self.view_num, "num_references": self.dataset.view_num - 1,
            "references": {item.id: [str(path) for path in item.references] for item in self.dataset.items}}}


class NVSTask(EvaluationTask):
    """Novel view synthesis (METHOD 2.5): the whole decoded target half (``NVSPipeline.synthesize``), no
    blending, scored against the ground-truth view. The model sees ``target_visible`` outside the mask
    (white in mask mode "reference": the target is unknown)."""

    name = "nvs"
    grid_labels = NVS_LABELS
    skips_empty_masks = False  # the whole generated view is the result and is always scored (METHOD 2.5)
    seed_rule = "object i (object list order, else sorted folder order) is sampled with seed + i"
    resized_masks_warning = ("a fixed mask file has another size than test_size; masks are resized with nearest "
                             "(counted in summary.json as masks_resized)")
    dataset: NVSTestPairs

    def sample(self, pipe: NVSPipeline, batch: dict, **sampling) -> torch.Tensor:
        return pipe.synthesize(batch["reference"], batch["pose"], batch["mask"], batch["target_visible"],
                               **sampling)

    def panels(self, batch: dict, j: int, result: torch.Tensor) -> list[np.ndarray]:
        return model_view_panels(batch["reference"][j], batch["target_visible"][j], batch["mask"][j], result,
                                 batch["target"][j])

    def summary(self) -> dict:
        data = self.dataset
        return {"task": self.name, "nvs": {
            "views_root": str(data.views_root), "reference_view": data.reference_view,
            "target_view": data.target_view, "mask_mode": data.mask_mode,
            "mask_path": None if data.mask_path is None else str(data.mask_path),
            "metric_region": "the whole generated view, not blended with the ground truth"}}


@dataclass
class _Run:
    """What a run has produced so far: enough to write summary.json at any moment."""
    total: int
    rows: list[dict] = field(default_factory=list)
    candidate_rows: list[dict] = field(default_factory=list)  # selection.csv's, with a MatchSelection
    empty_masks: list[str] = field(default_factory=list)
    non_finite_outputs: list[str] = field(default_factory=list)
    masks_resized: int = 0
    in_hand: list[str] = field(default_factory=list)  # ids of the pairs being loaded or filled

    def extend(self, parts: list[_Run]) -> None:
        """Add the pairs of one step, every rank's part in rank order (leftrefill.sharding: the pairs' order)."""
        for part in parts:
            self.rows += part.rows
            self.candidate_rows += part.candidate_rows
            self.empty_masks += part.empty_masks
            self.non_finite_outputs += part.non_finite_outputs
            self.masks_resized += part.masks_resized


@dataclass
class _Candidates:
    """Candidate k of every pair of a batch: one sampling pass."""
    filled: torch.Tensor  # (B, 3, S, S) in [-1, 1], NaN -> 0 and inf -> the largest float
    broken: torch.Tensor  # (B,) bool: the sampled result held NaN or inf (never scored)
    scores: dict[str, torch.Tensor]  # metric name -> (B,)
    seeds: list[int]  # each pair's generator seed


def evaluate(pipe: LeftRefillPipeline, task: EvaluationTask, output_path: str | Path, metrics: InpaintingMetrics,
             *, batch_size: int = 1, seed: int = 42, sampling: dict | None = None, settings: dict | None = None,
             progress: bool = True, selection: MatchSelection | None = None, shard: Shard = Shard()) -> dict:
    """Run the whole evaluation of ``task`` (its dataset) and return the summary (also in ``summary.json``).

    ``sampling``: keyword options of the task's pipeline method (sampler, steps, cfg, eta; inpainting's
    strength). ``progress`` shows a bar over the pairs and, under it, the sampler's steps of the batch in
    hand. ``selection``: sample each pair ``selection.num_samples`` times and keep the candidate with the
    most verified matches (:class:`MatchSelection`, inpainting only); a line per pair is logged. When a pair
    fails, summary.json is written with status "failed" naming it, and the error is raised again.

    ``shard``: this process's part of a run on several ranks (leftrefill.sharding). Each rank samples its
    batches and writes their images; after every batch the ranks exchange their rows, and rank 0 writes
    metrics.csv, selection.csv and summary.json as one process would, summary.json with ``world_size``
    added. A failure on any rank stops every rank after that step: summary.json says "failed" and names the
    rank (``failed_rank``), the failing rank raises its error and the others
    :class:`~leftrefill.sharding.RankFailedError`.
    """
    output_path = Path(output_path)
    if selection is not None:
        if task.candidate_seed_rule is None:
            raise ValueError(f"the {task.name} evaluation has no correspondence-based selection")
        check_options(selection.method, device=str(pipe.device))
    if shard.sharded:  # a rank that crashes takes rank 0 down too, maybe before it starts: no earlier summary may
        (output_path / "summary.json").unlink(missing_ok=True)  # remain (every rank is here before rank 0 writes)
    run, started = _Run(total=len(task.dataset)), time.perf_counter()
    progress = progress and shard.is_main  # rank 0's bar counts every rank's pairs
    sampling = {**(sampling or {}), "seed": seed, "progress": progress}
    error, failures, table_error = None, {}, None
    try:
        with tqdm(total=run.total, desc="pairs", unit="pair", disable=not progress) as bar:
            for indices in shard.steps(run.total, batch_size):
                part = _Run(total=run.total)
                # rank 0's failed table write stops the run at this exchange, every rank at the same point
                error = table_error or _evaluate_part(pipe, task, indices, output_path, metrics, part,
                                                      selection=selection, warn_resized=run.masks_resized == 0,
                                                      **sampling)
                parts, failures = shard.exchange(part, None if error is None else _failure(part, error))
                run.extend(parts)
                if shard.is_main and any(part.rows for part in parts):
                    table_error = _write_tables_or_error(output_path, run, metrics.names, selection, shard)
                bar.update(sum(len(part.rows) for part in parts))
                bar.set_postfix(_means(run.rows, metrics.names)[0], refresh=False)
                if failures:
                    break
            if table_error is not None and not failures:  # the last step's tables: no exchange is left to carry it
                raise table_error
    except BaseException as err:  # a table could not be written, or the exchange broke
        error, failures = err, {shard.rank: _failure(run, err)}
    summary = _summary(pipe, task, run, metrics, seed, selection, time.perf_counter() - started, settings,
                       _first_failure(failures, shard), shard)
    if failures:
        _stop(output_path, summary, error, shard)
    if shard.is_main:
        _write_summary(output_path, summary)
    return summary


def _write_tables_or_error(output_path: Path, run: _Run, metric_names: list[str], selection: MatchSelection | None,
                           shard: Shard) -> OSError | None:
    """Write the tables (rank 0). On several ranks a failure is returned, to stop every rank at the next
    exchange (raising here would leave the others waiting there); in one process it is raised."""
    try:
        _write_tables(output_path, run, metric_names, selection)
    except OSError as err:
        if not shard.sharded:
            raise
        return err
    return None


def _evaluate_part(pipe: LeftRefillPipeline, task: EvaluationTask, indices: list[int], output_path: Path,
                   metrics: InpaintingMetrics, part: _Run, **options) -> BaseException | None:
    """This rank's batch ``indices`` of a step (none: []) into ``part``; the error that stopped it, if any,
    raised again once every rank knows (:func:`_stop`)."""
    try:
        if indices:
            batch = _load_batch(task, indices, part)
            _evaluate_batch(pipe, task, batch, output_path, metrics, part, **options)
    except BaseException as err:
        return err
    return None


def _first_failure(failures: dict[int, dict], shard: Shard) -> dict | None:
    """summary.json's record of the failure of the lowest failing rank, which it names when there are several."""
    if not failures:
        return None
    rank = min(failures)
    return failures[rank] | ({"failed_rank": rank} if shard.sharded else {})


def _stop(output_path: Path, summary: dict, error: BaseException | None, shard: Shard) -> NoReturn:
    """Record a failed run (rank 0) and raise: this rank's own error, else RankFailedError."""
    error = error or RankFailedError(summary["failed_rank"], summary["error"])
    try:
        if shard.is_main:
            try:
                _write_summary(output_path, summary)
            except OSError as write_error:  # the output folder itself failed: say so, and raise the first error
                log.error("summary.json could not be written either: %s", write_error)
                raise error from None
            where = f" at pair {summary['failed_pair']}" if summary["failed_pair"] else ""
            where += f" on rank {summary['failed_rank']}" if shard.sharded else ""
            log.error("the run stopped%s; %s records it as failed", where, output_path / "summary.json")
    finally:
        shard.barrier()
    raise error


def _load_batch(task: EvaluationTask, indices: list[int], run: _Run) -> dict:
    """Load and collate the pairs ``indices``, keeping ``run.in_hand`` on the pair being read."""
    items = []
    for index in indices:
        run.in_hand = [task.item_id(index)]
        items.append(task.dataset[index])
    run.in_hand = [item["id"] for item in items]
    return default_collate(items)


def _evaluate_batch(pipe: LeftRefillPipeline, task: EvaluationTask, batch: dict, output_path: Path,
                    metrics: InpaintingMetrics, run: _Run, *, seed: int, selection: MatchSelection | None,
                    warn_resized: bool, **sampling) -> None:
    """Sample, score and write one batch and add its rows to ``run``; ``warn_resized``: log the first pair
    whose mask was resized (none was before)."""
    # 1. sample and score each candidate: candidate k of pair i draws from seed + i * count + k, whatever the batch
    count = selection.num_samples if selection else 1
    empty = batch["mask"].flatten(1).amax(dim=1) < 0.5
    empty &= task.skips_empty_masks
    candidates = [_sample_candidates(pipe, task, batch, metrics, empty, seed + k, count, sampling)
                  for k in range(count)]
    # 2. per pair: keep one candidate (ranked with a selection, else the only one), write images and rows
    for j, pair_id in enumerate(batch["id"]):
        run.in_hand = [pair_id]  # a failure from here on is this pair's
        best = None
        if selection:
            best = _select(pipe, task, batch, j, candidates, bool(empty[j]), selection, output_path, run)
        kept = candidates[best.index if best else 0]
        _save_images(output_path, task, batch, kept.filled[j], j, pipe.random_weights)
        row = _row(run, pair_id, kept.seeds[j], _pair_scores(kept, j, metrics.names), bool(empty[j]),
                   bool(kept.broken[j]))
        run.rows.append(row | ({"sample": best.index, "matches": best.matches} if best else {}))
    run.masks_resized += _note_resized_masks(batch, task, warn_resized)
    run.in_hand = []


def _sample_candidates(pipe: LeftRefillPipeline, task: EvaluationTask, batch: dict, metrics: InpaintingMetrics,
                       empty: torch.Tensor, seed: int, count: int, sampling: dict) -> _Candidates:
    """One candidate per pair, scored: pair i draws from a generator seeded ``seed + count * i`` (``seed`` is
    the run's seed + k for candidate k), so its result depends neither on the batch nor on the other pairs."""
    generators = item_generators(seed, batch["index"] * count)
    filled = task.sample(pipe, batch, generator=generators, **sampling).cpu()
    filled[empty] = batch["target"][empty]
    broken = ~torch.isfinite(filled).flatten(1).all(dim=1)  # e.g. an fp16 overflow
    filled = filled.nan_to_num()  # NaN -> 0, inf -> the largest float: saved as images, never scored
    # [0, 1] images, prediction not clamped (as the original)
    scores = metrics((filled + 1) / 2, (batch["target"] + 1) / 2)
    return _Candidates(filled, broken, scores, [g.initial_seed() for g in generators])


def _select(pipe: LeftRefillPipeline, task: EvaluationTask, batch: dict, j: int, candidates: list[_Candidates],
            empty: bool, selection: MatchSelection, output_path: Path, run: _Run) -> CandidateScore:
    """Rank pair j's candidates by verified matches, write each (candidates/<id>/<k>.png) and its row in
    ``run.candidate_rows``; the best, which the pair keeps."""
    pair_id, started = batch["id"][j], time.perf_counter()
    views, references, hole = task.selection_views(batch, j, [tensor_to_rgb(c.filled[j]) for c in candidates])
    if empty:  # the target copied unchanged: no filled region, every count would be 0
        ranking = [CandidateScore(k, 0, (0,) * len(references)) for k in range(len(candidates))]
    else:
        ranking = rank_by_matches(views, references, hole, region=SELECTION_REGION, method=selection.method,
                                  max_side=selection.max_side, device=str(pipe.device))
    ranking.sort(key=lambda score: bool(candidates[score.index].broken[j]))  # stable: finite ones first
    for k, view in enumerate(views):
        _save(output_path / "candidates" / pair_id / f"{k}.png", view)
    run.candidate_rows += _candidate_rows(pair_id, j, candidates, ranking, empty)
    log.info("pair %s: kept candidate %d of %d, %d verified matches in the filled region (by candidate: %s; "
             "%.1f s)", pair_id, ranking[0].index, len(candidates), ranking[0].matches,
             ", ".join(str(score.matches) for score in sorted(ranking, key=lambda score: score.index)),
             time.perf_counter() - started)
    return ranking[0]


def _candidate_rows(pair_id: str, j: int, candidates: list[_Candidates], ranking: list[CandidateScore],
                    empty: bool) -> list[dict]:
    """selection.csv's rows of pair j, in sampling order; rank 1 is the kept candidate."""
    rows = []
    for rank, score in sorted(enumerate(ranking, start=1), key=lambda item: item[1].index):
        candidate, broken = candidates[score.index], bool(candidates[score.index].broken[j])
        scores = _pair_scores(candidate, j, list(candidate.scores))
        rows.append({"id": pair_id, "sample": score.index, "seed": candidate.seeds[j], "rank": rank,
                     "matches": score.matches, "matches_per_reference": ";".join(map(str, score.per_reference)),
                     **_scored(scores, empty, broken), "note": _note(scores, empty, broken)})
    return rows


def _pair_scores(candidates: _Candidates, j: int, names: list[str]) -> dict[str, float]:
    return {name: float(candidates.scores[name][j]) for name in names}


def _row(run: _Run, pair_id: str, seed: int, scores: dict[str, float], empty: bool, broken: bool) -> dict:
    """One metrics.csv row; an unscored pair gets NaN scores and a note, and is logged and listed in ``run``."""
    if empty:
        run.empty_masks.append(pair_id)
        log.warning("pair %s: the mask is empty; the target was copied unchanged and is left out of the "
                    "metrics", pair_id)
    elif broken:
        run.non_finite_outputs.append(pair_id)
        log.error("pair %s: the result holds NaN or infinite values and is left out of the metrics; "
                  "with --precision fp16 try bf16 or fp32", pair_id)
    return {"id": pair_id, "seed": seed, **_scored(scores, empty, broken), "note": _note(scores, empty, broken)}


def _scored(scores: dict[str, float], empty: bool, broken: bool) -> dict[str, float]:
    """The scores as written: NaN (an empty cell) for a result that is not scored."""
    return {name: math.nan if empty or broken else value for name, value in scores.items()}


def _note(scores: dict[str, float], empty: bool, broken: bool) -> str:
    """Why a row's metric cells are empty; "" when none is."""
    if empty:
        return "empty mask: target copied unchanged, not scored"
    if broken:
        return "result holds NaN or infinite values, not scored"
    if not all(math.isfinite(value) for value in scores.values()):
        return "not finite: " + ", ".join(f"{name} {value}" for name, value in scores.items()
                                          if not math.isfinite(value))
    return ""


def _save_images(output_path: Path, task: EvaluationTask, batch: dict, filled: torch.Tensor, j: int,
                 random_weights: bool) -> None:
    """Write pair j's result (``filled``, (3, S, S) in [-1, 1]) at test_size, the task's extra images and
    the labelled grid."""
    pair_id = batch["id"][j]
    result = tensor_to_rgb(filled)
    grid_suffix = "_RANDOM-WEIGHTS" if random_weights else ""
    extra = task.extra_images(batch, j, result)  # first: a file failing here leaves no result behind
    _save(output_path / "results" / f"{pair_id}.png", result)
    for folder, image in extra.items():
        _save(output_path / folder / f"{pair_id}.png", image)
    panels = task.panels(batch, j, filled)
    _save(output_path / "grids" / f"{pair_id}{grid_suffix}.jpg", labelled_row(panels, task.grid_labels))


def _save(path: Path, image: np.ndarray) -> None:
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, **options)


def _note_resized_masks(batch: dict, task: EvaluationTask, first: bool) -> int:
    resized = [pair_id for pair_id, flag in zip(batch["id"], batch["mask_resized"]) if flag]
    if resized and first:
        log.warning("pair %s: %s", resized[0], task.resized_masks_warning)
    return len(resized)


def _write_tables(output_path: Path, run: _Run, names: list[str], selection: MatchSelection | None) -> None:
    """metrics.csv (and selection.csv): every pair done so far, rewritten after every batch."""
    columns = ["id", "sample", "seed", "matches"] if selection else ["id", "seed"]
    _write_csv(output_path / "metrics.csv", run.rows, [*columns, *names, "note"])
    if selection:
        _write_csv(output_path / "selection.csv", run.candidate_rows,
                   ["id", "sample", "seed", "rank", "matches", "matches_per_reference", *names, "note"])


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """metrics.csv, selection.csv: a metric that is NaN or infinite is an empty cell; the row's note says why."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (_csv_number(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def _csv_number(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else ""


def _means(rows: list[dict], names: list[str]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Mean of each metric over the scored pairs, None where it cannot be computed, and the reason for each None."""
    means, reasons = {}, {}
    for name in names:
        values = [row[name] for row in rows if not math.isnan(row[name])]
        mean = float(np.mean(values)) if values else math.nan
        means[name] = round(mean, 6) if math.isfinite(mean) else None
        if not values:
            reasons[name] = "no pair was scored"
        elif not math.isfinite(mean):
            reasons[name] = f"the mean is {mean}: a scored pair's {name} is not finite (see the notes in metrics.csv)"
    return means, reasons


def _summary(pipe: LeftRefillPipeline, task: EvaluationTask, run: _Run, metrics: InpaintingMetrics, seed: int,
             selection: MatchSelection | None, seconds: float, settings: dict | None, failure: dict | None = None,
             shard: Shard = Shard()) -> dict:
    """summary.json's content; ``failure`` (:func:`_failure`'s) makes it the record of a failed run."""
    means, null_reasons = _means(run.rows, metrics.names)
    return {
        "status": "complete" if failure is None else "failed",
        **(failure or {}),
        **task.summary(),
        "random_weights": pipe.random_weights,
        **({"warning": RANDOM_WEIGHTS_WARNING} if pipe.random_weights else {}),
        "metrics": means,
        **({"metrics_null_reason": null_reasons} if null_reasons else {}),
        "num_pairs": len(run.rows),
        "num_pairs_in_test_set": run.total,
        "num_scored": len(run.rows) - len(run.empty_masks) - len(run.non_finite_outputs),
        "empty_masks": run.empty_masks,
        "non_finite_outputs": run.non_finite_outputs,
        "masks_resized": run.masks_resized,
        "seed": seed,
        "seed_rule": task.candidate_seed_rule if selection else task.seed_rule,
        "num_samples": selection.num_samples if selection else 1,
        "selection": None if selection is None else {
            **selection.summary(),
            # what one unselected sample scores on average: the baseline the kept results are compared with
            "metrics_all_candidates": _means(run.candidate_rows, metrics.names)[0]},
        "settings": settings or {},
        "loaded": {**pipe.loaded, "lpips_weights": getattr(metrics.lpips_model, "weights_file", None)},
        "device": str(pipe.device),
        **shard.summary(),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "seconds": round(seconds, 2),
        "versions": _versions(),
    }


def _failure(run: _Run, error: BaseException) -> dict:
    """The pair that failed (the batch too when it held several) and the error, as one line of text."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    failure = {"failed_pair": run.in_hand[0] if run.in_hand else None, "error": text}
    if len(run.in_hand) > 1:
        failure["failed_batch"] = list(run.in_hand)
    return failure


def _write_summary(output_path: Path, summary: dict) -> None:
    """Strict JSON: allow_nan=False fails loudly rather than write NaN; objects such as paths become text."""
    write_text_atomic(output_path / "summary.json", json.dumps(summary, indent=2, allow_nan=False, default=str) + "\n")


def _versions() -> dict[str, str]:
    versions = {"leftrefill": leftrefill.__version__, "python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
