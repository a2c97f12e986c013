"""RealBench metrics of RealFill (Tang et al., TOG 2024; METHOD 4.2, 5.2 and 7.2).

Per sample, between the composited output ``pred`` and the ground truth ``gt`` at the target's own size:

* low level, whole image: PSNR (RGB, data range 1), SSIM (RGB, torchmetrics' Gaussian 11x11 window,
  sigma 1.5, data range 1, reflect padding) and LPIPS-alex on the image mapped to [-1, 1];
* the same three restricted to the mask (1 = the filled region), as the HKU reproduction
  (eric15342335/realfill ``benchmark/``) defines them: the MSE over the masked pixels of all three channels;
  the SSIM map averaged over the masked pixels per channel, then over channels; LPIPS-alex between the
  mask-multiplied images (the SSIM windows, radius 5, also see the 5 pixels around the mask);
* mid and high level, whole image: DreamSim (a distance), DINO ViT-S/16 CLS-token cosine and CLIP ViT-B/32
  image-feature cosine, each only when its weights are given as a local folder.

The HKU scripts resize every image to 512x512 before PSNR, SSIM and LPIPS (bilinear; masks nearest), work on
uint8 images and clamp the per-channel masked SSIM to [0, 1]; this module does none of that, and the caller
decides the size. Nothing is ever downloaded: every network comes from a local file or folder, and a metric
whose network is not given is skipped, with its reason in :attr:`RealBenchMetrics.skipped`.

:func:`summarize_scene` averages a scene's samples, over all of them and over the top-k kept after seed
selection (the paper's filtering-rate curve, 0/25/50/75 %); :func:`summarize_benchmark` averages scenes.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ldm.checkpoint import CheckpointError
from leftrefill.metrics import _check_pair, lpips_distance, psnr

METRIC_NAMES = ("psnr", "ssim", "lpips", "masked_psnr", "masked_ssim", "masked_lpips", "dreamsim", "dino", "clip")
HIGHER_IS_BETTER = {
    "psnr": True, "ssim": True, "lpips": False,
    "masked_psnr": True, "masked_ssim": True, "masked_lpips": False,
    "dreamsim": False, "dino": True, "clip": True,
}
FILTER_RATES = (0.0, 0.25, 0.5, 0.75)  # fraction of the ranked samples dropped (RealFill's filtering curve)

# DINO: the HKU script's torchvision pipeline (resize 256, centre crop 224, ImageNet statistics).
DINO_RESIZE, DINO_CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CLIP: CLIPImageProcessor's defaults for openai/clip-vit-base-patch32.
CLIP_RESIZE, CLIP_CROP = 224, 224
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DREAMSIM_SIZE = 224  # dreamsim's own preprocess: a square bicubic resize, no crop, values in [0, 1]

# What dreamsim.dreamsim(pretrained=True, cache_dir=...) reads for its default "ensemble" model: its checks
# for the first six, and torch.hub.load("facebookresearch/dino:main") with the hub folder set to cache_dir for
# the last two. Any of them missing and dreamsim downloads, so all must be present before it is called.
DREAMSIM_FILES = (
    "dino_vitb16_pretrain.pth", "dino_vitb16_lora",
    "open_clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_lora",
    "clip_vitb16_pretrain.pth.tar", "clip_vitb16_lora",
    "facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth",
)


class MetricWeightsError(CheckpointError):
    """A DINO, CLIP or DreamSim weights folder that is missing or cannot be loaded; the message names it."""


# ---------------------------------------------------------------------------------------------- low level


def _check_inputs(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> None:
    """pred, gt float (B, 3, H, W); mask (B, 1, H, W) of 0 and 1 with at least one 1 per sample."""
    _check_pair(pred, gt)
    batch, _, height, width = pred.shape
    if mask.shape != (batch, 1, height, width):
        raise ValueError(f"mask must be {(batch, 1, height, width)} to match the images, got {tuple(mask.shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = the filled region)")
    if empty := torch.nonzero(mask.flatten(1).sum(1) == 0).flatten().tolist():
        raise ValueError(f"mask is empty for sample(s) {empty}: the masked metrics are undefined")


def masked_psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PSNR over the masked pixels: 10 log10(1 / mse), mse over the pixels where mask == 1 in all 3 channels.

    pred, gt (B, 3, H, W) in [0, 1]; mask (B, 1, H, W) in {0, 1} -> (B,) float64 dB (inf if equal there).
    """
    mask = mask.double()
    squared = (pred.double() - gt.double()).pow(2) * mask
    mse = squared.sum(dim=(1, 2, 3)) / (3 * mask.sum(dim=(1, 2, 3)))
    return 10 * torch.log10(1 / mse)


def ssim_map(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of (B, 3, H, W) images in [0, 1] -> (B, 3, H, W) float64.

    torchmetrics' ``structural_similarity_index_measure`` with its Gaussian window (11x11, sigma 1.5),
    ``data_range=1`` and reflect padding, so the map covers every pixel; its mean is the whole-image SSIM.
    """
    _, full = structural_similarity_index_measure(
        pred.double(), gt.double(), gaussian_kernel=True, sigma=1.5, data_range=1.0,
        reduction="none", return_full_image=True,
    )
    return full


def masked_mean_per_channel(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, C, H, W) ``values`` over the pixels where mask (B, 1, H, W) == 1, per channel, then the
    mean over channels -> (B,) float64 (the HKU masked SSIM)."""
    mask = mask.double()
    per_channel = (values.double() * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3))
    return per_channel.mean(dim=1)


def mask_for_lpips(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] whose LPIPS input 2x - 1 is (2 images - 1) * mask.

    The HKU script multiplies the [-1, 1] images by the mask, so LPIPS sees 0 (mid-grey, 0.5 here) outside it.
    """
    return images * mask + 0.5 * (1 - mask)


# ---------------------------------------------------------------------------------------------- networks


def _resize_crop_normalize(images: torch.Tensor, resize: int, crop: int, mean, std, *,
                           floor_offset: bool) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, crop, crop): short side to ``resize`` (bicubic, antialiased), centre
    crop, normalise. The crop's offset is (size - crop) / 2 rounded as torchvision's CenterCrop does, or floored
    as transformers' CLIPImageProcessor does (``floor_offset``): one pixel apart when the margin is odd."""
    images = TF.resize(images, [resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if floor_offset:
        height, width = images.shape[-2:]
        images = TF.crop(images, (height - crop) // 2, (width - crop) // 2, crop, crop)
    else:
        images = TF.center_crop(images, [crop, crop])
    return TF.normalize(images, list(mean), list(std))


def _read_model_type(path: Path, what: str, expected_type: str, hub_id: str) -> None:
    """Refuse a folder that is not a saved transformers model of ``expected_type``, naming it."""
    config = path / "config.json"
    hint = f"{what} needs {hub_id} as a local folder (config.json + weights, as save_pretrained writes)"
    if not config.is_file():
        raise MetricWeightsError(f"{what} weights not found: {path} has no config.json. {hint}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise MetricWeightsError(f"{config}: not a readable transformers config ({error}). {hint}") from error
    if model_type != expected_type:
        raise MetricWeightsError(f"{path} holds a {model_type!r} model, but {hint} (model_type {expected_type!r})")


def _load_transformers(model_class, path: str | Path, what: str, expected_type: str, hub_id: str,
                       device, **kwargs) -> torch.nn.Module:
    """``model_class.from_pretrained(path, local_files_only=True)``, strictly: every weight must be in the
    folder. Eval mode, no gradients, on ``device``."""
    path = Path(path)
    _read_model_type(path, what, expected_type, hub_id)
    try:
        model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise MetricWeightsError(f"cannot load {what} from {path}: {error}") from error
    if info["missing_keys"]:
        raise MetricWeightsError(f"{path} is not a complete {hub_id}: missing {sorted(info['missing_keys'])}")
    return model.to(device).eval().requires_grad_(False)


def load_dino(path: str | Path, device="cpu") -> torch.nn.Module:
    """facebook/dino-vits16 as a transformers ViTModel from a local folder (no pooler: only the CLS token is used)."""
    from transformers import ViTModel

    return _load_transformers(ViTModel, path, "DINO", "vit", "facebook/dino-vits16", device,
                              add_pooling_layer=False)


def load_clip(path: str | Path, device="cpu") -> torch.nn.Module:
    """openai/clip-vit-base-patch32 as a transformers CLIPModel from a local folder."""
    from transformers import CLIPModel

    return _load_transformers(CLIPModel, path, "CLIP", "clip", "openai/clip-vit-base-patch32", device)


def dino_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS token of ``last_hidden_state`` of (B, 3, H, W) images in [0, 1] -> (B, hidden)."""
    pixels = _resize_crop_normalize(images, DINO_RESIZE, DINO_CROP, IMAGENET_MEAN, IMAGENET_STD,
                                    floor_offset=False)  # the HKU script's torchvision CenterCrop
    param = next(model.parameters())
    return model(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state[:, 0]


def clip_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``get_image_features`` (projected, not normalised) of (B, 3, H, W) images in [0, 1] -> (B, projection_dim)."""
    pixels = _resize_crop_normalize(images, CLIP_RESIZE, CLIP_CROP, CLIP_MEAN, CLIP_STD,
                                    floor_offset=True)  # the HKU script's CLIPProcessor
    param = next(model.parameters())
    features = model.get_image_features(pixel_values=pixels.to(param.device, param.dtype))
    # transformers >= 5 returns the vision output with the projected features as its pooler_output
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_dreamsim(path: str | Path, device="cpu") -> torch.nn.Module:
    """DreamSim's ensemble model from a local checkpoint folder; refuses to let dreamsim download anything.

    Raises MetricWeightsError naming the folder and the missing entries of :data:`DREAMSIM_FILES`, and
    ModuleNotFoundError when the ``dreamsim`` package is not installed (checked after the files).
    """
    path = Path(path)
    if not path.is_dir():
        raise MetricWeightsError(f"DreamSim checkpoint folder not found: {path}")
    if missing := [name for name in DREAMSIM_FILES if not (path / name).exists()]:
        raise MetricWeightsError(
            f"{path} is not a complete DreamSim checkpoint folder: missing {', '.join(missing)} "
            "(unzip dreamsim_checkpoint.zip there, and put the facebookresearch/dino hub repository and "
            "dino_vitbase16_pretrain.pth in its hub layout)"
        )
    from dreamsim import dreamsim  # only now: the package is optional

    hub_dir = torch.hub.get_dir()
    try:
        model, _preprocess = dreamsim(pretrained=True, cache_dir=str(path), device=str(device))
    finally:
        torch.hub.set_dir(hub_dir)  # dreamsim points torch.hub at its folder to build DINO; undo that
    return model.eval().requires_grad_(False)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (B, D) features -> (B,) float64 on the CPU."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).cpu()


# ---------------------------------------------------------------------------------------------- all


class RealBenchMetrics:
    """Every RealBench metric whose network is available; ``metrics(pred, gt, mask) -> {name: (B,) float64}``.

    ``lpips``: an LPIPS-alex network (:func:`leftrefill.metrics.load_lpips_alex`); ``dino_path``,
    ``clip_path``: local transformers folders of facebook/dino-vits16 and openai/clip-vit-base-patch32;
    ``dreamsim_path``: DreamSim's checkpoint folder (needs the optional ``dreamsim`` package). A network that
    is not given is skipped, its reason in :attr:`skipped`; a path that is given but unusable raises
    MetricWeightsError naming it. :attr:`names` lists the computed metrics, in :data:`METRIC_NAMES` order.
    """

    def __init__(self, lpips: torch.nn.Module | None = None, *, dino_path=None, clip_path=None,
                 dreamsim_path=None, device="cpu") -> None:
        self.device = torch.device(device)
        self.lpips = lpips.to(self.device) if lpips is not None else None
        self.skipped: dict[str, str] = {}
        if lpips is None:
            reason = ("no LPIPS network given: LPIPS needs torchvision's AlexNet weights "
                      "(alexnet-owt-7be5be79.pth, see leftrefill.metrics.load_lpips_alex)")
            self.skipped.update(lpips=reason, masked_lpips=reason)
        self.dino = self.clip = None
        if dino_path is None:
            self.skipped["dino"] = ("no --dino_path given: DINO needs facebook/dino-vits16 as a local folder "
                                    "(config.json + weights)")
        else:
            self.dino = load_dino(dino_path, self.device)
        if clip_path is None:
            self.skipped["clip"] = ("no --clip_path given: CLIP needs openai/clip-vit-base-patch32 as a local "
                                    "folder (config.json + weights)")
        else:
            self.clip = load_clip(clip_path, self.device)
        self.dreamsim = self._dreamsim_or_skip(dreamsim_path)
        self.names: tuple[str, ...] = tuple(name for name in METRIC_NAMES if name not in self.skipped)

    def _dreamsim_or_skip(self, path) -> torch.nn.Module | None:
        if path is None:
            self.skipped["dreamsim"] = ("no --dreamsim_path given: DreamSim needs the dreamsim package and its "
                                        "checkpoint folder (" + ", ".join(DREAMSIM_FILES) + ")")
            return None
        try:
            return load_dreamsim(path, self.device)  # checks the folder before importing the package
        except ModuleNotFoundError as error:
            if error.name != "dreamsim":
                raise  # installed, but one of its own dependencies is not: say so, do not skip
            self.skipped["dreamsim"] = f"the dreamsim package is not installed (pip install dreamsim); {path} is ready"
            return None

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """pred, gt (B, 3, H, W) float in [0, 1] at the target's own size; mask (B, 1, H, W) in {0, 1},
        1 = the filled region, at least one pixel per sample -> {name: (B,) float64 CPU} for :attr:`names`."""
        _check_inputs(pred, gt, mask)
        mask = mask.to(pred.dtype)
        ssim = ssim_map(pred, gt)
        values = {
            "psnr": psnr(pred, gt),
            "ssim": ssim.mean(dim=(1, 2, 3)),
            "masked_psnr": masked_psnr(pred, gt, mask),
            "masked_ssim": masked_mean_per_channel(ssim, mask),
        }
        if self.lpips is not None:
            values["lpips"] = lpips_distance(self.lpips, pred, gt)
            values["masked_lpips"] = lpips_distance(self.lpips, mask_for_lpips(pred, mask), mask_for_lpips(gt, mask))
        pair = torch.cat([pred, gt]).to(self.device)  # one forward for both: (2B, 3, H, W)
        if self.dino is not None:
            values["dino"] = _cosine(*dino_features(self.dino, pair).chunk(2))
        if self.clip is not None:
            values["clip"] = _cosine(*clip_features(self.clip, pair).chunk(2))
        if self.dreamsim is not None:
            square = TF.resize(pair, [DREAMSIM_SIZE, DREAMSIM_SIZE], interpolation=InterpolationMode.BICUBIC,
                               antialias=True)
            values["dreamsim"] = self.dreamsim(*square.chunk(2)).flatten()
        return {name: values[name].detach().double().cpu() for name in self.names}


# ---------------------------------------------------------------------------------------------- summaries


def _percent(rate: float) -> str:
    """0.25 -> '25', 0.0 -> '0', 0.125 -> '12.5'."""
    return format(round(rate * 100, 6), "g")


def kept_count(n: int, rate: float) -> int:
    """How many of ``n`` ranked samples a filtering rate keeps: ceil((1 - rate) n), at least 1."""
    if not 0 <= rate < 1:
        raise ValueError(f"filter rate must be in [0, 1), got {rate}")
    return max(1, math.ceil(round((1 - rate) * n, 9)))  # round: (1 - 0.7) * 10 is 3.0000000000000004


def summarize_scene(scores: dict[str, list[float]], ranking: list[int],
                    filter_rates=FILTER_RATES) -> dict:
    """One scene's means: ``{"all": {metric: mean}, "top": {"25": {metric: mean of the kept}, ...}}``.

    ``scores``: metric -> per-sample values in sample order; ``ranking``: every sample index once, best first
    (seed selection). At filter rate r the best ceil((1 - r) n) samples are kept (at least one); the keys of
    ``"top"`` are the rates in percent ('0', '25', '50', '75').
    """
    n = len(ranking)
    if sorted(ranking) != list(range(n)) or n == 0:
        raise ValueError(f"ranking must hold each sample index 0..n-1 once, got {ranking}")
    if bad := {name: len(values) for name, values in scores.items() if len(values) != n}:
        raise ValueError(f"every metric needs {n} values (one per ranked sample), got {bad}")

    def means(kept: list[int]) -> dict[str, float]:
        return {name: statistics.fmean(values[i] for i in kept) for name, values in scores.items()}

    return {"all": means(list(range(n))),
            "top": {_percent(rate): means(ranking[:kept_count(n, rate)]) for rate in filter_rates}}


def _mean_nested(entries: list[dict], where: str = "summary") -> dict:
    """Element-wise mean of dicts of one nesting whose leaves are numbers; their keys must agree."""
    keys = list(entries[0])
    for entry in entries[1:]:
        if set(entry) != set(keys):
            raise ValueError(f"scenes disagree on the keys of {where}: {sorted(keys)} vs {sorted(entry)}")
    return {key: _mean_nested([e[key] for e in entries], f"{where}[{key!r}]")
            if isinstance(entries[0][key], dict) else statistics.fmean(e[key] for e in entries)
            for key in keys}


def summarize_benchmark(per_scene: dict[str, dict]) -> dict:
    """Mean over scenes of every :func:`summarize_scene` entry (same nesting), plus ``"scenes"``: their count."""
    if not per_scene:
        raise ValueError("summarize_benchmark needs at least one scene")
    return {**_mean_nested(list(per_scene.values())), "scenes": len(per_scene)}
