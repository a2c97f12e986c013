"""Denoiser wrappers for batches of related images, used by ``ldm.fill``.

* :class:`KnownViews`: in a multi-view batch (views flattened as (b*v)), the first ``known`` views of every
  sample are known images. The sampler walks only the other views' latents; at every step the known views
  enter the model as their clean latent noised to that step's timestep, q(x_t | x_0), with one noise draw
  per view fixed for the whole run. That is how a view is seen in multi-view training, where all views of a
  sample share one timestep; with a block-causal grouping it is autoregressive generation (METHOD 3.3):
  each new view attends to the views before it, given or generated.
* :class:`SharedRegion`: groups of consecutive items whose latents must agree inside a region, the
  training-free multi-reference of the one-reference model (METHOD 7.3: K canvases [reference_k | target]
  of one target). The model's prediction inside the region is averaged over the group at every step, and the
  group draws one noise (every item gets a copy of its group's first generator), so the region's latent is
  the same for the whole group at every step, for every sampler (their updates are elementwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange

from ldm.noise import Generators

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def generators_of(generator: Generators, index: torch.Tensor) -> Generators:
    """The generators of the items ``index`` (1-D long): a per-item list is indexed, a shared one kept."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in index.tolist()]


class KnownViews:
    """The first ``known`` of each sample's ``num_views`` views are known: ``clean`` latents (b*known, 4, h, w)
    with their fixed ``noise`` (same shape); the other views are sampled. ``schedule``: alphas_cumprod (T,)
    float64. Items are ordered (b v) in the full batch, (b known) and (b sampled) in the parts."""

    def __init__(self, num_views: int, known: int, clean: torch.Tensor, noise: torch.Tensor, schedule: torch.Tensor):
        if not 0 < known < num_views:
            raise ValueError(f"known views must be in [1, {num_views - 1}] for {num_views} views, got {known}")
        if clean.shape != noise.shape or clean.shape[0] % known:
            raise ValueError(f"clean {tuple(clean.shape)} and noise {tuple(noise.shape)} must be equal (b*known, ...)")
        self.num_views, self.known = num_views, known
        self.clean, self.noise, self.schedule = clean, noise, schedule
        self.batch = clean.shape[0] // known * num_views
        self.known_index, self.sampled_index = self.split_index(self.batch, num_views, known)

    @staticmethod
    def split_index(batch: int, num_views: int, known: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(known items, sampled items) of a (b v) batch of ``batch`` images, each a 1-D long index."""
        if batch % num_views:
            raise ValueError(f"batch of {batch} images is not a multiple of num_views={num_views}")
        is_known = torch.arange(batch) % num_views < known
        return is_known.nonzero()[:, 0], (~is_known).nonzero()[:, 0]

    def noised(self, t_sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The known views at their samples' timestep: (x_t (b*known, 4, h, w), t (b*known,))."""
        per_sample = rearrange(t_sampled, "(b n) -> b n", n=self.num_views - self.known)[:, :1]
        t_known = per_sample.expand(-1, self.known).reshape(-1)
        abar = self.schedule[t_known.cpu()].to(self.clean.device, torch.float32)[:, None, None, None]
        return abar.sqrt() * self.clean + (1 - abar).sqrt() * self.noise, t_known

    def wrap(self, denoise: Denoiser) -> Denoiser:
        """``denoise`` over the full (b v) batch -> a denoiser over the sampled views only."""

        def denoise_sampled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_known, t_known = self.noised(t)
            full_x = x.new_empty((self.batch, *x.shape[1:]))
            full_x[self.sampled_index.to(x.device)] = x
            full_x[self.known_index.to(x.device)] = x_known.to(x.dtype)
            full_t = t.new_empty(self.batch)
            full_t[self.sampled_index.to(t.device)] = t
            full_t[self.known_index.to(t.device)] = t_known.to(t.device, t.dtype)
            return denoise(full_x, full_t)[self.sampled_index.to(x.device)]

        return denoise_sampled


class SharedRegion:
    """Groups of ``group_size`` consecutive batch items that share one latent inside ``region`` ((h, w) bool on
    the latent grid, True = shared)."""

    def __init__(self, group_size: int, region: torch.Tensor):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if region.ndim != 2 or region.dtype != torch.bool:
            raise ValueError(f"region must be an (h, w) bool tensor on the latent grid, got {region.dtype} "
                             f"{tuple(region.shape)}")
        self.group_size, self.region = group_size, region

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.group_size:
            raise ValueError(f"batch of {x.shape[0]} is not a multiple of the group size {self.group_size}")
        if x.shape[-2:] != self.region.shape:
            raise ValueError(f"region {tuple(self.region.shape)} does not match the latent grid {tuple(x.shape[-2:])}")
        return rearrange(x, "(g k) c h w -> g k c h w", k=self.group_size)

    def _with_region(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) with each group's region replaced by ``shared`` (groups, C, h, w)."""
        grouped = self._grouped(x)
        region = self.region.to(x.device)
        mixed = torch.where(region, shared[:, None].to(x.dtype), grouped)
        return rearrange(mixed, "g k c h w -> (g k) c h w")

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The starting latents with each group's region copied from its first item (an SDEdit start encodes
        each canvas, and the VAE's receptive field makes their target halves differ slightly)."""
        return self._with_region(x, self._grouped(x)[:, 0])

    def wrap(self, denoise: Denoiser) -> Denoiser:
        """``denoise`` with its prediction averaged over each group inside the region."""

        def denoise_shared(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = denoise(x, t)
            return self._with_region(eps, self._grouped(eps).mean(dim=1))

        return denoise_shared

    def generators(self, generator: Generators, batch: int) -> list[torch.Generator]:
        """One generator per item, the items of a group all copies of one: a per-item list gives its group's
        first; a shared generator (or None: torch's global RNG) gives each group a seed drawn from it."""
        if batch % self.group_size:
            raise ValueError(f"batch of {batch} is not a multiple of the group size {self.group_size}")
        groups = batch // self.group_size
        if generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else torch.device("cpu")
            seeds = torch.randint(0, 2**62, (groups,), generator=generator, device=device).tolist()
            firsts = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        else:
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
            firsts = [generator[g * self.group_size] for g in range(groups)]
        copies = []
        for first in firsts:
            for _ in range(self.group_size):
                copy = torch.Generator(device=first.device)
                copy.set_state(first.get_state())
                copies.append(copy)
        return copies

