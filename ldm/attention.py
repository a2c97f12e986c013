"""Transformer blocks of the SD2 UNet: self-/cross-attention through PyTorch SDPA, GEGLU feed-forward.

Parameter names match the original ``ldm.modules.attention`` so SD2 checkpoints load as they are.

Self-attention regrouping: every ``BasicTransformerBlock`` has one optional ``self_attention_grouping``.
When set, the normalised tokens of several images are regrouped into one sequence just before the
self-attention (``attn1``) and split back right after it; convolutions, cross-attention and the
feed-forward keep running per image. This is where multi-view LeftRefill's re-arranged self-attention
plugs in (``(b*v, hw, c) -> (b, v*hw, c)``), optionally block-causal. When it is None (the
single-view case) the block runs the plain path with no extra work.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


class SelfAttentionGrouping(Protocol):
    """How the tokens of several images attend jointly in a transformer block's self-attention.

    ``residual_attention(attention, norm, x, hw)`` is the block's residual self-attention step,
    ``x + attention(norm(x))``, on the per-image tokens x (N, h*w, C) of feature maps of size ``hw`` = (h, w),
    computed on the regrouped sequence (normalisation and residual included, so that tokens the grouping
    merges are merged on the residual path too); it returns the result per image (N, h*w, C).
    """

    def residual_attention(self, attention: CrossAttention, norm: nn.Module, x: torch.Tensor,
                           hw: tuple[int, int]) -> torch.Tensor: ...


class ViewGrouping:
    """Joint self-attention over the ``num_views`` images of each sample (LeftRefill multi-view, METHOD 3.1).

    The batch holds views flattened as (b*v); tokens become (b, v*h*w). With ``causal=True`` a query of
    view i sees only keys of views j <= i (block lower-triangular, METHOD 3.3), computed view by view over the
    growing prefix (:meth:`CrossAttention.block_causal`) rather than with a (v*h*w)^2 boolean mask: v(v+1)/2
    of the v^2 score blocks (10 of 16 at four views), no mask in memory, and SDPA's fused kernels stay
    available.
    """

    def __init__(self, num_views: int, causal: bool = False):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.num_views = num_views
        self.causal = causal

    def group(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(b*v, h*w, c) -> (b, v*h*w, c): the views of a sample, one after another, as one sequence."""
        if x.shape[0] % self.num_views:
            raise ValueError(f"batch of {x.shape[0]} images is not a multiple of num_views={self.num_views}")
        return rearrange(x, "(b v) hw c -> b (v hw) c", v=self.num_views)

    def ungroup(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(b, v*h*w, c) -> (b*v, h*w, c), the inverse of :meth:`group`."""
        return rearrange(x, "b (v hw) c -> (b v) hw c", v=self.num_views)

    def residual_attention(self, attention: CrossAttention, norm: nn.Module, x: torch.Tensor,
                           hw: tuple[int, int]) -> torch.Tensor:
        grouped = self.group(x, hw)  # (b, v*h*w, c)
        h = norm(grouped)
        out = attention.block_causal(h, self.num_views) if self.causal else attention(h)
        return self.ungroup(out.add_(grouped), hw)


class ConcatTargetGrouping:
    """The ``concat_target`` variant of multi-view LeftRefill (METHOD 3.1): each of the ``num_views`` images
    of a sample is a stitched canvas ``[reference_i | target]`` (feature map h x 2w) holding the same target.

    Before the self-attention the duplicated target halves collapse into one copy, view 0's (the release
    keeps view 0's, METHOD 7.4), giving the sequence ``[target, reference_0, ..., reference_{v-1}]`` of
    (v + 1) * h * w tokens; afterwards the target's output goes back into every canvas's right half and
    each reference's into its own left half. The residual is added on the merged sequence, so after every
    self-attention all canvases of a sample hold view 0's target half exactly. Full (not causal) attention.
    ``num_views`` counts the canvases, i.e. the references; the release's ``view_num`` also counts the target.
    """

    causal = False

    def __init__(self, num_views: int):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.num_views = num_views

    def _halves(self, hw: tuple[int, int]) -> tuple[int, int]:
        h, width = hw
        if width % 2:
            raise ValueError(f"concat_target views are stitched [reference | target] canvases; a feature map of "
                             f"width {width} cannot be split in two halves")
        return h, width // 2

    def group(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(b*v, h*2w, c) -> (b, (v+1)*h*w, c): view 0's target half, then every view's reference half."""
        if x.shape[0] % self.num_views:
            raise ValueError(f"batch of {x.shape[0]} images is not a multiple of num_views={self.num_views}")
        h, w = self._halves(hw)
        halves = rearrange(x, "(b v) (h s w) c -> b v s (h w) c", v=self.num_views, h=h, s=2, w=w)
        sequence = torch.cat([halves[:, :1, 1], halves[:, :, 0]], dim=1)  # (b, 1 + v, h*w, c)
        return rearrange(sequence, "b n hw c -> b (n hw) c")

    def ungroup(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(b, (v+1)*h*w, c) -> (b*v, h*2w, c): the inverse of :meth:`group`, the target copied to every view."""
        h, w = self._halves(hw)
        sequence = rearrange(x, "b (n hw) c -> b n hw c", n=self.num_views + 1)
        target, references = sequence[:, :1].expand(-1, self.num_views, -1, -1), sequence[:, 1:]
        halves = torch.stack([references, target], dim=2)  # (b, v, 2, h*w, c): left, right
        return rearrange(halves, "b v s (h w) c -> (b v) (h s w) c", h=h, w=w)

    def residual_attention(self, attention: CrossAttention, norm: nn.Module, x: torch.Tensor,
                           hw: tuple[int, int]) -> torch.Tensor:
        grouped = self.group(x, hw)
        return self.ungroup(attention(norm(grouped)).add_(grouped), hw)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` (B, N, query_dim) on ``context`` (B, M, context_dim).

    With ``context=None`` it is self-attention. Uses ``F.scaled_dot_product_attention``, whose fused
    kernels accumulate the softmax in fp32, so it is safe under fp16/bf16 autocast.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        # (B, L, heads*d) -> (B, heads, L, d)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, inner))

    def block_causal(self, x: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Self-attention of x (B, num_blocks * L, query_dim) where the queries of block i attend to the keys of
        blocks 0..i only: q, k, v projected once, then one unmasked SDPA call per block over the key prefix."""
        b, n, _ = x.shape
        if n % num_blocks:
            raise ValueError(f"a sequence of {n} tokens does not split into {num_blocks} equal blocks")
        length = n // num_blocks
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i * length:(i + 1) * length],
                                                        k[:, :, :(i + 1) * length], v[:, :, :(i + 1) * length])
                         for i in range(num_blocks)], dim=2)  # (B, heads, n, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): proj to 2*dim_out, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        # Multiplying into the fresh gelu output saves one (tokens x 4*dim) tensor; autograd handles it.
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x expansion; ``net.0.proj`` / ``net.2`` as in the original."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text context, feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0,
                 use_checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint
        self.self_attention_grouping: SelfAttentionGrouping | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # The grouping is read now and handed down, so that a checkpointed block recomputes its activations
        # in backward with the grouping of its forward pass, even after the caller's ``with`` block ended.
        grouping = self.self_attention_grouping
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, hw, grouping, use_reentrant=False)
        return self._forward(x, context, hw, grouping)

    def _forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int],
                 grouping: SelfAttentionGrouping | None) -> torch.Tensor:
        # Residuals are added into the fresh outputs of the final linear layers (autograd-safe: a linear
        # layer does not keep its output), saving one (B, N, C) temporary each.
        if grouping is None:
            x = self.attn1(self.norm1(x)).add_(x)
        else:  # several images attend jointly (multi-view)
            x = grouping.residual_attention(self.attn1, self.norm1, x, hw)
        x = self.attn2(self.norm2(x), context=context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (B, C, H, W), with linear proj_in/proj_out (SD2)."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout, use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner_dim, in_channels)
        nn.init.zeros_(self.proj_out.weight)  # the block starts as the identity, as in the original
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w))
        tokens = self.proj_out(tokens)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)
