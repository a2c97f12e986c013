"""Lightning checkpoint files written atomically and read without unpickling code, and the metadata every
training checkpoint carries.

``checkpoint["leftrefill"]`` (``leftrefill.model_dir.METADATA_KEY``; plain dicts, lists and strings, so ``torch.load(weights_only=True)`` reads it)::

    {"config": {...the resolved ExperimentConfig...},
     "trainable": {"prompt_tokens": ["cond_stage_model.special_embeddings.weight"], ...},
     "base_checkpoint": {"name": "512-inpainting-ema.ckpt", "sha256": "..."}}   # null with random_init

``checkpoint["state_dict"]`` holds exactly the tensors that ``trainable`` names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

from leftrefill.atomic import atomic_path
from leftrefill.model_dir import METADATA_KEY, read_trained_file
HASH_CHUNK = 1 << 24  # 16 MiB reads: the 5 GB SD2 checkpoint is hashed without holding it in memory


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, then an atomic rename: a crash mid-write
    leaves the previous checkpoint intact. Loading uses ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def file_record(path: str | Path | None) -> dict[str, str] | None:
    """``{"name": file name, "sha256": hex digest}`` of the base checkpoint (streamed), or None without one."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return {"name": Path(path).name, "sha256": digest.hexdigest()}


def export_safetensors(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the trained tensors of a training ``checkpoint`` (tokens, pose MLP, a LoRA adapter, a UNet: its
    trainable set) to ``out`` (.safetensors), atomically, with the training metadata as the header entry
    ``"leftrefill"`` (JSON), so the file alone loads like the checkpoint (leftrefill.model_dir)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the exported file must end in .safetensors")
    trained = read_trained_file(checkpoint)
    metadata = {METADATA_KEY: json.dumps(trained.metadata, allow_nan=False)} if trained.metadata else None
    tensors = {key: tensor.contiguous() for key, tensor in trained.state_dict.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out
