"""Pose-conditioned prompt tokens for LeftRefill novel view synthesis (METHOD 2.3, 2.4).

The NVS conditioner is the prompt-tuning text encoder with 73 learned tokens (all initialised to the mean
CLIP embedding of ``NVS_INIT_TEXT``) plus a pose MLP, Linear(4, 512) - SiLU - Linear(512, width), that maps
the relative camera pose [d_polar, sin d_azimuth, cos d_azimuth, d_radius] (leftrefill.nvs_pose) to one
token embedding. That embedding overwrites the input embedding at sequence index ``num_tokens + 1`` (74:
the end-of-text slot after [SOT, 73 tokens]) before the frozen causal CLIP transformer, so the pose token
attends to every task token. One context per item; the unconditional branch is the empty string, no pose.

The pose reaches the encoder by construction: ``context`` reads ``batch["pose"]`` and refuses a batch
without it (the release's shipped config, ``cond_stage_key: txt``, silently dropped the pose, METHOD 2.3).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from leftrefill.prompt_tokens import PromptCLIPEmbedder

# METHOD 2.3: the sentence whose mean token embedding initialises every NVS token.
NVS_INIT_TEXT = ("Left is the reference image, while the right one is the target image with different viewpoint. "
                 "The relative pose:")
POSE_DIM = 4  # [d_polar, sin d_azimuth, cos d_azimuth, d_radius]


class PoseMLP(nn.Sequential):
    """Relative pose (B, 4) -> one token embedding (B, width): Linear(4, hidden) - SiLU - Linear(hidden, width).
    Parameter names ``0.weight`` ... ``2.bias`` (the release's ``RelPosModel`` layout)."""

    def __init__(self, width: int, hidden: int = 512):
        super().__init__(nn.Linear(POSE_DIM, hidden), nn.SiLU(), nn.Linear(hidden, width))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's default Linear initialisation (a no-op on the meta device)."""
        for layer in self:
            if isinstance(layer, nn.Linear) and not layer.weight.is_meta:
                layer.reset_parameters()


class PoseToken:
    """Mixin for a prompt-token conditioner with a pose MLP (``self.pose_mlp``, set by the subclass): the pose
    is read from the batch, and the MLP is one of the new modules, trained and reset with the tokens."""

    condition_keys = ("pose",)
    pose_mlp: PoseMLP

    def new_modules(self) -> dict[str, nn.Module]:
        return {**super().new_modules(), "pose_mlp": self.pose_mlp}

    @torch.no_grad()
    def reset_new_parameters(self) -> None:
        super().reset_new_parameters()
        self.pose_mlp.reset_parameters()


class PosePromptCLIPEmbedder(PoseToken, PromptCLIPEmbedder):
    """Frozen OpenCLIP text encoder + ``num_tokens`` learned tokens + the pose MLP (``pose_mlp``).

    ``context(batch, n)`` needs ``batch["pose"]`` (n, 4) float; the result is (n, 77, width), the pose
    token at index ``pose_index``. ``empty_context(n)`` is the empty string's, the same for every pose.
    """

    def __init__(self, num_tokens: int = 73, init_text: str = NVS_INIT_TEXT, pose_hidden: int = 512,
                 max_length: int = 77, **encoder_kwargs):
        if num_tokens + 2 > max_length:
            raise ValueError(f"num_tokens must leave room for SOT and the pose slot: at most {max_length - 2}, "
                             f"got {num_tokens}")
        super().__init__(num_tokens=num_tokens, init_text=init_text, max_length=max_length, **encoder_kwargs)
        self.pose_mlp = PoseMLP(self.width, pose_hidden)

    @property
    def pose_index(self) -> int:
        """Where the pose token goes: the slot after SOT and the learned tokens (74 for 73 tokens)."""
        return self.num_tokens + 1

    def context(self, batch: Mapping, n: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 77, width): the prompt tokens with item i's pose token at ``pose_index``; items with
        ``drop`` (n,) True get the empty string instead, the whole sequence replaced before the
        transformer (METHOD 2.4: the CFG dropout of training, p = 0.15)."""
        pose = checked_pose(batch.get("pose"), n)
        device = self.model.positional_embedding.device
        embeddings = self.embed_tokens(self.tokenize([self.prompt]).to(device)).expand(n, -1, -1)  # (n, 77, w)
        return encode_with_pose(self, embeddings, pose, self.pose_index, drop)


def encode_with_pose(embedder: PromptCLIPEmbedder, embeddings: torch.Tensor, pose: torch.Tensor, at: int,
                     drop: torch.Tensor | None) -> torch.Tensor:
    """Input embeddings (n, L, width) of the prompts -> context (n, L, width), the pose token of item i,
    ``embedder.pose_mlp(pose[i])``, replacing its input embedding at index ``at`` before the frozen
    transformer. ``pose`` (n, 4) as ``checked_pose`` returns it; items with ``drop`` (n,) True get the empty
    string's whole sequence instead (CFG dropout). Shared by the single- and multi-view pose conditioners."""
    device, n = embeddings.device, embeddings.shape[0]
    pose_token = embedder.pose_mlp(pose.to(device, embedder.pose_mlp[0].weight.dtype)).to(embeddings.dtype)  # (n, w)
    embeddings = torch.cat([embeddings[:, :at], pose_token[:, None], embeddings[:, at + 1:]], dim=1)
    if drop is not None and drop.any():
        empty = embedder.embed_tokens(embedder.tokenize([""]).to(device)).expand(n, -1, -1)
        embeddings = torch.where(drop.to(device)[:, None, None], empty, embeddings)
    return embedder.encode_embeddings(embeddings)


def checked_pose(pose, n: int) -> torch.Tensor:
    """``pose`` as a float tensor (n, 4), or a ValueError saying what the NVS conditioner needs."""
    if pose is None:
        raise ValueError("this model conditions on the relative camera pose, but the batch has no 'pose' (B, 4) "
                         "[d_polar, sin d_azimuth, cos d_azimuth, d_radius] (leftrefill.nvs_pose.relative_pose)")
    pose = torch.as_tensor(pose)
    if pose.ndim == 1:
        pose = pose.expand(n, -1)
    if pose.ndim != 2 or pose.shape[-1] != POSE_DIM or pose.shape[0] not in (1, n):
        raise ValueError(f"pose must have shape ({n}, {POSE_DIM}) or ({POSE_DIM},): [d_polar, sin d_azimuth, "
                         f"cos d_azimuth, d_radius]; got {tuple(pose.shape)}")
    if pose.is_complex() or pose.dtype == torch.bool or not torch.isfinite(pose.float()).all():
        raise ValueError(f"pose must hold finite real numbers, got {pose.tolist() if pose.numel() <= 8 else pose.dtype}")
    return pose.float().expand(n, -1)
