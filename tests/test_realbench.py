"""RealBench metrics against hand formulas and independent implementations (scikit-image SSIM, transformers'
own image processors and forwards, LPIPS called directly); tiny random networks, nothing downloaded."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from skimage.metrics import structural_similarity
from torchmetrics.functional.image import structural_similarity_index_measure
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTModel

from leftrefill.metrics import load_lpips_alex, psnr
from leftrefill.realbench import (
    DREAMSIM_FILES,
    HIGHER_IS_BETTER,
    METRIC_NAMES,
    MetricWeightsError,
    RealBenchMetrics,
    kept_count,
    summarize_benchmark,
    summarize_scene,
)
from tests.conftest import perturb_

SSIM_RADIUS = 5  # the 11x11 Gaussian window reaches 5 pixels past the mask


def _images(batch: int = 2, height: int = 48, width: int = 64, seed: int = 0):
    """pred, gt (B, 3, H, W) in [0, 1], correlated; mask (B, 1, H, W) with an interior box per sample."""
    generator = torch.Generator().manual_seed(seed)
    gt = torch.rand(batch, 3, height, width, generator=generator, dtype=torch.float64)
    pred = (gt + 0.3 * torch.randn(batch, 3, height, width, generator=generator, dtype=torch.float64)).clamp(0, 1)
    mask = torch.zeros(batch, 1, height, width, dtype=torch.float64)
    mask[0, :, 12:30, 15:40] = 1
    mask[1, :, 20:40, 10:30] = 1
    return pred, gt, mask


def _far_from(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels more than ``radius`` (Chebyshev) from every masked pixel: (B, 1, H, W) bool."""
    grown = F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius)
    return grown == 0


# ---------------------------------------------------------------------------------------------- low level


def test_masked_psnr_is_the_mse_over_masked_pixels_by_hand():
    pred, gt, mask = _images()
    values = RealBenchMetrics()(pred, gt, mask)
    for i in range(2):
        inside = mask[i, 0].bool().numpy()
        diff = pred[i].numpy()[:, inside] - gt[i].numpy()[:, inside]  # (3, n): all channels of the masked pixels
        assert values["masked_psnr"][i].item() == pytest.approx(10 * math.log10(1 / np.mean(diff ** 2)), abs=1e-9)
        whole = 10 * math.log10(1 / np.mean((pred[i].numpy() - gt[i].numpy()) ** 2))
        assert values["psnr"][i].item() == pytest.approx(whole, abs=1e-5)
    torch.testing.assert_close(values["psnr"], psnr(pred, gt).double())
    assert abs(values["masked_psnr"][0] - values["psnr"][0]) > 1e-3  # not the whole image


def test_masked_ssim_matches_scikit_image_ssim_map_in_the_mask():
    """An independent SSIM map (scikit-image: Gaussian sigma 1.5, 11 wide, population covariance); its border
    padding differs from torchmetrics', so the masks stay 5 pixels inside the image."""
    pred, gt, mask = _images()
    values = RealBenchMetrics()(pred, gt, mask)
    for i in range(2):
        _, full = structural_similarity(pred[i].numpy(), gt[i].numpy(), data_range=1.0, channel_axis=0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
        inside = mask[i, 0].bool().numpy()
        expected = np.mean([full[c][inside].mean() for c in range(3)])
        assert values["masked_ssim"][i].item() == pytest.approx(expected, abs=1e-6)
    whole = RealBenchMetrics()(pred, gt, torch.ones_like(mask))
    torch.testing.assert_close(whole["ssim"], structural_similarity_index_measure(pred, gt, data_range=1.0,
                                                                                  reduction="none"))
    torch.testing.assert_close(whole["masked_ssim"], whole["ssim"])  # a full mask is the whole image


def test_masked_metrics_ignore_pixels_outside_the_mask():
    pred, gt, mask = _images()
    metrics = RealBenchMetrics()
    before = metrics(pred, gt, mask)
    outside = 1 - mask
    changed = metrics(pred * mask + (1 - pred) * outside, gt, mask)  # every pixel outside the mask changed
    torch.testing.assert_close(changed["masked_psnr"], before["masked_psnr"], atol=0, rtol=0)
    assert (changed["psnr"] - before["psnr"]).abs().min() > 0.1
    # SSIM windows reach 5 pixels past the mask: pixels farther away do not count
    far = _far_from(mask, SSIM_RADIUS).double()
    changed_far = metrics(pred * (1 - far) + (1 - pred) * far, gt, mask)
    torch.testing.assert_close(changed_far["masked_ssim"], before["masked_ssim"], atol=1e-12, rtol=0)
    assert (changed_far["ssim"] - before["ssim"]).abs().min() > 1e-3
    inside_changed = metrics(pred * outside + (1 - pred) * mask, gt, mask)
    assert (inside_changed["masked_psnr"] - before["masked_psnr"]).abs().min() > 0.1
    assert (inside_changed["masked_ssim"] - before["masked_ssim"]).abs().min() > 1e-3


def test_identical_images_score_perfectly():
    _, gt, mask = _images()
    values = RealBenchMetrics()(gt.clone(), gt, mask)
    for name in ("ssim", "masked_ssim"):
        torch.testing.assert_close(values[name], torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.isinf(values["psnr"]).all() and torch.isinf(values["masked_psnr"]).all()


def test_inputs_are_checked():
    pred, gt, mask = _images()
    metrics = RealBenchMetrics()
    with pytest.raises(ValueError, match="one shape"):
        metrics(pred[..., :32], gt, mask)
    with pytest.raises(ValueError, match=r"mask must be \(2, 1, 48, 64\)"):
        metrics(pred, gt, mask[:, :, :32])
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics(pred, gt, mask * 0.5)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"mask is empty for sample\(s\) \[1\]"):
        metrics(pred, gt, empty)


# ---------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_model(tmp_path_factory):
    """LPIPS-alex through the real loader, from a randomly initialised AlexNet trunk on disk."""
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return load_lpips_alex(path)


def test_masked_lpips_compares_the_mask_multiplied_images(lpips_model):
    """As the HKU script: LPIPS between (2 pred - 1) * mask and (2 gt - 1) * mask, i.e. the mask applied to
    the [-1, 1] images LPIPS sees."""
    pred, gt, mask = _images(height=64, width=64)
    pred, gt, mask = pred.float(), gt.float(), mask.float()
    metrics = RealBenchMetrics(lpips_model)
    assert metrics.names == ("psnr", "ssim", "lpips", "masked_psnr", "masked_ssim", "masked_lpips")
    values = metrics(pred, gt, mask)
    with torch.no_grad():
        direct = lpips_model((2 * pred - 1) * mask, (2 * gt - 1) * mask).flatten().double()
        whole = lpips_model(2 * pred - 1, 2 * gt - 1).flatten().double()
    torch.testing.assert_close(values["masked_lpips"], direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(values["lpips"], whole, atol=1e-6, rtol=0)
    assert (values["masked_lpips"] - values["lpips"]).abs().min() > 1e-4
    outside_changed = metrics(pred * mask + (1 - pred) * (1 - mask), gt, mask)
    torch.testing.assert_close(outside_changed["masked_lpips"], values["masked_lpips"], atol=1e-7, rtol=0)
    assert (outside_changed["lpips"] - values["lpips"]).abs().min() > 1e-4


# ---------------------------------------------------------------------------------------------- DINO, CLIP


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny random DINO-shaped ViTModel saved as a transformers folder: (model in memory, folder)."""
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16)
    model = perturb_(ViTModel(config, add_pooling_layer=False)).eval()
    path = tmp_path_factory.mktemp("dino")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIPModel saved as a transformers folder: (model in memory, folder)."""
    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    model = perturb_(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return model, path


def _photo_like(seed: int, height: int = 66, width: int = 100) -> torch.Tensor:
    """(2, 3, H, W) smooth random images in [0, 1]. Non-square, and resized to 224 x 339 (CLIP) and 256 x 387
    (DINO): odd margins, where torchvision's CenterCrop (rounds) and transformers' (floors) differ by a pixel."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 3, 7, 10, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def test_dino_is_the_cls_cosine_of_the_transformers_forward(dino):
    model, path = dino
    metrics = RealBenchMetrics(dino_path=path)
    assert "dino" in metrics.names and "dino" not in metrics.skipped
    pred, gt = _photo_like(1), _photo_like(2)
    mask = torch.ones(2, 1, *pred.shape[-2:])
    values = metrics(pred, gt, mask)["dino"]
    # the HKU script's torchvision transforms, on tensors instead of PIL images
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    with torch.no_grad():
        cls = [model(pixel_values=transform(x)).last_hidden_state[:, 0] for x in (pred, gt)]
    expected = _cosine(*cls)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert values.dtype == torch.float64 and values.shape == (2,)
    assert (values < 1 - 1e-3).all()
    same = metrics(gt.clone(), gt, mask)["dino"]
    torch.testing.assert_close(same, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_clip_is_the_image_feature_cosine_of_the_transformers_forward(clip):
    model, path = clip
    metrics = RealBenchMetrics(clip_path=path)
    assert "clip" in metrics.names
    pred, gt = _photo_like(3), _photo_like(4)
    mask = torch.ones(2, 1, *pred.shape[-2:])
    values = metrics(pred, gt, mask)["clip"]
    processor = CLIPImageProcessor(do_rescale=False, do_convert_rgb=False)  # openai/clip-vit-base-patch32's defaults
    with torch.no_grad():
        features = [model.visual_projection(model.vision_model(
            pixel_values=processor(images=list(x), return_tensors="pt").pixel_values).pooler_output)
            for x in (pred, gt)]
    torch.testing.assert_close(values, _cosine(*features), atol=1e-5, rtol=0)
    assert (values < 1 - 1e-3).all()
    same = metrics(gt.clone(), gt, mask)["clip"]
    torch.testing.assert_close(same, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- paths


def test_networks_not_given_are_skipped_with_their_reason():
    assert set(HIGHER_IS_BETTER) == set(METRIC_NAMES)
    metrics = RealBenchMetrics()
    assert metrics.names == ("psnr", "ssim", "masked_psnr", "masked_ssim")
    assert set(metrics.skipped) == {"lpips", "masked_lpips", "dreamsim", "dino", "clip"}
    assert metrics.skipped["dino"] == ("no --dino_path given: DINO needs facebook/dino-vits16 as a local folder "
                                       "(config.json + weights)")
    assert metrics.skipped["clip"].startswith("no --clip_path given: CLIP needs openai/clip-vit-base-patch32")
    assert "no --dreamsim_path given" in metrics.skipped["dreamsim"]
    assert "alexnet-owt-7be5be79.pth" in metrics.skipped["lpips"]
    assert set(metrics(*_images())) == set(metrics.names)


def test_unusable_paths_name_the_path(tmp_path, dino):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(MetricWeightsError, match="has no config.json") as info:
        RealBenchMetrics(dino_path=nowhere)
    assert str(nowhere) in str(info.value) and "facebook/dino-vits16" in str(info.value)
    with pytest.raises(MetricWeightsError, match="holds a 'vit' model") as info:
        RealBenchMetrics(clip_path=dino[1])  # a DINO folder given as CLIP
    assert str(dino[1]) in str(info.value)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((dino[1] / "config.json").read_text())
    with pytest.raises(MetricWeightsError, match="cannot load DINO") as info:
        RealBenchMetrics(dino_path=config_only)
    assert str(config_only) in str(info.value)
    with pytest.raises(MetricWeightsError, match="DreamSim checkpoint folder not found") as info:
        RealBenchMetrics(dreamsim_path=nowhere)
    assert str(nowhere) in str(info.value)
    with pytest.raises(MetricWeightsError, match="missing dino_vitb16_pretrain.pth, dino_vitb16_lora"):
        RealBenchMetrics(dreamsim_path=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("dreamsim") is not None, reason="dreamsim is installed here")
def test_dreamsim_is_skipped_without_its_package(tmp_path):
    for name in DREAMSIM_FILES:  # a complete-looking folder: only the package is missing
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    metrics = RealBenchMetrics(dreamsim_path=tmp_path)
    assert "dreamsim" not in metrics.names
    assert metrics.skipped["dreamsim"].startswith("the dreamsim package is not installed")


# ---------------------------------------------------------------------------------------------- summaries


def test_summarize_scene_keeps_the_best_ranked_samples():
    scores = {"psnr": [10.0, 12.0, 20.0, 14.0], "lpips": [0.4, 0.5, 0.1, 0.3]}
    ranking = [2, 0, 3, 1]  # sample 2 is best
    summary = summarize_scene(scores, ranking)
    assert list(summary["top"]) == ["0", "25", "50", "75"]
    assert summary["all"] == pytest.approx({"psnr": 14.0, "lpips": 0.325})
    assert summary["top"]["0"] == summary["all"]
    assert summary["top"]["25"] == pytest.approx({"psnr": (20 + 10 + 14) / 3, "lpips": (0.1 + 0.4 + 0.3) / 3})
    assert summary["top"]["50"] == pytest.approx({"psnr": 15.0, "lpips": 0.25})
    assert summary["top"]["75"] == {"psnr": 20.0, "lpips": 0.1}
    with pytest.raises(ValueError, match="each sample index"):
        summarize_scene(scores, [0, 1, 1, 3])
    with pytest.raises(ValueError, match="one per ranked sample"):
        summarize_scene({"psnr": [1.0, 2.0]}, ranking)


def test_kept_count_rounds_up_and_keeps_one():
    assert [kept_count(16, r) for r in (0.0, 0.25, 0.5, 0.75)] == [16, 12, 8, 4]
    assert kept_count(10, 0.7) == 3  # (1 - 0.7) * 10 is 3.0000000000000004 in floating point
    assert kept_count(3, 0.5) == 2 and kept_count(1, 0.75) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kept_count(4, 1.0)


def test_summarize_benchmark_averages_scenes():
    a = summarize_scene({"psnr": [10.0, 20.0]}, [1, 0], filter_rates=(0.0, 0.5))
    b = summarize_scene({"psnr": [30.0, 50.0]}, [0, 1], filter_rates=(0.0, 0.5))
    total = summarize_benchmark({"a": a, "b": b})  # a: all 15, top half 20; b: all 40, top half 30
    assert total == {"all": {"psnr": 27.5}, "top": {"0": {"psnr": 27.5}, "50": {"psnr": 25.0}}, "scenes": 2}
    c = summarize_scene({"ssim": [0.5]}, [0], filter_rates=(0.0, 0.5))
    with pytest.raises(ValueError, match="disagree"):
        summarize_benchmark({"a": a, "c": c})
