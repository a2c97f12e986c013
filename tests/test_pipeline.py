"""LeftRefillPipeline on a tiny model directory: loading, geometry, guidance, seeds, precision, bad input."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from ldm.checkpoint import CheckpointError
from ldm.guidance import ClassifierFreeGuidance
from ldm.sampling import ddim_timesteps, sample_ddim
from ldm.util import ConfigError
from leftrefill import LeftRefillPipeline
from ldm.fill import composite_hard as composite
from leftrefill.canvas import canvas_mask, right_half, stitch
from leftrefill.model_dir import TOKEN_KEY

TINY_MODEL_CONFIG = ROOT / "checkpoints" / "tiny_random" / "model_config.yaml"
SIZE = 64  # test_size: latent 8 x 16


def save_tokens(path, tokens: torch.Tensor) -> None:
    """A token checkpoint as Lightning writes it (trainer state beside the one tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 7, "global_step": 6040, "state_dict": {TOKEN_KEY: tokens},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(6040.0)}}}]}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_state_dict):
    """A base checkpoint (the perturbed tiny SD2 model) and a model directory in the official layout."""
    root = tmp_path_factory.mktemp("pipeline")
    base = root / "512-inpainting-ema.ckpt"
    torch.save({"state_dict": tiny_state_dict}, base)
    model_dir = root / "check_points" / "ref_guided_inpainting"
    model_dir.mkdir(parents=True)
    shutil.copy(TINY_MODEL_CONFIG, model_dir / "model_config.yaml")
    tokens = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))
    save_tokens(model_dir / "ckpts" / "epoch=7-step=6039.ckpt", tokens)
    return base, model_dir, tokens


@pytest.fixture(scope="module")
def pipe(files) -> LeftRefillPipeline:
    base, model_dir, _ = files
    return LeftRefillPipeline.from_model_dir(model_dir, base, device="cpu", precision="fp32", test_size=SIZE)


def random_views(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    target = torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[:, :, 16:40, 8:48] = 1
    return reference, target, mask


class CountingModel:
    """Wraps ``apply_model`` to record the batch size and concat channels of every UNet call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __enter__(self):
        original = self.model.apply_model

        def counted(x, t, cond):
            self.calls.append((x.shape[0], cond["c_concat"].clone()))
            return original(x, t, cond)

        self.model.apply_model = counted
        return self

    def __exit__(self, *exc):
        del self.model.apply_model


# -- loading ------------------------------------------------------------------------------------------
def test_base_and_tokens_load_exactly_in_the_official_layout(files, pipe, tiny_state_dict):
    _, _, tokens = files
    state = pipe.model.state_dict()
    assert torch.equal(state[TOKEN_KEY], tokens)
    for key, value in tiny_state_dict.items():
        assert torch.equal(state[key], value), key


def test_a_token_file_inside_a_model_directory_works_as_model_path(files):
    base, model_dir, tokens = files
    pipe = LeftRefillPipeline.from_model_dir(model_dir / "ckpts" / "epoch=7-step=6039.ckpt", base, device="cpu",
                                             precision="fp32", test_size=SIZE)
    assert torch.equal(pipe.model.cond_stage_model.special_embeddings.weight, tokens)


@pytest.mark.parametrize("shape, message", [((40, 64), "holds 40 tokens of width 64, but the model config expects 50 "
                                                       "tokens of width 64"),
                                            ((50, 32), "holds 50 tokens of width 32")])
def test_token_checkpoint_of_another_shape_names_file_and_counts(tmp_path, files, shape, message):
    base, model_dir, _ = files
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    bad = other / "ckpts" / "epoch=7-step=6039.ckpt"
    save_tokens(bad, torch.zeros(shape))
    with pytest.raises(CheckpointError, match=message) as info:
        LeftRefillPipeline.from_model_dir(other, base, device="cpu", precision="fp32")
    assert str(bad) in str(info.value)


def test_missing_base_checkpoint_says_where_to_get_it(files, tmp_path):
    _, model_dir, _ = files
    with pytest.raises(CheckpointError, match="base SD2 checkpoint not found.*pretrained_models/README.md.*--random_init"):
        LeftRefillPipeline.from_model_dir(model_dir, tmp_path / "nothing.ckpt", device="cpu")


def test_model_directory_problems_are_named(files, tmp_path):
    base, model_dir, _ = files
    with pytest.raises(FileNotFoundError, match="no model_config.yaml"):
        LeftRefillPipeline.from_model_dir(tmp_path, base)
    with pytest.raises(CheckpointError, match="no token weights.*--random_init"):
        LeftRefillPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random", base)
    several = tmp_path / "several"
    shutil.copytree(model_dir, several)
    save_tokens(several / "ckpts" / "other.ckpt", torch.zeros(50, 64))
    with pytest.raises(FileNotFoundError, match="(?s)several token checkpoints and neither.*index.json.*"
                                                "last.ckpt.*other.ckpt"):
        LeftRefillPipeline.from_model_dir(several, base)
    save_tokens(several / "ckpts" / "last.ckpt", torch.full((50, 64), 0.5))  # a run directory: the newest state
    pipe = LeftRefillPipeline.from_model_dir(several, base, device="cpu", precision="fp32", test_size=64)
    assert pipe.loaded["prompt_tokens"] == str(several / "ckpts" / "last.ckpt")
    assert pipe.model.cond_stage_model.special_embeddings.weight.eq(0.5).all()


def test_the_official_release_config_gets_a_hint(files, tmp_path):
    base, model_dir, _ = files
    official = tmp_path / "official"
    shutil.copytree(model_dir, official)
    (official / "model_config.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentInpaintDiffusion\n  params: {}\n")
    with pytest.raises(ConfigError, match="official LeftRefill release's config"):
        LeftRefillPipeline.from_model_dir(official, base)


# -- geometry and guidance ----------------------------------------------------------------------------
def test_mask_channel_is_zero_on_the_reference_half_and_one_call_per_step(pipe):
    reference, target, mask = random_views(batch=2)
    with CountingModel(pipe.model) as counter:
        pipe.inpaint(reference, target, mask, steps=3, cfg=2.5, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert [batch for batch, _ in counter.calls] == [4, 4, 4]  # CFG pair x 2 items, one call per step
    c_concat = counter.calls[0][1]  # (2B, 5, 8, 16): mask, then the masked-canvas latent
    assert c_concat.shape == (4, 5, SIZE // 8, 2 * SIZE // 8)
    assert c_concat[:, 0, :, : SIZE // 8].abs().max() == 0
    assert c_concat[:, 0, :, SIZE // 8:].sum() > 0
    assert torch.equal(c_concat[:2], c_concat[2:])  # both guidance branches share the concat channels


def test_unmasked_pixels_are_the_target_exactly(pipe):
    reference, target, mask = random_views()
    filled = pipe.inpaint(reference, target, mask, steps=2, generator=torch.Generator().manual_seed(0))
    keep = mask.expand_as(target) < 0.5
    assert torch.equal(filled[keep], target[keep])
    assert (filled[~keep] != target[~keep]).float().mean() > 0.99


def test_cfg_scale_one_equals_the_conditional_branch_alone(pipe):
    reference, target, mask = random_views()
    ours = pipe.inpaint(reference, target, mask, steps=3, cfg=1.0, eta=0.0, generator=torch.Generator().manual_seed(5))
    # The same computation written out with the conditional context only.
    model = pipe.model
    canvas, fill = stitch(reference, target), canvas_mask(mask)
    generator = torch.Generator().manual_seed(5)
    cond = {"c_concat": model.concat_conditioning(canvas, fill, generator),
            "c_crossattn": model.get_learned_conditioning([model.cond_stage_model.prompt] * 2)}
    x_T = torch.randn(2, 4, SIZE // 8, 2 * SIZE // 8, generator=generator)
    latent = sample_ddim(lambda x, t: model.apply_model(x, t, cond), x_T, model.alphas_cumprod, ddim_timesteps(3))
    expected = right_half(composite(model.decode_first_stage(latent), canvas, fill))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    guided = pipe.inpaint(reference, target, mask, steps=3, cfg=2.5, eta=0.0, generator=torch.Generator().manual_seed(5))
    assert (guided - ours).abs().max() > 1e-3  # the unconditional branch matters at scale 2.5


def test_guidance_unconditional_context_is_the_empty_string(pipe):
    reference, target, mask = random_views(batch=1)
    captured = {}
    original = ClassifierFreeGuidance.__init__

    def spy(self, model_fn, cond, uncond, scale):
        captured.update(cond=cond, uncond=uncond)
        original(self, model_fn, cond, uncond, scale)

    ClassifierFreeGuidance.__init__ = spy
    try:
        pipe.inpaint(reference, target, mask, steps=1)
    finally:
        ClassifierFreeGuidance.__init__ = original
    embedder = pipe.model.cond_stage_model
    assert torch.equal(captured["uncond"]["c_crossattn"], embedder.encode([""]))
    assert torch.equal(captured["cond"]["c_crossattn"], embedder.encode([embedder.prompt]))


# -- seeds --------------------------------------------------------------------------------------------
def photo_like(h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_same_seed_same_output_and_sample_k_uses_seed_plus_k(pipe):
    reference, target = photo_like(80, 120, 0), photo_like(70, 110, 1)
    mask = np.zeros((70, 110), dtype=bool)
    mask[10:40, 30:90] = True
    first = pipe(reference, target, mask, steps=2, seed=7, num_samples=2)
    again = pipe(reference, target, mask, steps=2, seed=7, num_samples=2)
    single = pipe(reference, target, mask, steps=2, seed=8)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert np.abs(np.asarray(single[0]).astype(int) - np.asarray(first[1]).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_output_has_the_target_size_and_keeps_every_unmasked_pixel(pipe):
    reference, target = photo_like(50, 90, 2), photo_like(70, 110, 3)  # neither square nor test_size
    mask = np.zeros((70, 110), dtype=bool)
    mask[5:30, 60:100] = True
    mask[50, 7] = True  # a single pixel far below the test-size grid: still filled
    [out] = pipe(Image.fromarray(reference), Image.fromarray(target), mask * 255, steps=2, seed=0)
    out = np.asarray(out)
    assert out.shape == target.shape
    assert np.array_equal(out[~mask], target[~mask])
    assert (out[mask] != target[mask]).any(axis=-1).mean() > 0.9


def test_empty_mask_returns_the_target_unchanged_and_says_so(pipe, caplog):
    target = photo_like(40, 60, 4)
    with caplog.at_level(logging.WARNING, logger="leftrefill"):
        [out] = pipe(photo_like(40, 60, 5), target, np.zeros((40, 60), dtype=np.uint8), steps=2)
    assert np.array_equal(np.asarray(out), target)
    assert "mask is empty" in caplog.text


def test_mask_of_another_size_is_resized_and_reported(pipe, caplog):
    target = photo_like(60, 90, 6)
    mask = np.zeros((30, 45), dtype=bool)
    mask[10:20, 10:30] = True
    with caplog.at_level(logging.WARNING, logger="leftrefill"):
        [out] = pipe(photo_like(60, 90, 7), target, mask, steps=2)
    assert "mask is 45x30 but the target is 90x60" in caplog.text
    hole = np.kron(mask, np.ones((2, 2), dtype=bool))
    assert np.array_equal(np.asarray(out)[~hole], target[~hole])


def test_bad_image_input_names_the_argument(pipe, tmp_path):
    with pytest.raises(ValueError, match="reference: file not found"):
        pipe(tmp_path / "missing.jpg", photo_like(8, 8, 0), np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="target: float arrays must hold values in \\[0, 1\\]"):
        pipe(photo_like(8, 8, 0), np.full((8, 8, 3), 2.0), np.ones((8, 8), bool))


# -- precision ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_runs_and_stays_close_to_fp32(files, pipe, precision):
    base, model_dir, _ = files
    half = LeftRefillPipeline.from_model_dir(model_dir, base, device="cpu", precision=precision, test_size=SIZE)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    reference, target, mask = random_views(batch=1)
    kwargs = dict(steps=2, eta=0.0)
    low = half.inpaint(reference, target, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    ref = pipe.inpaint(reference, target, mask, generator=torch.Generator().manual_seed(0), **kwargs)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().mean() < 0.05


def test_shipped_model_directory_fits_the_released_tokens():
    """The full-size config, built on the meta device (no memory), has exactly one parameter outside the
    SD2 checkpoint, the token table, and it has the released tokens' shape."""
    from ldm.latent_diffusion import model_builder
    from ldm.schedule import SCHEDULE_BUFFERS
    from leftrefill.model_dir import read_prompt_tokens, resolve_model_dir

    shipped = resolve_model_dir(ROOT / "checkpoints" / "ref_guided_inpainting")
    assert shipped.weights.name == "epoch=7-step=6039.ckpt"
    with torch.device("meta"):
        model = model_builder(shipped.config)()
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")
    outside_sd2 = [k for k in model.state_dict() if not k.startswith(prefixes) and k not in SCHEDULE_BUFFERS]
    assert outside_sd2 == [TOKEN_KEY]
    tokens = read_prompt_tokens(shipped.weights, tuple(model.cond_stage_model.special_embeddings.weight.shape))
    assert tokens[TOKEN_KEY].shape == (50, 1024)
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == 865_925_124


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be an integer in [1, 999], got 0"),
    ({"cfg": float("nan")}, "cfg must be a finite number >= 0, got nan"),
    ({"cfg": float("inf")}, "cfg must be a finite number >= 0, got inf"),
    ({"eta": -0.5}, "eta must be a finite number >= 0, got -0.5"),
    ({"seed": -1}, "seed must be an integer in [0, 9223372036854775807], got -1"),
    ({"seed": 2**63 - 1, "num_samples": 2}, "seed must be an integer in [0, 9223372036854775806] so that seed + 1"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
])
def test_bad_sampling_options_get_one_clear_error_before_any_work(pipe, options, message):
    reference, target, mask = (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8),
                               np.full((32, 32), 255, np.uint8))
    with pytest.raises(ValueError) as info:
        pipe(reference, target, mask, **options)
    assert str(info.value).startswith(message)
    if "num_samples" not in options and "seed" not in options:
        with pytest.raises(ValueError, match=re.escape(message)):
            pipe.inpaint(*random_views(batch=1), **options)
