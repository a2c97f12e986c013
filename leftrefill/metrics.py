"""Evaluation metrics of the LeftRefill paper (CVPR 2024): PSNR, grayscale SSIM and LPIPS-alex.

The paper's protocol (its ``test_inpainting.py``): the prediction is hard-blended with the ground truth
outside the mask, the target half of the canvas is kept, and both images are area-downsampled to
``metric_size`` when that is smaller than the test size. Then, per image:

* PSNR on the RGB image in [0, 1] over the whole target image (not only the hole), ``data_range=1``;
* SSIM on the grayscale image (torchvision ``rgb_to_grayscale``) with scikit-image's default
  7x7 uniform window and the data range 2 that scikit-image 0.18.1 implied for float images;
* LPIPS with the AlexNet trunk (``lpips`` v0.1) on the image mapped to [-1, 1];

and each metric is averaged over the images of the test set.

All images given to these functions are float tensors (B, 3, H, W) in [0, 1]. They are *not* clamped:
the paper does not clamp the prediction before computing the metrics, so neither do we.

LPIPS never downloads anything: its AlexNet trunk is built randomly initialised and filled from a local
copy of torchvision's ``alexnet-owt-7be5be79.pth`` (see :func:`find_alexnet_weights`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchvision.transforms.functional import rgb_to_grayscale

from ldm.checkpoint import CheckpointError, read_state_dict
from leftrefill.paths import search_roots

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"

# skimage <= 0.18 took the data range of a float image from its dtype, [-1, 1], i.e. 2.
SSIM_DATA_RANGE = 2.0


class LPIPSWeightsError(CheckpointError):
    """The AlexNet weights that LPIPS needs are missing or are not an AlexNet state dict; names the file."""


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Both images must be float (B, 3, H, W) tensors of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"images must be float tensors in [0, 1], got {pred.dtype} and {target.dtype}")


# ---------------------------------------------------------------------------------------------- PSNR, SSIM


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [0, 1] -> (B,) float64 (inf where pred == target).

    The mean squared error is taken over all channels and pixels of each image separately, in float64;
    torchmetrics' 10 / ln(10) factor is float32, so values agree with 10 log10(1 / mse) to ~1e-7 relative.
    """
    _check_pair(pred, target)
    return peak_signal_noise_ratio(
        pred.double(), target.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_gray(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image grayscale SSIM of (B, 3, H, W) images in [0, 1] -> (B,) float64; H, W >= 7.

    Grayscale is torchvision's ``rgb_to_grayscale`` (0.2989 R + 0.587 G + 0.114 B), then scikit-image's
    ``structural_similarity`` with its defaults (7x7 uniform window, sample covariance, mean over the
    region 3 pixels away from the border) and ``data_range=2``: the paper pinned scikit-image 0.18.1,
    where a float image without ``data_range`` implied the dtype range [-1, 1]. The SSIM itself is
    computed in float64.
    """
    _check_pair(pred, target)
    pred_gray = rgb_to_grayscale(pred)[:, 0].detach().cpu().double().numpy()
    target_gray = rgb_to_grayscale(target)[:, 0].detach().cpu().double().numpy()
    values = [
        structural_similarity(p, t, data_range=SSIM_DATA_RANGE) for p, t in zip(pred_gray, target_gray)
    ]
    return torch.tensor(values, dtype=torch.float64)


def resize_for_metrics(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Area-downsample (B, C, H, W) images to (B, C, size, size); never upsamples.

    ``size=None``, or H == W == size, returns ``images`` unchanged. A size larger than H or W raises
    ValueError: metrics are never computed on upsampled images.
    """
    if size is None:
        return images
    height, width = images.shape[-2:]
    if size <= 0:
        raise ValueError(f"metric_size {size} must be positive")
    if size > height or size > width:
        raise ValueError(f"metric_size {size} must not exceed the image size {height}x{width}")
    if height == width == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


# ---------------------------------------------------------------------------------------------- LPIPS


def _default_weight_locations() -> list[Path]:
    """Where :func:`find_alexnet_weights` looks, in order."""
    return [*(root / "pretrained_models" / ALEXNET_FILENAME for root in search_roots()),
            Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILENAME]


def find_alexnet_weights(path: str | Path | None = None) -> Path:
    """The local AlexNet weights file for LPIPS: ``path`` if given, else the first default location found.

    Defaults, in order: ``pretrained_models/alexnet-owt-7be5be79.pth`` under ``$LEFTREFILL_HOME`` and under
    the project folder (leftrefill.paths), then torchvision's cache ``$TORCH_HOME/hub/checkpoints/``
    (``torch.hub.get_dir()``).
    Raises LPIPSWeightsError, saying where it looked and how to fix it, when there is none.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LPIPSWeightsError(f"LPIPS AlexNet weights file not found: {path}")
        return path
    searched = _default_weight_locations()
    for candidate in searched:
        if candidate.is_file():
            return candidate
    places = "\n".join(f"  {p.absolute()}" for p in searched)
    raise LPIPSWeightsError(
        f"LPIPS needs torchvision's AlexNet weights {ALEXNET_FILENAME}, which were not found in:\n{places}\n"
        f"Nothing is downloaded. Fetch {ALEXNET_URL} on a machine with internet access and copy it to "
        f"pretrained_models/ (of the project or of $LEFTREFILL_HOME) or $TORCH_HOME/hub/checkpoints/, or pass "
        f"--lpips_weights PATH; "
        f"or run with --no_lpips to skip LPIPS."
    )


def _trunk_key(param_name: str) -> str:
    """lpips trunk parameter name -> torchvision AlexNet key: 'slice2.3.weight' -> 'features.3.weight'.

    lpips' ``pretrained_networks.alexnet`` adds torchvision's ``features[i]`` to a slice under the name
    ``str(i)``, so the index inside the slice is the torchvision index.
    """
    _slice, index, kind = param_name.split(".")
    return f"features.{index}.{kind}"


def _fill_alex_trunk(trunk: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every ``features.*`` tensor of ``state`` into the lpips AlexNet trunk, strictly."""
    expected = {_trunk_key(name): param for name, param in trunk.named_parameters()}
    features = {k for k in state if k.startswith("features.")}
    others = {k for k in state if not k.startswith(("features.", "classifier."))}
    problems = []
    if missing := sorted(set(expected) - features):
        problems.append(f"missing keys {missing}")
    if unexpected := sorted((features - set(expected)) | others):
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & features):
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"{key} is not a float tensor")
        elif value.shape != expected[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    if problems:
        raise LPIPSWeightsError(f"{path} is not torchvision's AlexNet state dict: " + "; ".join(problems))
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


def load_lpips_alex(weights: str | Path | None = None) -> lpips.LPIPS:
    """LPIPS v0.1 with the AlexNet trunk, built without any download; eval mode, no gradients.

    ``weights``: torchvision's AlexNet state dict file (default: :func:`find_alexnet_weights`). The linear
    layers come from the lpips package's bundled ``weights/v0.1/alex.pth``.
    """
    path = find_alexnet_weights(weights)
    state = read_state_dict(path)  # weights_only: never unpickles code; errors name the file
    with warnings.catch_warnings():
        # pnet_rand=True -> torchvision alexnet(pretrained=False): random trunk, no download, but two
        # deprecation warnings about the legacy `pretrained` argument.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    _fill_alex_trunk(model.net, state, path)
    model.eval()
    model.requires_grad_(False)
    model.weights_file = str(path)  # recorded in summary.json with the other loaded files
    return model


def lpips_distance(model: lpips.LPIPS, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS of (B, 3, H, W) images in [0, 1] -> (B,) on the model's device and dtype."""
    _check_pair(pred, target)
    param = next(model.parameters())
    pred = pred.to(param.device, param.dtype) * 2 - 1
    target = target.to(param.device, param.dtype) * 2 - 1
    with torch.no_grad():
        return model(pred, target).flatten()


# ---------------------------------------------------------------------------------------------- all


class InpaintingMetrics:
    """The paper's per-image metrics at ``metric_size``: PSNR, SSIM and (given a model) LPIPS.

    ``metrics(pred, target)`` with (B, 3, H, W) images in [0, 1] (the blended prediction and the ground
    truth) returns ``{name: (B,) float32 CPU tensor}`` for each name in :attr:`names`.
    """

    def __init__(self, metric_size: int | None = None, lpips_model: lpips.LPIPS | None = None) -> None:
        self.metric_size = metric_size
        self.lpips_model = lpips_model

    @property
    def names(self) -> list[str]:
        """The metric names, in the order of the returned dict."""
        return ["psnr", "ssim"] + (["lpips"] if self.lpips_model is not None else [])

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pair(pred, target)
        pred = resize_for_metrics(pred, self.metric_size)
        target = resize_for_metrics(target, self.metric_size)
        values = {"psnr": psnr(pred, target), "ssim": ssim_gray(pred, target)}
        if self.lpips_model is not None:
            values["lpips"] = lpips_distance(self.lpips_model, pred, target)
        return {name: values[name].detach().float().cpu() for name in self.names}
