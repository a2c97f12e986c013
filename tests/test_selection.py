"""Correspondence-based seed selection on the bundled Sacre-Coeur scene (real photos): the candidate whose hole
holds the true content ranks above ones filled with noise or a flat colour."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import ROOT
from leftrefill.data.realfill import load_target, read_scene
from leftrefill.images import load_rgb
from leftrefill.selection import rank_by_matches


@pytest.fixture(scope="module")
def scene():
    scene = read_scene(ROOT / "data" / "samples_realfill" / "sacre_coeur")
    target, hole = load_target(scene)
    return target, hole, [load_rgb(path) for path in scene.references]


def test_the_true_content_ranks_first_and_counts_only_the_filled_region(scene):
    target, hole, references = scene
    noise = target.copy()
    noise[hole] = np.random.default_rng(0).integers(0, 256, (int(hole.sum()), 3), dtype=np.uint8)
    flat = target.copy()
    flat[hole] = target[~hole].mean(axis=0).astype(np.uint8)
    ranked = rank_by_matches([noise, target, flat], references, hole, max_side=320)
    assert [score.index for score in ranked][0] == 1 and len(ranked[0].per_reference) == 3
    # measured 259 against 57 (noise) and 22 (flat): the true content has several times the matches
    assert ranked[0].matches >= 3 * max(score.matches for score in ranked[1:])
    assert sum(ranked[0].per_reference) == ranked[0].matches
    full = rank_by_matches([target], references, hole, region="full", max_side=320)
    assert full[0].matches > ranked[0].matches  # the known region matches too, when counted


def test_bad_arguments_are_named(scene):
    target, hole, references = scene
    with pytest.raises(ValueError, match="region must be one of hole, full"):
        rank_by_matches([target], references, hole, region="mask")
    with pytest.raises(ValueError, match="the hole's size"):
        rank_by_matches([target[:10]], references, hole)
    with pytest.raises(ValueError, match="at least one candidate and one reference"):
        rank_by_matches([], references, hole)


def test_a_reference_warped_into_the_hole_ranks_above_noise(scene):
    """A candidate whose hole holds another view of the scene, warped into the target's frame by a homography
    fitted on the known region (SIFT + RANSAC), outranks one whose hole is noise: the ranking rewards content
    that agrees with the references, not the true pixels only."""
    target, hole, references = scene
    gray = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in (references[0], target)]
    sift = cv2.SIFT_create()
    (kp_r, des_r), (kp_t, des_t) = (sift.detectAndCompute(g, m) for g, m in
                                    zip(gray, (None, (~hole).astype(np.uint8) * 255)))
    pairs = [m for m, n in cv2.BFMatcher().knnMatch(des_r, des_t, k=2) if m.distance < 0.75 * n.distance]
    homography, _ = cv2.findHomography(np.float32([kp_r[m.queryIdx].pt for m in pairs]),
                                       np.float32([kp_t[m.trainIdx].pt for m in pairs]), cv2.RANSAC, 5.0)
    warped = cv2.warpPerspective(references[0], homography, (target.shape[1], target.shape[0]))
    from_reference = np.where(hole[..., None], warped, target)
    assert np.abs(from_reference[hole].astype(int) - target[hole]).mean() > 5  # not the true pixels
    noise = target.copy()
    noise[hole] = np.random.default_rng(1).integers(0, 256, (int(hole.sum()), 3), dtype=np.uint8)
    ranked = rank_by_matches([noise, from_reference], references[1:], hole, max_side=320)
    assert [score.index for score in ranked] == [1, 0] and ranked[0].matches >= 2 * ranked[1].matches
