"""Prompt tuning of the frozen OpenCLIP text encoder (LeftRefill, METHOD 1.4).

N learnable embeddings (default 50) are registered as special tokens ``<special-token0>`` ...
``<special-token{N-1}>`` of the OpenCLIP BPE tokenizer, with ids right after the base vocabulary and
SOT/EOT (49408 + i for the SD2 vocabulary of 49408). The prompt is the N tokens joined by spaces, so
the token sequence is [SOT, 49408, ..., 49408+N-1, EOT, 0, ...]. Lookup takes the learned row for a
special id and CLIP's row otherwise; the frozen transformer (penultimate block + ln_final) follows.
The learned table is ``special_embeddings.weight`` (N, width): under the diffusion model it is
``cond_stage_model.special_embeddings.weight``, the one tensor of the released checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.text_encoder import FrozenOpenCLIPEmbedder

# METHOD 1.4: every token starts as the mean CLIP embedding of this sentence (typo "splited" as released).
DEFAULT_INIT_TEXT = ("The whole image is splited into two parts with the same size, they share the same "
                     "scene/landmark captured with different viewpoints and times")


def special_token_strings(num_tokens: int) -> list[str]:
    return [f"<special-token{i}>" for i in range(num_tokens)]


class PromptCLIPEmbedder(FrozenOpenCLIPEmbedder):
    """Frozen OpenCLIP text encoder plus ``num_tokens`` learnable token embeddings (the only trainable part).

    ``prompt`` is the string of all special tokens; ``encode([prompt] * B)`` gives the LeftRefill context
    (B, 77, width) and ``encode([""] * B)`` the unconditional one (no learned token involved).

    As a conditioner (the seam every task's training and sampling call): ``context(batch, n)`` is the
    conditional context of n items read from the batch's ``condition_keys`` (none here: the same prompt for
    every item), ``empty_context(n)`` the unconditional one. A subclass that needs per-item inputs (the NVS
    pose, leftrefill.pose_prompt) names them in ``condition_keys`` and overrides ``context``.
    """

    condition_keys: tuple[str, ...] = ()

    def __init__(self, num_tokens: int = 50, init_text: str = DEFAULT_INIT_TEXT, max_length: int = 77,
                 token_strings: list[str] | None = None, **encoder_kwargs):
        """``token_strings``: the strings registered as learned tokens, row i of the table for string i
        (default ``special_token_strings(num_tokens)``, the one prompt of all rows). A subclass whose table
        holds more tokens than one prompt (multi-view: a set per view) passes its own and checks its
        prompts' length itself; ``num_tokens`` is then ignored."""
        if token_strings is None:
            if not 1 <= num_tokens <= max_length - 2:
                raise ValueError(f"num_tokens must be in [1, {max_length - 2}] to fit SOT and EOT, got {num_tokens}")
            token_strings = special_token_strings(num_tokens)
        super().__init__(max_length=max_length, special_tokens=token_strings, **encoder_kwargs)
        self.base_vocab_size = self.model.token_embedding.num_embeddings
        ids = [self.tokenizer.encoder[token] for token in token_strings]
        if ids != list(range(self.base_vocab_size, self.base_vocab_size + len(token_strings))):
            raise ValueError(f"special tokens have ids {ids[0]}..{ids[-1]} but must be contiguous from "
                             f"{self.base_vocab_size}, the text encoder's number of token embeddings")
        self.init_text = init_text
        self.special_embeddings = nn.Embedding(len(token_strings), self.width)
        self.reset_prompt_tokens()

    @property
    def num_tokens(self) -> int:
        """Rows of the learned table (all tokens, of every prompt)."""
        return self.special_embeddings.num_embeddings

    @property
    def prompt(self) -> str:
        return " ".join(special_token_strings(self.num_tokens))

    def new_modules(self) -> dict[str, nn.Module]:
        """The modules an SD2 checkpoint does not hold (trained by the task, or started fresh):
        ``{attribute name: module}``."""
        return {"special_embeddings": self.special_embeddings}

    def reset_new_parameters(self) -> None:
        """Fresh values for ``new_modules`` (after the CLIP weights are loaded: the tokens need them)."""
        self.reset_prompt_tokens()

    @torch.no_grad()
    def reset_prompt_tokens(self) -> None:
        """Set every learned token to the mean CLIP token embedding of ``init_text`` (without SOT/EOT).

        Call again after the CLIP weights have been loaded when training starts from scratch.
        """
        if self.special_embeddings.weight.is_meta:
            return
        mean = self.mean_token_embedding(self.init_text)
        self.special_embeddings.weight.copy_(mean.expand_as(self.special_embeddings.weight))

    def mean_token_embedding(self, text: str) -> torch.Tensor:
        """(width,): the mean CLIP token embedding of ``text``'s BPE tokens, without SOT/EOT (METHOD 1.4)."""
        ids = torch.tensor(self.tokenizer.encode(text), device=self.model.token_embedding.weight.device)
        return self.model.token_embedding(ids).mean(dim=0)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, width): learned rows for ids >= base vocabulary, CLIP rows otherwise."""
        is_special = tokens >= self.base_vocab_size
        clip_rows = self.model.token_embedding(tokens.clamp(max=self.base_vocab_size - 1))
        learned_rows = self.special_embeddings((tokens - self.base_vocab_size).clamp(min=0, max=self.num_tokens - 1))
        return torch.where(is_special[..., None], learned_rows.to(clip_rows.dtype), clip_rows)

    # -- the conditioner seam ----------------------------------------------------------------------------
    def context(self, batch: Mapping, n: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Conditional context (n, 77, width) of n items; ``drop`` (n,) bool replaces an item's context by the
        empty string's (classifier-free-guidance dropout in training). One text pass for the whole batch."""
        context = self.encode([self.prompt]).expand(n, -1, -1)
        return context if drop is None else self._dropped(context, drop)

    def empty_context(self, n: int) -> torch.Tensor:
        """The unconditional context (n, 77, width): the empty string, no learned token involved."""
        return self.encode([""]).expand(n, -1, -1)

    def _dropped(self, context: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if not drop.any():
            return context
        return torch.where(drop.to(context.device)[:, None, None], self.empty_context(len(drop)), context)
