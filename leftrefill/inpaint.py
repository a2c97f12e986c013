"""The LeftRefill sampling core on tensors (METHOD 1.2 to 1.8), shared by the pipeline and training validation.

It never changes the model (no dtype casts, no requires_grad or train/eval switches), so it can run on a
model that is being trained.
"""

from __future__ import annotations

import torch

from ldm.guidance import ClassifierFreeGuidance
from ldm.latent_diffusion import LatentInpaintDiffusion
from ldm.noise import Generators, randn
from ldm.sampling import ddim_timesteps, sample_ddim
from leftrefill.canvas import canvas_mask, composite, right_half, stitch


def text_contexts(model: LatentInpaintDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt-token context, empty-string context), each (1, 77, width), in the model's current state."""
    embedder = model.cond_stage_model
    return embedder.encode([embedder.prompt]), embedder.encode([""])


@torch.no_grad()
def inpaint(model: LatentInpaintDiffusion, reference: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
            steps: int = 50, cfg: float = 2.5, eta: float = 1.0, generator: Generators = None,
            alphas_cumprod: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Fill ``mask`` in ``target`` from ``reference`` at the model resolution.

    reference, target: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W), 1 = fill (binarised at 0.5).
    generator: one, or one per batch item (item i's result then does not depend on the batch).
    alphas_cumprod: the schedule for DDIM in float32/64 (default: the model's buffer).
    Returns the blended target half (B, 3, H, W), float32 on the model's device, not clamped.
    """
    if reference.shape != target.shape or mask.shape != (target.shape[0], 1, *target.shape[2:]):
        raise ValueError(f"reference {tuple(reference.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (B, 3, H, W), (B, 3, H, W) and (B, 1, H, W)")
    param = next(model.model.parameters())
    device, dtype = param.device, param.dtype
    canvas = stitch(reference, target).to(device, torch.float32)  # (B, 3, H, 2W)
    fill = canvas_mask(mask.to(device, torch.float32))  # (B, 1, H, 2W), zero on the reference half
    batch = canvas.shape[0]
    c_concat = model.concat_conditioning(canvas.to(dtype), fill.to(dtype), generator)  # (B, 5, H/8, 2W/8)
    prompt, empty = (context.expand(batch, -1, -1) for context in text_contexts(model))

    def eps_float32(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # The UNet runs in the model's dtype; DDIM arithmetic and the guidance mix stay in float32.
        return model.apply_model(x.to(dtype), t, cond).float()

    denoise = ClassifierFreeGuidance(eps_float32, {"c_concat": c_concat, "c_crossattn": prompt},
                                     {"c_concat": c_concat, "c_crossattn": empty}, scale=cfg)
    x_T = randn((batch, 4, *c_concat.shape[-2:]), generator, canvas)  # N(0, 1), float32
    schedule = model.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    latent = sample_ddim(denoise, x_T, schedule, ddim_timesteps(steps, model.num_timesteps), eta=eta,
                         generator=generator, progress=progress)
    decoded = model.decode_first_stage(latent.to(dtype)).float()  # (B, 3, H, 2W), about [-1, 1]
    return right_half(composite(decoded, canvas, fill))
