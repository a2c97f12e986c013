"""Behaviour of the latent-diffusion modules: inpainting conditioning, loss, self-attention regrouping,
gradient checkpointing and mixed precision."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ldm.attention import BasicTransformerBlock, ConcatTargetGrouping, ViewGrouping


def inputs(batch=2, h=8, w=16, context_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 9, h, w, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, context_dim, generator=g))


def test_concat_conditioning_is_mask_then_masked_image_latent(tiny_model):
    image = torch.rand(1, 3, 64, 128) * 2 - 1
    mask = torch.zeros(1, 1, 64, 128)
    mask[..., 8:40, 72:120] = 1
    generator = torch.Generator().manual_seed(0)
    c_concat = tiny_model.concat_conditioning(image, mask, generator)
    assert c_concat.shape == (1, 5, 8, 16)
    assert torch.equal(c_concat[:, :1], F.interpolate(mask, size=(8, 16), mode="nearest"))
    masked = image * (mask < 0.5)
    expected = tiny_model.encode_first_stage(masked, torch.Generator().manual_seed(0))
    assert torch.equal(c_concat[:, 1:], expected)


def test_posterior_is_sampled_per_generator(tiny_model):
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    a = tiny_model.encode_first_stage(image, torch.Generator().manual_seed(1))
    b = tiny_model.encode_first_stage(image, torch.Generator().manual_seed(1))
    c = tiny_model.encode_first_stage(image, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_training_loss_is_eps_mse(tiny_model):
    x0 = torch.randn(2, 4, 8, 16)
    cond = {"c_concat": torch.randn(2, 5, 8, 16), "c_crossattn": torch.randn(2, 77, 64)}
    t, noise = torch.tensor([0, 999]), torch.randn(2, 4, 8, 16)
    with torch.no_grad():
        loss = tiny_model.training_loss(x0, cond, t=t, noise=noise)
        x_t = tiny_model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0 + \
            tiny_model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
        expected = ((tiny_model.apply_model(x_t, t, cond) - noise) ** 2).mean()
        # multi-view reduced_loss (METHOD 3.2): only the kept items' elements are averaged
        kept = tiny_model.training_loss(x0, cond, t=t, noise=noise, items=torch.tensor([False, True]))
        expected_kept = ((tiny_model.apply_model(x_t, t, cond)[1] - noise[1]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert kept.item() == pytest.approx(expected_kept.item(), rel=1e-6)
    assert kept.item() != pytest.approx(loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="items must be a"):
        tiny_model.training_loss(x0, cond, t=t, noise=noise, items=torch.tensor([False, False]))


def test_unet_rejects_latent_not_divisible_by_its_depth(tiny_model):
    x, t, context = inputs(h=9)
    with pytest.raises(ValueError, match=r"spatial size \(9, 16\) is not divisible by 2"):
        tiny_model.model.diffusion_model(x, t, context)


def test_view_grouping_equals_joint_attention_over_views():
    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=32, heads=2, dim_head=16, context_dim=8).eval()
    x = torch.randn(4, 6, 32)  # (b*v, h*w, c) with b = 2 samples of v = 2 views
    context = torch.randn(4, 5, 8)
    block.self_attention_grouping = ViewGrouping(num_views=2)
    with torch.no_grad():
        grouped = block(x, context, (2, 3))
        # Reference: run the views of each sample through attn1 as one sequence by hand.
        joint = block.attn1(block.norm1(x).reshape(2, 12, 32)).reshape(4, 6, 32)
        h = x + joint
        h = h + block.attn2(block.norm2(h), context=context)
        expected = h + block.ff(block.norm3(h))
    assert torch.allclose(grouped, expected, atol=1e-6)
    block.self_attention_grouping = None
    with torch.no_grad():
        assert not torch.allclose(block(x, context, (2, 3)), grouped, atol=1e-3)  # views do interact


def test_block_causal_attention_view_by_view_equals_the_masked_joint_attention():
    """The causal grouping attends view by view over the growing prefix; that must be the joint attention under
    the block lower-triangular mask (METHOD 3.3), written here with an explicit boolean mask."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(dim=32, heads=2, dim_head=16, context_dim=8).eval()
    for parameter in block.norm1.parameters():
        torch.nn.init.normal_(parameter)  # not the identity, so that the norm's place is tested too
    x = torch.randn(6, 5, 32)  # (b*v, h*w, c): b = 2 samples of v = 3 views, 5 tokens each
    view = torch.arange(3).repeat_interleave(5)
    mask = view[:, None] >= view[None, :]  # (15, 15), True = may attend
    grouped = x.reshape(2, 15, 32)
    with torch.no_grad():
        expected = (block.attn1(block.norm1(grouped), attn_mask=mask) + grouped).reshape(6, 5, 32)
        causal = ViewGrouping(num_views=3, causal=True).residual_attention(block.attn1, block.norm1, x, (1, 5))
        joint = ViewGrouping(num_views=3).residual_attention(block.attn1, block.norm1, x, (1, 5))
    assert torch.allclose(causal, expected, atol=1e-5)
    assert not torch.allclose(joint, expected, atol=1e-3)  # the mask matters
    assert torch.allclose(joint[2::3], expected[2::3], atol=1e-5)  # the last view sees every view either way


def test_concat_target_grouping_is_one_target_copy_then_the_reference_halves():
    """METHOD 3.1 concat_target: canvases [reference_i | target] of a 2 x 4 feature map (h = 2, w = 2 per half);
    the sequence is view 0's target half then each reference half, and the target's output returns to every
    canvas's right half."""
    grouping = ConcatTargetGrouping(num_views=2)
    x = torch.arange(2 * 2 * 8 * 3, dtype=torch.float32).reshape(4, 8, 3)  # (b*v, h*2w, c), b = 2
    grid = x.reshape(4, 2, 4, 3)  # (b*v, h, 2w, c)
    grouped = grouping.group(x, (2, 4))
    assert grouped.shape == (2, 3 * 4, 3)
    left, right = grid[:, :, :2].reshape(4, 4, 3), grid[:, :, 2:].reshape(4, 4, 3)
    assert torch.equal(grouped[0], torch.cat([right[0], left[0], left[1]]))
    assert torch.equal(grouped[1], torch.cat([right[2], left[2], left[3]]))
    back = grouping.ungroup(grouped, (2, 4)).reshape(4, 2, 4, 3)
    assert torch.equal(back[[0, 2]], grid[[0, 2]])  # view 0 of each sample comes back as it was
    assert torch.equal(back[1, :, 2:], grid[0, :, 2:]) and torch.equal(back[1, :, :2], grid[1, :, :2])
    with pytest.raises(ValueError, match="width 3 cannot be split"):
        grouping.group(torch.zeros(2, 6, 3), (2, 3))
    # the residual goes through the merged sequence: every canvas then holds view 0's target half exactly
    block = BasicTransformerBlock(dim=3, heads=1, dim_head=4, context_dim=8).eval()
    with torch.no_grad():
        out = grouping.residual_attention(block.attn1, block.norm1, x, (2, 4)).reshape(4, 2, 4, 3)
    assert torch.equal(out[1, :, 2:], out[0, :, 2:]) and torch.equal(out[3, :, 2:], out[2, :, 2:])
    assert not torch.allclose(out[1, :, :2], out[0, :, :2])


def test_block_causal_grouping_leaves_first_view_independent_of_later_ones(tiny_model):
    unet = copy.deepcopy(tiny_model.model.diffusion_model)
    x, t, context = inputs(batch=2)
    x, t, context = x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), context[:1].repeat(2, 1, 1)
    x[1] = torch.randn_like(x[1])  # view 1 differs; view 0 must not notice it
    with torch.no_grad():
        alone = unet(x[:1], t[:1], context[:1])
        with unet.self_attention_grouping(ViewGrouping(num_views=2, causal=True)):
            causal = unet(x, t, context)
        with unet.self_attention_grouping(ViewGrouping(num_views=2)):
            full = unet(x, t, context)
    assert torch.allclose(causal[:1], alone, atol=1e-5)
    assert not torch.allclose(full[:1], alone, atol=1e-3)


def context_gradient(unet, inputs, use_checkpoint: bool, grouping=None) -> torch.Tensor:
    """d mean(unet(x)^2) / d context (prompt tuning: only the context needs gradients). With a grouping, the
    forward pass runs inside ``self_attention_grouping`` and backward after it, as under Lightning."""
    x, t, context = inputs
    for module in unet.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = use_checkpoint
    context = context.clone().requires_grad_(True)
    with unet.self_attention_grouping(grouping):
        loss = unet(x, t, context).square().mean()
    loss.backward()
    return context.grad


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius): the gradients of a tiny random UNet are ~1e-6, too small for an atol."""
    return ((a - b).norm() / b.norm()).item()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    unet = copy.deepcopy(tiny_model.model.diffusion_model).requires_grad_(False)
    plain, checkpointed = (context_gradient(unet, inputs(), use_checkpoint) for use_checkpoint in (False, True))
    assert plain.abs().sum() > 0
    assert relative_difference(checkpointed, plain) < 1e-4


def test_checkpointed_blocks_recompute_with_the_grouping_of_their_forward_pass(tiny_model):
    """Lightning runs backward after training_step, outside the ``with`` that grouped the views: a checkpointed
    block must recompute with the forward pass's grouping, or its gradients would be those of another model."""
    unet = copy.deepcopy(tiny_model.model.diffusion_model).requires_grad_(False)
    causal = ViewGrouping(num_views=2, causal=True)
    plain, checkpointed = (context_gradient(unet, inputs(), use_checkpoint, causal) for use_checkpoint in (False, True))
    ungrouped = context_gradient(unet, inputs(), True)
    assert relative_difference(checkpointed, plain) < 1e-4
    assert relative_difference(ungrouped, checkpointed) > 1e-2  # the grouping does change the gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_and_vae_are_finite_and_close_under_autocast(tiny_model, dtype):
    x, t, context = inputs()
    with torch.no_grad():
        reference = tiny_model.model.diffusion_model(x, t, context)
        with torch.autocast("cpu", dtype=dtype):
            low = tiny_model.model.diffusion_model(x, t, context * 30)  # large context: attention logits stress
            mixed = tiny_model.model.diffusion_model(x, t, context)
            decoded = tiny_model.first_stage_model.decode(torch.randn(1, 4, 8, 8) * 3)
    assert torch.isfinite(low).all() and torch.isfinite(decoded).all()
    relative = (mixed.float() - reference).norm() / reference.norm()
    assert relative < 0.05


def test_text_encoder_is_frozen_and_vae_has_no_trainable_parameters(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.cond_stage_model.parameters())
    assert not any(p.requires_grad for p in tiny_model.first_stage_model.parameters())
