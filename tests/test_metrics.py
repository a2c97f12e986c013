"""The paper's metrics against hand formulas and independent implementations; LPIPS never downloads."""

from __future__ import annotations

import math
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from numpy.lib.stride_tricks import sliding_window_view

from ldm.checkpoint import CheckpointError
from leftrefill import paths
from leftrefill.metrics import (
    ALEXNET_FILENAME,
    InpaintingMetrics,
    LPIPSWeightsError,
    find_alexnet_weights,
    load_lpips_alex,
    lpips_distance,
    psnr,
    resize_for_metrics,
    ssim_gray,
)

LPIPS_LIN_WEIGHTS = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
RELU_INDICES = (1, 4, 7, 9, 11)


def _random_pair(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, 3, size, size, generator=generator)
    pred = (target + 0.2 * torch.randn(batch, 3, size, size, generator=generator)).clamp(0, 1)
    return pred, target


# ---------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_error_is_exact():
    target = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    pred = target.clone()
    pred[0] += 0.1  # mse 1e-2 -> 20 dB
    pred[1] += 0.01  # mse 1e-4 -> 40 dB
    values = psnr(pred, target)
    assert values.shape == (2,)
    # torchmetrics' 10 / ln(10) factor is a float32 constant: ~1e-7 relative
    torch.testing.assert_close(values.double(), torch.tensor([20.0, 40.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_psnr_is_per_image_against_numpy():
    pred, target = _random_pair(batch=3)
    pred[1] = target[1] + 0.5 * (pred[1] - target[1])  # a different error per image
    expected = [10 * math.log10(1 / np.mean((p.double().numpy() - t.double().numpy()) ** 2))
                for p, t in zip(pred, target)]
    values = psnr(pred, target)
    assert values.shape == (3,)
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-5)
    assert abs(expected[0] - expected[1]) > 1  # not pooled over the batch


def test_psnr_does_not_clamp():
    target = torch.zeros(1, 3, 8, 8)
    assert psnr(target + 1.5, target).item() == pytest.approx(-20 * math.log10(1.5), abs=1e-6)


# ---------------------------------------------------------------------------------------------- SSIM


def _numpy_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0, win: int = 7) -> float:
    """SSIM with a uniform window, sample covariance, mean over the windows that lie inside the image."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    wx, wy = sliding_window_view(x, (win, win)), sliding_window_view(y, (win, win))
    n = win * win
    mx, my = wx.mean(axis=(-2, -1)), wy.mean(axis=(-2, -1))
    dx, dy = wx - mx[..., None, None], wy - my[..., None, None]
    vx = (dx * dx).sum(axis=(-2, -1)) / (n - 1)
    vy = (dy * dy).sum(axis=(-2, -1)) / (n - 1)
    cxy = (dx * dy).sum(axis=(-2, -1)) / (n - 1)
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _numpy_gray(image: torch.Tensor) -> np.ndarray:
    r, g, b = image.double().numpy()
    return 0.2989 * r + 0.587 * g + 0.114 * b  # torchvision's rgb_to_grayscale weights


def test_ssim_identical_images_is_one():
    _, target = _random_pair()
    np.testing.assert_allclose(ssim_gray(target, target.clone()).numpy(), [1.0, 1.0], atol=1e-12)


def test_ssim_against_numpy():
    pred, target = _random_pair(batch=2, size=24, seed=3)
    pred[1] = target[1] * 0.7 + 0.1  # a different, structured error for the second image
    expected = [_numpy_ssim(_numpy_gray(p), _numpy_gray(t)) for p, t in zip(pred, target)]
    values = ssim_gray(pred, target)
    assert values.shape == (2,)
    np.testing.assert_allclose(values.numpy(), expected, rtol=0, atol=1e-6)
    assert abs(expected[0] - expected[1]) > 0.05


def test_ssim_grayscale_weights_and_data_range():
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    black = torch.zeros(1, 3, 16, 16)
    # constant images: SSIM = C1 / (mu^2 + C1) with mu = 0.2989 (red weight) and C1 = (0.01 * 2)^2
    c1 = (0.01 * 2.0) ** 2
    expected = c1 / (0.2989**2 + c1)
    value = ssim_gray(red, black).item()
    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(c1 / (0.587**2 + c1), rel=1e-2)  # not the green weight
    assert value != pytest.approx(1e-4 / (0.2989**2 + 1e-4), rel=1e-2)  # not data_range = 1


# ---------------------------------------------------------------------------------------------- resize


def test_resize_area_is_block_mean():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = images.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(resize_for_metrics(images, 4), expected, atol=1e-7, rtol=0)


def test_resize_unchanged_and_no_upsampling():
    images = torch.rand(1, 3, 8, 8)
    assert resize_for_metrics(images, None) is images
    assert resize_for_metrics(images, 8) is images
    with pytest.raises(ValueError, match=r"metric_size 16 must not exceed"):
        resize_for_metrics(images, 16)
    with pytest.raises(ValueError, match="must not exceed"):
        resize_for_metrics(torch.rand(1, 3, 8, 16), 12)


# ---------------------------------------------------------------------------------------------- LPIPS


def _refuse(*args, **kwargs):
    raise AssertionError(f"download attempted: {args}")


def _offline(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Any download attempt fails; $TORCH_HOME is an empty folder; the working directory and $LEFTREFILL_HOME
    are ``directory``, and there is no project folder (a checkout's pretrained_models/ must not leak in)."""
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _refuse)
    torch_home = directory / "torch_home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.chdir(directory)
    monkeypatch.setenv(paths.HOME_VARIABLE, str(directory))
    monkeypatch.setattr(paths, "project_folder", lambda: None)


@pytest.fixture
def no_download(monkeypatch, tmp_path) -> Path:
    _offline(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised torchvision AlexNet state dict on disk, and the tensors themselves.

    The 58M-parameter classifier is replaced by one small tensor (to keep the test fast): the loader
    must ignore ``classifier.*`` keys.
    """
    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(4, 9216)
    path = tmp_path_factory.mktemp("alexnet") / "my_alexnet.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def lpips_model(alexnet_file, tmp_path_factory) -> lpips.LPIPS:
    """Built once for the module, offline like ``no_download``."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch, tmp_path_factory.mktemp("offline"))
        return load_lpips_alex(alexnet_file[0])


def test_missing_weights_message(no_download):
    with pytest.raises(LPIPSWeightsError) as info:
        find_alexnet_weights()
    message = str(info.value)
    assert ALEXNET_FILENAME in message
    assert "--no_lpips" in message and "--lpips_weights" in message
    assert str(no_download / "torch_home" / "hub" / "checkpoints") in message
    with pytest.raises(LPIPSWeightsError, match="nowhere.pth"):
        find_alexnet_weights(no_download / "nowhere.pth")


def test_default_locations_are_found(no_download):
    cache = no_download / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / ALEXNET_FILENAME).touch()
    assert find_alexnet_weights() == cache / ALEXNET_FILENAME
    (no_download / "pretrained_models").mkdir()
    (no_download / "pretrained_models" / ALEXNET_FILENAME).touch()
    assert find_alexnet_weights().resolve() == (no_download / "pretrained_models" / ALEXNET_FILENAME).resolve()


def _reference_lpips(state: dict[str, torch.Tensor], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS v0.1 alex written out: torchvision AlexNet features + bundled linear weights."""
    alexnet = torchvision.models.alexnet(weights=None)
    alexnet.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if "features" in k})
    lins = torch.load(LPIPS_LIN_WEIGHTS, map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def features(images: torch.Tensor) -> list[torch.Tensor]:
        h, outputs = ((images * 2 - 1) - shift) / scale, []
        for index, layer in enumerate(alexnet.features):
            h = layer(h)
            if index in RELU_INDICES:
                outputs.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return outputs

    with torch.no_grad():
        total = torch.zeros(pred.shape[0])
        for k, (f0, f1) in enumerate(zip(features(pred), features(target))):
            total += F.conv2d((f0 - f1) ** 2, lins[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_loads_completely_and_matches_reference(no_download, alexnet_file, lpips_model):
    state, model = alexnet_file[1], lpips_model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    trunk = dict(model.net.named_parameters())
    assert len(trunk) == 10
    for name, param in trunk.items():
        index, kind = name.split(".")[1:]
        assert torch.equal(param, state[f"features.{index}.{kind}"]), name

    pred, target = _random_pair(batch=2, size=64, seed=5)
    values = lpips_distance(model, pred, target)
    assert values.shape == (2,)
    expected = _reference_lpips(state, pred, target)
    torch.testing.assert_close(values, expected, atol=1e-6, rtol=0)
    assert (values > 0).all() and abs(values[0] - values[1]) > 0
    assert lpips_distance(model, target, target).abs().max() < 1e-6


def test_lpips_reads_the_default_location(no_download):
    (no_download / "pretrained_models").mkdir()
    (no_download / "pretrained_models" / ALEXNET_FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"pretrained_models/{ALEXNET_FILENAME}: not a PyTorch checkpoint"):
        load_lpips_alex()


@pytest.mark.parametrize("corruption", ["missing", "shape", "not_tensors", "garbage"])
def test_corrupt_weights_name_the_file(no_download, alexnet_file, corruption):
    path, state = alexnet_file
    bad = no_download / f"bad_{corruption}.pth"
    if corruption == "missing":
        torch.save({k: v for k, v in state.items() if k != "features.0.weight"}, bad)
        match = "features.0.weight"
    elif corruption == "shape":
        torch.save({**state, "features.3.weight": torch.zeros(3, 3)}, bad)
        match = "features.3.weight"
    elif corruption == "not_tensors":
        torch.save({"features.0.weight": Path("x")}, bad)  # an object weights_only refuses to unpickle
        match = "refusing to load"
    else:
        bad.write_bytes(b"not a checkpoint")
        match = "not a PyTorch checkpoint"
    with pytest.raises(CheckpointError, match=match) as info:
        load_lpips_alex(bad)
    assert bad.name in str(info.value)


# ---------------------------------------------------------------------------------------------- all


def test_inpainting_metrics_without_lpips():
    pred, target = _random_pair(batch=2, size=16)
    metrics = InpaintingMetrics(metric_size=8)
    assert metrics.names == ["psnr", "ssim"]
    values = metrics(pred, target)
    assert list(values) == ["psnr", "ssim"]
    small_pred, small_target = resize_for_metrics(pred, 8), resize_for_metrics(target, 8)
    torch.testing.assert_close(values["psnr"], psnr(small_pred, small_target).float())
    torch.testing.assert_close(values["ssim"], ssim_gray(small_pred, small_target).float())
    for value in values.values():
        assert value.shape == (2,) and value.dtype == torch.float32 and value.device.type == "cpu"
        assert torch.isfinite(value).all()


def test_inpainting_metrics_with_lpips(lpips_model):
    metrics = InpaintingMetrics(lpips_model=lpips_model)
    assert metrics.names == ["psnr", "ssim", "lpips"]
    values = metrics(*_random_pair(batch=2, size=64))
    assert list(values) == ["psnr", "ssim", "lpips"]
    for value in values.values():
        assert value.shape == (2,) and value.dtype == torch.float32 and torch.isfinite(value).all()
