"""Filling the masked part of an image with an SD2-inpainting model: the one sampling core of every method.

A method adapts its inputs to this core and back: LeftRefill stitches ``[reference | target]`` and gives its
prompt-token context; RealFill gives a single image and its personalised prompt. The core knows nothing of
either. One call:

1. the inpainting inputs: ``c_concat`` = cat(mask on the latent grid, VAE latent of image * (mask < 0.5));
2. the denoiser: the conditional branch alone at guidance 1, else classifier-free guidance over per-sample
   ``(cond, uncond)`` contexts, both branches in one batched UNet call;
3. the start: pure noise x_T, or with ``strength`` < 1 the VAE latent of ``image`` noised to the first of the
   remaining timesteps (SDEdit, Meng et al. 2022), running only those;
4. the sampler (``ldm.sampling``) over the model's float64 schedule; for a multi-view batch (``views``) with
   its joint self-attention installed for the call, optionally with known views (``known_views``) or
   canvases sharing a region (``shared_region``), see ``ldm.view_sampling``;
5. decoding and compositing into ``image``: hard (generated pixels where mask = 1, the image's pixels exactly
   elsewhere), soft (RealFill: alpha = the mask dilated by 3 x 3 and box-blurred with radius 1), or none
   (the decoded image everywhere: novel view synthesis).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.attention import SelfAttentionGrouping
from ldm.guidance import ClassifierFreeGuidance
from ldm.noise import Generators, randn
from ldm.sampling import default_timesteps, get_sampler
from ldm.view_sampling import KnownViews, SharedRegion, generators_of


@dataclass(frozen=True)
class Conditioning:
    """Per-sample text conditioning: ``cond`` (B, L, C); ``uncond`` (B, L, C), or None when the method
    samples without guidance (then only guidance 1 is possible)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None


def composite_hard(generated: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Generated pixels where mask > 0.5, the image's pixels (exactly) elsewhere. All (B, C, H, W)."""
    return torch.where(mask > 0.5, generated, image)


def soft_alpha(mask: torch.Tensor) -> torch.Tensor:
    """RealFill's compositing alpha (METHOD 5.1): the binary mask (B, 1, H, W) dilated with a 3 x 3 max filter,
    then box-blurred with radius 1 (a 3 x 3 mean; at the border over the pixels inside). In [0, 1]."""
    dilated = F.max_pool2d((mask > 0.5).float(), kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(dilated, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def composite_soft(generated: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """alpha * generated + (1 - alpha) * image with alpha = :func:`soft_alpha` (mask)."""
    alpha = soft_alpha(mask).to(generated.dtype)
    return alpha * generated + (1 - alpha) * image


def composite_none(generated: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The decoded image as it is, everywhere (NVS scores the whole generated view, METHOD 2.5)."""
    return generated


COMPOSITES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hard": composite_hard, "soft": composite_soft, "none": composite_none}


@torch.no_grad()
def fill(model, image: torch.Tensor, mask: torch.Tensor, conditioning: Conditioning, *, sampler: str = "ddim",
         steps: int = 50, guidance: float = 1.0, strength: float = 1.0, composite: str = "hard",
         generator: Generators = None, progress: bool = False, views: SelfAttentionGrouping | None = None,
         known_views: int = 0, shared_region: SharedRegion | None = None, **sampler_options) -> torch.Tensor:
    """Fill ``mask`` in ``image`` with ``model`` (an ``ldm.latent_diffusion.LatentInpaintDiffusion``).

    image: (B, 3, H, W) in [-1, 1], H and W multiples of 8; mask: (B, 1, H, W), 1 = fill (binarised at 0.5).
    conditioning: contexts of batch B. sampler: a name of ``ldm.sampling.SAMPLERS``, with its own options
    (``eta`` for DDIM); steps: the sampler's number of steps for strength 1. strength in (0, 1]: the
    fraction of those steps run, from the noised latent of ``image`` (1 = from pure noise).
    generator: one, or one per item (item i's result then does not depend on the batch).
    views: a self-attention regrouping (ldm.attention.ViewGrouping: the batch holds samples of v views,
    flattened as (b*v), and each self-attention sees all views of a sample), installed on the UNet for this
    call only. known_views: with ``views``, the first ``known_views`` views of every sample are known
    (``image`` holds them; their mask still goes to the model as in training) and only the others are
    sampled (ldm.view_sampling.KnownViews); the known views are returned as given. shared_region: groups of
    consecutive items that share one latent inside a region (ldm.view_sampling.SharedRegion). The model is
    not changed (no casts, no train/eval switch, no grouping left behind). Returns the composited image
    (B, 3, H, W), float32, not clamped.
    """
    if composite not in COMPOSITES:
        raise ValueError(f"composite must be one of {', '.join(COMPOSITES)}, got {composite!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if guidance != 1 and conditioning.uncond is None:
        raise ValueError(f"guidance {guidance} needs an unconditional context; this conditioning has none")
    if known_views and (views is None or not 0 < known_views < views.num_views):
        raise ValueError(f"known_views={known_views} needs a multi-view grouping (views) with more views than that")
    if known_views and shared_region is not None:
        raise ValueError("known_views and shared_region cannot be combined (a region is shared over the whole batch)")
    param = next(model.model.parameters())
    dtype = param.dtype
    image, mask = image.to(param.device, torch.float32), (mask.to(param.device, torch.float32) > 0.5).float()
    if shared_region is not None:
        generator = shared_region.generators(generator, image.shape[0])  # one noise per group
    # 1. inpainting inputs
    c_concat = model.concat_conditioning(image.to(dtype), mask.to(dtype), generator)  # (B, 5, H/8, W/8)
    # 2. denoiser: the UNet in the model's dtype; sampler arithmetic and the guidance mix in float32
    denoise = _denoiser(model, c_concat, conditioning, guidance, dtype)
    schedule = model.sampling_schedule()  # (T,) float64
    sampled = torch.arange(image.shape[0])
    if known_views:  # the sampler walks the other views; the known ones enter noised to each step's t
        known = _known_views(model, image, views.num_views, known_views, schedule, generator, dtype)
        denoise, sampled = known.wrap(denoise), known.sampled_index
    if shared_region is not None:
        denoise = shared_region.wrap(denoise)
    sampled_image, sampled_generator = image[sampled.to(image.device)], generators_of(generator, sampled)
    # 3. timesteps and the start
    timesteps = default_timesteps(sampler, steps, model.num_timesteps)
    if strength < 1:
        timesteps, x = _sdedit_start(model, sampled_image, timesteps, strength, schedule, sampled_generator, dtype)
    else:  # x_T ~ N(0, 1), float32
        x = randn((len(sampled), 4, *c_concat.shape[-2:]), sampled_generator, image)
    if shared_region is not None:
        x = shared_region.start(x)
    # 4. sample (a multi-view batch: its joint self-attention for this call only)
    unet = model.model.diffusion_model
    with unet.self_attention_grouping(views) if views is not None else contextlib.nullcontext():
        latent = get_sampler(sampler)(denoise, x, schedule, timesteps, generator=sampled_generator,
                                      progress=progress, **sampler_options)
    # 5. decode and composite (known views come back as given)
    decoded = model.decode_first_stage(latent.to(dtype)).float()  # (B', 3, H, W), about [-1, 1]
    filled = COMPOSITES[composite](decoded, sampled_image, mask[sampled.to(mask.device)])
    if len(sampled) == image.shape[0]:
        return filled
    return image.index_copy(0, sampled.to(image.device), filled)


def _known_views(model, image: torch.Tensor, num_views: int, known: int, schedule: torch.Tensor,
                 generator: Generators, dtype: torch.dtype) -> KnownViews:
    """The known views' clean latents (posterior samples) and their fixed noise, drawn once."""
    known_index, _ = KnownViews.split_index(image.shape[0], num_views, known)
    known_generator = generators_of(generator, known_index)
    clean = model.encode_first_stage(image[known_index.to(image.device)].to(dtype), known_generator).float()
    noise = randn(clean.shape, known_generator, clean)
    return KnownViews(num_views, known, clean, noise, schedule)


def _denoiser(model, c_concat: torch.Tensor, conditioning: Conditioning, guidance: float, dtype: torch.dtype):
    def eps_float32(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.apply_model(x.to(dtype), t, cond).float()

    cond = {"c_concat": c_concat, "c_crossattn": conditioning.cond}
    if conditioning.uncond is None:
        return lambda x, t: eps_float32(x, t, cond)
    uncond = {"c_concat": c_concat, "c_crossattn": conditioning.uncond}
    return ClassifierFreeGuidance(eps_float32, cond, uncond, scale=guidance)


def _sdedit_start(model, image: torch.Tensor, timesteps: torch.Tensor, strength: float, schedule: torch.Tensor,
                  generator: Generators, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest ``int(len(timesteps) * strength)`` timesteps (as diffusers' img2img) and the VAE latent of
    ``image`` noised to the highest of them: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    kept = int(len(timesteps) * strength)
    if kept < 1:
        raise ValueError(f"strength {strength} of {len(timesteps)} steps runs no step; raise strength or steps")
    timesteps = timesteps[:kept]
    x0 = model.encode_first_stage(image.to(dtype), generator).float()  # (B, 4, H/8, W/8)
    abar = schedule[int(timesteps[-1])].item()
    noise = randn(x0.shape, generator, x0)
    return timesteps, abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
