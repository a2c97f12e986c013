"""The NVS conditioner (pose token at index 74), the pose encoding, CFG dropout, LoRA through peft, and the
NVS pipeline's Python API, on the tiny random NVS model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from ldm.checkpoint import CheckpointError
from ldm.latent_diffusion import model_builder
from leftrefill.checkpoint_io import export_safetensors
from leftrefill.lora import LORA_TARGETS, add_lora, lora_layers, merge_lora
from leftrefill.model_dir import TOKEN_KEY, build_model, build_random, load_with_base, read_trained_file
from leftrefill.nvs_pipeline import NVSPipeline, encode_pose
from leftrefill.nvs_pose import pose_from_deltas, relative_pose
from leftrefill.pipeline import LeftRefillPipeline
from leftrefill.pose_prompt import NVS_INIT_TEXT, PosePromptCLIPEmbedder
from leftrefill.training_module import conditioning_dropout

TINY_NVS = ROOT / "checkpoints" / "tiny_random_nvs" / "model_config.yaml"
FULL_NVS = ROOT / "checkpoints" / "nvs_objaverse" / "model_config.yaml"
LORA = {"rank": 4, "alpha": 4.0}
POSE_A = torch.tensor([[0.1, 0.5, math.sqrt(0.75), 0.0]])
POSE_B = torch.tensor([[-0.3, -1.0, 0.0, 0.2]])


@pytest.fixture(scope="module")
def tiny():
    return build_random(model_builder(TINY_NVS)).eval()


def unet_output(model, context):
    generator = torch.Generator().manual_seed(0)
    x, c_concat = torch.randn(1, 4, 8, 16, generator=generator), torch.randn(1, 5, 8, 16, generator=generator)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500]), {"c_concat": c_concat, "c_crossattn": context})


# -- the pose --------------------------------------------------------------------------------------------------
def test_pose_of_two_cameras_equals_a_hand_computation():
    """Cameras with R = I sit at C = -t: (1, 0, 1) has polar 45 deg, azimuth 0, radius sqrt 2; (0, 2, 0) has
    polar 90 deg, azimuth 90 deg, radius 2."""
    cond = np.concatenate([np.eye(3), -np.array([[1.0], [0.0], [1.0]])], axis=1)
    target = np.concatenate([np.eye(3), -np.array([[0.0], [2.0], [0.0]])], axis=1)
    expected = [math.pi / 4, 1.0, 0.0, 2 - math.sqrt(2)]
    assert relative_pose(target, cond).tolist() == pytest.approx(expected, abs=1e-6)
    assert encode_pose(cameras=(cond, target)).tolist() == pytest.approx(expected, abs=1e-6)


def test_pose_from_deltas_in_degrees():
    assert pose_from_deltas(30, 90, 0.5).tolist() == pytest.approx([math.pi / 6, 1.0, 0.0, 0.5], abs=1e-6)
    assert pose_from_deltas(0, -90).tolist() == pytest.approx([0.0, -1.0, 0.0, 0.0], abs=1e-6)
    assert encode_pose(pose=(30, 90, 0.5)).tolist() == pose_from_deltas(30, 90, 0.5).tolist()
    with pytest.raises(ValueError, match="finite numbers"):
        pose_from_deltas(float("nan"), 0, 0)
    with pytest.raises(ValueError, match="exactly one of them"):
        encode_pose(pose=(0, 0, 0), cameras=(np.eye(3, 4), np.eye(3, 4)))
    with pytest.raises(ValueError, match=r"target_w2c must be one 3x4 .*got shape \(2, 3, 4\)"):
        encode_pose(cameras=(np.eye(3, 4), np.stack([np.eye(3, 4)] * 2)))
    assert pose_from_deltas(np.float32(30), np.int64(90)).tolist() == pose_from_deltas(30, 90).tolist()


# -- the conditioner -------------------------------------------------------------------------------------------
def test_full_size_conditioner_has_the_release_shapes():
    with torch.device("meta"):
        embedder = model_builder(FULL_NVS)().cond_stage_model
    assert isinstance(embedder, PosePromptCLIPEmbedder) and embedder.init_text == NVS_INIT_TEXT
    assert embedder.special_embeddings.weight.shape == (73, 1024) and embedder.pose_index == 74
    mlp = [(n, tuple(p.shape)) for n, p in embedder.pose_mlp.named_parameters()]
    assert mlp == [("0.weight", (512, 4)), ("0.bias", (512,)), ("2.weight", (1024, 512)), ("2.bias", (1024,))]
    trained = embedder.special_embeddings.weight.numel() + sum(p.numel() for p in embedder.pose_mlp.parameters())
    assert trained == 74_752 + 527_872  # METHOD 2.6: about 0.6 M parameters
    assert embedder.tokenize([embedder.prompt])[0, 74].item() == 49407  # the EOT slot after 73 tokens


def test_pose_token_is_written_at_index_74_before_the_transformer(tiny, monkeypatch):
    embedder = tiny.cond_stage_model
    seen = {}
    monkeypatch.setattr(embedder, "encode_embeddings", lambda embeddings: seen.setdefault("x", embeddings))
    embeddings = embedder.context({"pose": torch.cat([POSE_A, POSE_B])}, 2)
    tokens = embedder.embed_tokens(embedder.tokenize([embedder.prompt]))[0]  # (77, width)
    with torch.no_grad():
        pose_tokens = embedder.pose_mlp(torch.cat([POSE_A, POSE_B]))
    assert torch.equal(embeddings[:, 74], pose_tokens)
    keep = [i for i in range(77) if i != 74]
    assert torch.equal(embeddings[:, keep], tokens[keep].expand(2, -1, -1))


def test_context_changes_with_the_pose_from_index_74_on_and_the_unconditional_one_never(tiny):
    embedder = tiny.cond_stage_model
    with torch.no_grad():
        a, b = embedder.context({"pose": POSE_A}, 1), embedder.context({"pose": POSE_B}, 1)
        empty = embedder.empty_context(1)
    differs = (a - b).abs().amax(dim=-1)[0] > 0
    assert not differs[:74].any() and differs[74:].all()  # causal attention: positions before 74 cannot see it
    assert torch.equal(empty, embedder.encode([""]))
    assert not torch.equal(unet_output(tiny, a), unet_output(tiny, b))  # the UNet sees the pose


def test_dropped_items_get_the_empty_context_to_float_rounding(tiny):
    embedder = tiny.cond_stage_model
    with torch.no_grad():
        context = embedder.context({"pose": torch.cat([POSE_A, POSE_B])}, 2, drop=torch.tensor([False, True]))
        kept = embedder.context({"pose": POSE_A}, 1)
        empty = embedder.empty_context(1)
    torch.testing.assert_close(context[1:], empty, atol=1e-5, rtol=0)  # batched: ~1e-6 apart
    torch.testing.assert_close(context[:1], kept, atol=1e-5, rtol=0)


def test_conditioning_dropout_rate_is_the_configured_one():
    torch.manual_seed(0)
    drops = conditioning_dropout(40_000, 0.15, torch.device("cpu"))
    assert drops.dtype == torch.bool and abs(drops.float().mean().item() - 0.15) < 0.01  # 5.6 sigma
    assert conditioning_dropout(8, 0.0, torch.device("cpu")) is None


def test_training_loss_drops_the_conditioning_at_the_configured_rate(tiny, monkeypatch):
    from leftrefill.train_config import load_training_config
    from leftrefill.training_module import LeftRefillModule

    class Seen(Exception):
        pass

    def record(batch, n, drop=None):
        seen.update(pose=batch["pose"], n=n, drop=drop)
        raise Seen

    config = load_training_config(ROOT / "configs" / "tiny_nvs.yaml", ["model.cfg_dropout=0.5"])
    module = LeftRefillModule(build_random(model_builder(TINY_NVS)), config)
    seen = {}
    monkeypatch.setattr(module.model.cond_stage_model, "context", record)
    canvas, mask, pose = torch.zeros(2000, 3, 8, 16), torch.ones(2000, 1, 8, 16), torch.rand(2000, 4)
    monkeypatch.setattr(module.model, "encode_first_stage", lambda x: torch.zeros(x.shape[0], 4, 1, 2))
    monkeypatch.setattr(module.model, "concat_conditioning", lambda x, m: torch.zeros(x.shape[0], 5, 1, 2))
    torch.manual_seed(0)
    with pytest.raises(Seen):
        module.loss(canvas, mask, {"pose": pose})
    assert seen["n"] == 2000 and seen["pose"] is pose
    assert abs(seen["drop"].float().mean().item() - 0.5) < 0.05  # 4.5 sigma


def test_a_batch_without_a_pose_or_with_a_wrong_one_is_refused_clearly(tiny):
    embedder = tiny.cond_stage_model
    with pytest.raises(ValueError, match="conditions on the relative camera pose.*'pose' \\(B, 4\\)"):
        embedder.context({}, 1)
    with pytest.raises(ValueError, match=r"pose must have shape \(2, 4\) or \(4,\).*got \(2, 3\)"):
        embedder.context({"pose": torch.zeros(2, 3)}, 2)
    with pytest.raises(ValueError, match="finite"):
        embedder.context({"pose": torch.tensor([[float("nan"), 0, 1, 0]])}, 1)


# -- LoRA ----------------------------------------------------------------------------------------------------
def test_lora_wraps_every_attention_projection_and_the_geglu_input_projection():
    model = build_random(model_builder(TINY_NVS), adapter=LORA)
    unet = model.model.diffusion_model
    wrapped = sorted(n for n, m in unet.named_modules() if m in lora_layers(model))
    blocks = sorted({n.split(".transformer_blocks")[0] for n in wrapped})
    expected = sorted(f"{block}.transformer_blocks.0.{leaf}" for block in blocks
                      for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                   "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj"))
    assert wrapped == expected and len(blocks) == 7  # every transformer block of the tiny UNet
    layer = lora_layers(model)[0]
    assert layer.scaling["default"] == 1.0 and layer.r["default"] == 4  # alpha / rank = 1, the release's scale


def test_a_fresh_adapter_leaves_the_unet_unchanged_and_a_non_zero_one_changes_it(tiny):
    plain = unet_output(tiny, tiny.cond_stage_model.empty_context(1))
    model = build_random(model_builder(TINY_NVS))
    add_lora(model, LORA)  # B = 0
    assert torch.equal(unet_output(model, model.cond_stage_model.empty_context(1)), plain)
    livened = build_random(model_builder(TINY_NVS), adapter=LORA)  # same backbone, B != 0
    assert not torch.allclose(unet_output(livened, livened.cond_stage_model.empty_context(1)), plain, atol=1e-4)


def test_lora_merged_equals_unmerged():
    model = build_random(model_builder(TINY_NVS), adapter=LORA).eval()
    context = model.cond_stage_model.context({"pose": POSE_A}, 1)
    unmerged = unet_output(model, context)
    assert merge_lora(model) == 63
    torch.testing.assert_close(unet_output(model, context), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_target_pattern_matching_nothing_is_a_config_error():
    from ldm.util import ConfigError
    model = build_random(model_builder(TINY_NVS))
    with pytest.raises(ConfigError, match="target_modules"):
        add_lora(model, {"target_modules": r".*\.no_such_layer"})
    assert LORA_TARGETS.startswith(".*")


# -- the loader with adapters ------------------------------------------------------------------------------
def lora_checkpoint(tmp_path, model, *, shapes=None):
    """A training-like checkpoint of tokens + pose MLP + adapter with metadata naming the adapter."""
    state = {k: v.detach().clone() for k, v in model.named_parameters()
             if k == TOKEN_KEY or ".pose_mlp." in k or ".lora_" in k}
    for key, shape in (shapes or {}).items():
        state[key] = torch.zeros(shape)
    metadata = {"config": {"model": {"lora": LORA}}, "trainable": {"all": sorted(state)}, "base_checkpoint": None}
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": state, "leftrefill": metadata}, path)
    return path


def save_base(model, path):
    """The SD2-like base: everything but the conditioner's new modules (no adapter)."""
    state = {k: v for k, v in model.state_dict().items()
             if k != TOKEN_KEY and ".pose_mlp." not in k}
    torch.save({"state_dict": state}, path)
    return path


def test_an_adapter_checkpoint_loads_over_a_base_with_identical_outputs(tmp_path):
    trained = build_random(model_builder(TINY_NVS), adapter=LORA).eval()
    path = lora_checkpoint(tmp_path, trained)
    assert read_trained_file(path).adapter == {**LORA, "target_modules": LORA_TARGETS}
    base = save_base(build_random(model_builder(TINY_NVS)), tmp_path / "base.ckpt")
    loaded = load_with_base(model_builder(TINY_NVS), base, path)
    context = trained.cond_stage_model.context({"pose": POSE_A}, 1)
    torch.testing.assert_close(unet_output(loaded, context), unet_output(trained, context), atol=0, rtol=0)
    exported = export_safetensors(path, tmp_path / "lora.safetensors")
    again = build_model(model_builder(TINY_NVS), base_ckpt=base, trained=exported)
    torch.testing.assert_close(unet_output(again, context), unet_output(trained, context), atol=0, rtol=0)


def test_an_adapter_for_another_base_model_is_refused_naming_the_file(tmp_path):
    trained = build_random(model_builder(TINY_NVS), adapter=LORA)
    key = next(k for k, _ in trained.named_parameters() if "attn2.to_k.lora_A" in k)
    path = lora_checkpoint(tmp_path, trained, shapes={key: (4, 768)})  # SD1.5's 768-wide context
    base = save_base(build_random(model_builder(TINY_NVS)), tmp_path / "base.ckpt")
    with pytest.raises(CheckpointError, match=rf"lora.ckpt: '{key}' has shape \[4, 768\].*another model config"):
        load_with_base(model_builder(TINY_NVS), base, path)
    with pytest.raises(CheckpointError, match="lora.ckpt"):
        build_model(model_builder(TINY_NVS), trained=path, random_init=True)


# -- the pipeline -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nvs_pipe():
    return NVSPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random_nvs", random_init=True, test_size=64)


def object_image():
    image = np.zeros((96, 96, 4), np.uint8)
    image[20:76, 30:66] = (200, 40, 30, 255)
    image[20:40, 30:66] = (30, 60, 220, 255)
    return image


def test_nvs_pipeline_is_deterministic_and_the_pose_changes_the_view(nvs_pipe):
    first = nvs_pipe(object_image(), pose=(0, 90, 0), steps=2, seed=3)[0]
    again = nvs_pipe(object_image(), pose=(0, 90, 0), steps=2, seed=3)[0]
    turned = nvs_pipe(object_image(), pose=(0, -90, 0), steps=2, seed=3)[0]
    assert first.size == (64, 64) and np.array_equal(np.asarray(first), np.asarray(again))
    # measured 0.13 grey levels: one pose token of 77 moves a random tiny model little, but it moves it
    assert np.abs(np.asarray(first, float) - np.asarray(turned, float)).mean() > 0.05


def test_turntable_gives_one_view_per_azimuth_as_a_single_call_would(nvs_pipe):
    views = nvs_pipe.turntable(object_image(), num_views=4, steps=2, seed=5)
    single = nvs_pipe(object_image(), pose=(0, 180, 0), steps=2, seed=5 + 2)[0]  # view 2 is azimuth 180
    difference = np.abs(np.asarray(views[2], int) - np.asarray(single, int))
    assert len(views) == 4 and difference.max() <= 2  # batched vs single: float rounding, a level or two
    assert np.abs(np.asarray(views[0], int) - np.asarray(views[2], int)).mean() > 1
    with pytest.raises(ValueError, match="turntable takes no option num_samples"):
        nvs_pipe.turntable(object_image(), num_views=2, num_samples=2)


def test_the_two_pipelines_refuse_each_others_models(nvs_pipe):
    with pytest.raises(TypeError, match="NVSPipeline"):
        LeftRefillPipeline(nvs_pipe.model)
    with pytest.raises(TypeError, match="PosePromptCLIPEmbedder"):
        NVSPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random", random_init=True, test_size=64)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 3.0), ("fp16", 1.0)])
def test_half_precision_pipelines_run_and_stay_near_float32(nvs_pipe, precision, tolerance):
    """The pose MLP, the text encoder and the UNet in bf16 / fp16 (the GPU default is fp16): the pose is cast
    to the MLP's dtype and the result comes back as float32. Measured on the tiny model: 0.63 (bf16) and 0.08
    (fp16) grey levels of mean difference from float32."""
    half = NVSPipeline.from_model_dir(ROOT / "checkpoints" / "tiny_random_nvs", random_init=True, test_size=64,
                                      precision=precision)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    full = np.asarray(nvs_pipe(object_image(), pose=(0, 90, 0), steps=3, seed=1)[0], float)
    reduced = np.asarray(half(object_image(), pose=(0, 90, 0), steps=3, seed=1)[0], float)
    assert np.abs(full - reduced).mean() < tolerance
