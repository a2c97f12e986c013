"""Per-view prompt tokens for multi-view LeftRefill (METHOD 3.2, 3.3).

A sample is v views flattened into the batch as (b v): item i is view i % v, view 0 the target. Every
view's prompt is the same ``num_tokens`` shared tokens ``<special-token0..>`` followed by that view's own
``view_token_len`` tokens ``<view_direct-{j}-{l}>``, so each view gets its own context (b*v, 77, width) for
its cross-attention, while the self-attention runs jointly over the views (``grouping``).

All learned tokens sit in one table ``special_embeddings`` (num_tokens + v * view_token_len, width), under
the diffusion model ``cond_stage_model.special_embeddings.weight`` like the one-reference model's: rows are
the shared tokens, then view 0's, view 1's, ..., with ids contiguous after the base vocabulary. The release
registered the view tokens without their closing ``>`` so that all but the first broke into BPE fragments
(METHOD 7.4); here every token string is registered whole.

``MultiViewPosePromptCLIPEmbedder`` adds the NVS pose token of each view (METHOD 2.3) for block-causal
autoregressive novel view synthesis (METHOD 3.3).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.attention import ConcatTargetGrouping, SelfAttentionGrouping, ViewGrouping
from leftrefill.pose_prompt import NVS_INIT_TEXT, PoseMLP, PoseToken, checked_pose, encode_with_pose
from leftrefill.prompt_tokens import DEFAULT_INIT_TEXT, PromptCLIPEmbedder, special_token_strings

# METHOD 3.2: the sentence whose mean token embedding initialises the shared tokens.
MULTIVIEW_INIT_TEXT = ("The image is one of the photos captured from the same scene from different viewpoints "
                       "and at different time.")


def view_token_strings(view: int, length: int) -> list[str]:
    """``<view_direct-{view}-{l}>`` for l < length: view ``view``'s own tokens, each with its closing ``>``."""
    return [f"<view_direct-{view}-{l}>" for l in range(length)]


class MultiViewPromptCLIPEmbedder(PromptCLIPEmbedder):
    """Frozen OpenCLIP text encoder + ``num_tokens`` shared tokens + ``view_token_len`` tokens per view.

    ``context(batch, n)`` is (n, 77, width) for n = b * num_views items flattened as (b v); item i gets view
    i % num_views's prompt. ``num_tokens`` (the property) is the whole table, ``num_shared_tokens`` the
    constructor's ``num_tokens``. ``grouping()`` is the UNet's self-attention regrouping for these views
    (``concat_target``: each view a stitched [reference_i | target], METHOD 3.1).
    """

    def __init__(self, num_tokens: int = 20, view_token_len: int = 30, num_views: int = 2,
                 init_text: str = MULTIVIEW_INIT_TEXT, view_init_text: str = DEFAULT_INIT_TEXT,
                 causal: bool = False, concat_target: bool = False, max_length: int = 77, **encoder_kwargs):
        if min(num_tokens, view_token_len, num_views) < 1:
            raise ValueError(f"num_tokens, view_token_len and num_views must be >= 1, got {num_tokens}, "
                             f"{view_token_len} and {num_views}")
        if 1 + num_tokens + view_token_len + 1 > max_length:
            raise ValueError(f"a view's prompt, SOT + {num_tokens} shared + {view_token_len} view tokens + EOT = "
                             f"{num_tokens + view_token_len + 2} ids, exceeds max_length = {max_length}")
        # Plain attributes, set before nn.Module.__init__: the parent's __init__ calls reset_prompt_tokens.
        self.num_shared_tokens, self.view_token_len, self.num_views = num_tokens, view_token_len, num_views
        self.view_init_text, self.causal, self.concat_target = view_init_text, causal, concat_target
        tokens = special_token_strings(num_tokens) + [token for view in range(num_views)
                                                      for token in view_token_strings(view, view_token_len)]
        super().__init__(init_text=init_text, max_length=max_length, token_strings=tokens, **encoder_kwargs)

    def prompt_for_view(self, view: int) -> str:
        """The shared tokens joined by spaces, then view ``view``'s joined without spaces (as released):
        tokenised [SOT, shared ids..., view ids..., EOT]."""
        if not 0 <= view < self.num_views:
            raise ValueError(f"view must be in [0, {self.num_views - 1}], got {view}")
        return " ".join(special_token_strings(self.num_shared_tokens)) + "".join(
            view_token_strings(view, self.view_token_len))

    @property
    def prompts(self) -> list[str]:
        """Every view's prompt, view 0 (the target) first."""
        return [self.prompt_for_view(view) for view in range(self.num_views)]

    @property
    def prompt(self) -> str:
        """The target's prompt (view 0)."""
        return self.prompt_for_view(0)

    @torch.no_grad()
    def reset_prompt_tokens(self) -> None:
        """Shared rows: the mean CLIP token embedding of ``init_text``; view rows: that of ``view_init_text``
        (METHOD 3.2)."""
        table = self.special_embeddings.weight  # (num_tokens + v * view_token_len, width)
        if table.is_meta:
            return
        shared = self.num_shared_tokens
        table[:shared] = self.mean_token_embedding(self.init_text)
        table[shared:] = self.mean_token_embedding(self.view_init_text)

    def describe_token_rows(self, rows: int) -> str:
        """How ``rows`` learned tokens split for this model's shared and per-view counts, e.g.
        "80 prompt tokens (20 shared + 30 x 2 views)" (checkpoint error messages)."""
        views, rest = divmod(rows - self.num_shared_tokens, self.view_token_len)
        split = (f"{self.num_shared_tokens} shared + {self.view_token_len} x {views} views" if rest == 0 and views >= 1
                 else f"not {self.num_shared_tokens} shared + a multiple of {self.view_token_len}")
        return f"{rows} prompt tokens ({split})"

    def grouping(self, num_views: int | None = None) -> SelfAttentionGrouping:
        """The UNet's self-attention regrouping for these views (ldm.attention): joint over the views of a
        sample, block-causal if ``causal``; with ``concat_target`` the stitched views share one target half.
        ``num_views``: the first views only (autoregressive generation of view k runs views 0..k)."""
        num_views = self._view_count(num_views)
        if self.concat_target:
            return ConcatTargetGrouping(num_views)
        return ViewGrouping(num_views, causal=self.causal)

    # -- the conditioner seam ----------------------------------------------------------------------------
    def context(self, batch: Mapping, n: int, drop: torch.Tensor | None = None,
                num_views: int | None = None) -> torch.Tensor:
        """Conditional context (n, 77, width) of n = b * num_views items, item i with view i % num_views's
        prompt; ``drop`` (n,) bool gives an item the empty string's context. One text pass over the views.
        ``num_views``: samples of the first views only (default: all of the model's)."""
        num_views = self._view_count(num_views)
        context = self.encode(self.prompts[:num_views])  # (v, 77, w)
        context = context.repeat(self._samples(n, num_views), 1, 1)  # (b v, 77, w)
        return context if drop is None else self._dropped(context, drop)

    def _view_count(self, num_views: int | None) -> int:
        if num_views is None:
            return self.num_views
        if not 1 <= num_views <= self.num_views:
            raise ValueError(f"this model has {self.num_views} views; cannot condition {num_views}")
        return num_views

    def _samples(self, n: int, num_views: int) -> int:
        """b for n = b * num_views flattened items, or a ValueError."""
        if n % num_views:
            raise ValueError(f"{n} items are not a whole number of samples of num_views = {num_views} views "
                             f"(views are flattened into the batch as (b v))")
        return n // num_views


class MultiViewPosePromptCLIPEmbedder(PoseToken, MultiViewPromptCLIPEmbedder):
    """Multi-view prompt tokens + each view's relative-pose token, for block-causal autoregressive NVS
    (METHOD 3.3: unshared task and view embeddings per view, full or causal joint attention).

    ``context(batch, n)`` needs ``batch["pose"]`` (n, 4), one pose per flattened view; item i's pose token
    overwrites the input embedding at ``pose_index`` = 1 + num_shared_tokens + view_token_len (the EOT slot
    after its view's prompt, as in leftrefill.pose_prompt), so the parent's prompt-length check is also the
    check that ``pose_index < max_length``.
    """

    def __init__(self, num_tokens: int = 43, view_token_len: int = 30, num_views: int = 4,
                 init_text: str = NVS_INIT_TEXT, view_init_text: str = MULTIVIEW_INIT_TEXT, causal: bool = True,
                 pose_hidden: int = 512, max_length: int = 77, **encoder_kwargs):
        super().__init__(num_tokens=num_tokens, view_token_len=view_token_len, num_views=num_views,
                         init_text=init_text, view_init_text=view_init_text, causal=causal, max_length=max_length,
                         **encoder_kwargs)
        self.pose_mlp = PoseMLP(self.width, pose_hidden)

    @property
    def pose_index(self) -> int:
        """Where the pose token goes: after SOT, the shared and the view tokens (74 for 43 + 30)."""
        return 1 + self.num_shared_tokens + self.view_token_len

    def context(self, batch: Mapping, n: int, drop: torch.Tensor | None = None,
                num_views: int | None = None) -> torch.Tensor:
        """(n, 77, width): item i's view prompt (view i % num_views) with its pose token at ``pose_index``;
        ``drop`` (n,) True gives an item the empty string's whole sequence (CFG dropout). ``num_views``: as
        the parent's."""
        num_views = self._view_count(num_views)
        samples = self._samples(n, num_views)
        pose = checked_pose(batch.get("pose"), n)  # (n, 4)
        device = self.model.positional_embedding.device
        embeddings = self.embed_tokens(self.tokenize(self.prompts[:num_views]).to(device))  # (v, 77, w)
        return encode_with_pose(self, embeddings.repeat(samples, 1, 1), pose, self.pose_index, drop)
