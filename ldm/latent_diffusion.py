"""Stable Diffusion 2 inpainting as one module: UNet + VAE + text encoder + noise schedule.

``LatentInpaintDiffusion.state_dict()`` has exactly the keys of the original ``512-inpainting-ema.ckpt``:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.model.*`` (OpenCLIP
text tower) and the schedule buffers of ``ldm.schedule.SCHEDULE_BUFFERS``.

Conditioning is "hybrid" (concat + cross-attention): the UNet sees
``cat([z_t (4), mask (1), masked-image latent (4)])`` and attends to the text context.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from ldm.checkpoint import build_and_load
from ldm.noise import Generators
from ldm.schedule import SCHEDULE_BUFFERS, linear_betas, q_sample, schedule_buffers
from ldm.util import ConfigError, instantiate_from_config, load_config


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the original's key prefix) and applies hybrid conditioning."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: torch.Tensor, c_crossattn: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(torch.cat([x, c_concat.to(x.dtype)], dim=1), t, c_crossattn.to(x.dtype))


class LatentInpaintDiffusion(nn.Module):
    """SD2 inpainting model (epsilon prediction, T = ``timesteps``, LDM linear betas).

    The VAE and text encoder are frozen; ``scale_factor`` maps VAE latents to unit variance (0.18215 for SD2).
    """

    def __init__(self, unet_config: dict, first_stage_config: dict, cond_stage_config: dict, timesteps: int = 1000,
                 linear_start: float = 0.00085, linear_end: float = 0.012, scale_factor: float = 0.18215):
        super().__init__()
        self.model = DiffusionWrapper(instantiate_from_config(unet_config, "model.params.unet_config"))
        self.first_stage_model = instantiate_from_config(first_stage_config, "model.params.first_stage_config")
        self.cond_stage_model = instantiate_from_config(cond_stage_config, "model.params.cond_stage_config")
        self.first_stage_model.eval().requires_grad_(False)
        self.scale_factor = scale_factor
        self.num_timesteps = timesteps
        self.linear_start, self.linear_end = linear_start, linear_end
        betas = linear_betas(timesteps, linear_start, linear_end)
        for name, value in schedule_buffers(betas).items():
            self.register_buffer(name, value)

    def sampling_schedule(self) -> torch.Tensor:
        """alphas_cumprod (T,) in float64 on the CPU, computed from the config: what samplers take, whatever
        dtype the model (and its buffers) have been cast to (in half precision 1 - abar rounds to 0 near t = 0).
        """
        betas = linear_betas(self.num_timesteps, self.linear_start, self.linear_end)
        return torch.cumprod(1.0 - betas, dim=0)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet block and text-transformer activations in backward instead of storing them."""
        for module in self.model.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enabled
        if hasattr(self.cond_stage_model, "grad_checkpointing"):
            self.cond_stage_model.grad_checkpointing = enabled

    # -- first stage -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), sampled from the posterior
        as the original does for training and for the masked image."""
        return self.first_stage_model.encode(x).sample(generator) * self.scale_factor

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally [-1, 1] (not clamped)."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def concat_conditioning(self, image: torch.Tensor, mask: torch.Tensor,
                            generator: Generators = None) -> torch.Tensor:
        """The 5 extra UNet channels for inpainting: cat([mask, masked-image latent]), (B, 5, H/8, W/8).

        image: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W), 1 = to fill. The masked image keeps pixels
        with mask < 0.5 (holes become 0, mid-gray); the mask is resized to the latent grid with nearest
        interpolation, as in SD2 inpainting.
        """
        masked_image = image * (mask < 0.5).to(image.dtype)
        latent = self.encode_first_stage(masked_image, generator)
        return torch.cat([F.interpolate(mask.to(latent.dtype), size=latent.shape[-2:]), latent], dim=1)

    # -- conditioning ------------------------------------------------------------------------------
    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        """Texts -> cross-attention context (B, 77, context_dim)."""
        return self.cond_stage_model(texts)

    # -- diffusion ---------------------------------------------------------------------------------
    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted noise (B, 4, h, w) for latents x_t (B, 4, h, w) at integer timesteps t (B,).

        cond: {"c_concat": (B, 5, h, w), "c_crossattn": (B, M, context_dim)}.
        """
        return self.model(x_t, t, cond["c_concat"], cond["c_crossattn"])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, x0, t, noise)

    def training_loss(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      weight: torch.Tensor | None = None, items: torch.Tensor | None = None) -> torch.Tensor:
        """LDM "simple" loss: mean over all latent elements of (eps - eps_theta(x_t, t))^2.

        t defaults to uniform integers in [0, T-1], noise to N(0, 1) (both drawn from ``generator``).
        ``weight`` (B, 1, h, w) on the latent grid (RealFill: 0 on a target's unknown pixels) multiplies each
        element's squared error; the mean is still over all elements (zero weights stay in the denominator,
        as RealFill's ``(weights * mse).mean()``). ``items`` (B,) bool keeps only those items' elements in
        the mean (multi-view LeftRefill: the target view's, METHOD 3.2 ``reduced_loss``); the others still
        run through the model, since the kept ones attend to them.
        """
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device="cpu").to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device="cpu", dtype=x0.dtype).to(x0.device)
        if weight is not None and (weight.shape[-2:] != x0.shape[-2:] or weight.shape[0] != b):
            raise ValueError(f"weight {tuple(weight.shape)} must be (B, 1, h, w) on the latent grid {tuple(x0.shape)}")
        prediction = self.apply_model(self.q_sample(x0, t, noise), t, cond)
        if items is not None:
            if items.shape != (b,) or items.dtype != torch.bool or not items.any():
                raise ValueError(f"items must be a (B,) = ({b},) bool tensor selecting at least one item, got "
                                 f"{items.dtype} {tuple(items.shape)}")
            prediction, noise = prediction[items.to(prediction.device)], noise[items.to(noise.device)]
            weight = None if weight is None else weight[items.to(weight.device)]
        if weight is None:
            return F.mse_loss(prediction.float(), noise.float())
        return (weight.float() * F.mse_loss(prediction.float(), noise.float(), reduction="none")).mean()


def model_builder(config_path: str | Path, node: str = "model") -> Callable[[], nn.Module]:
    """Read and check ``config_path`` now; return a function that builds node ``node`` (call it under
    ``torch.device("meta")`` to build without memory). Config errors name the file and the node."""
    config = load_config(config_path)
    if node not in config:
        raise ConfigError(f"{config_path}: no '{node}' node")
    model_node: DictConfig = config[node]

    def build() -> nn.Module:
        try:
            return instantiate_from_config(model_node, node)
        except ConfigError as err:  # raised by a nested node: say which file it is in
            raise ConfigError(f"{config_path}: {err}") from None

    return build


def load_model(config_path: str | Path, checkpoint: str | Path | None = None, *, node: str = "model",
               **load_kwargs) -> nn.Module:
    """Build the model described by ``config_path`` (node ``model``) and load ``checkpoint`` into it.

    Without a checkpoint the weights are randomly initialised. With one, the model is built on the meta
    device and the (memory-mapped) checkpoint tensors are assigned to it, checked key by key; the
    schedule buffers in the checkpoint are checked against the config's schedule. ``load_kwargs`` go to
    ``ldm.checkpoint.load_weights`` (e.g. ``allow_missing`` for parameters a method adds).
    Returns the model on the CPU in eval mode.
    """
    build = model_builder(config_path, node)
    if checkpoint is None:
        model = build()
    else:
        load_kwargs.setdefault("computed_buffers", SCHEDULE_BUFFERS)
        model = build_and_load(build, checkpoint, **load_kwargs)
    return model.eval()
