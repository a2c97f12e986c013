"""One RealFill run: fine-tune LoRA adapters of SD2 inpainting on one scene (METHOD 5.1, 7.1).

    from leftrefill.realfill_training import train_realfill
    model_dir = train_realfill("data/samples_realfill/sacre_coeur", "checkpoints/realfill_sacre_coeur")

The run is the shared training path (leftrefill.trainer: Lightning, DDP, mixed precision, TensorBoard,
atomic checkpoints, ``--resume``) with ``configs/realfill.yaml``; this module adds what is per scene:

1. the config: the scene folder as ``data.params.scene``, the batch as every image of the scene once per
   step, split over the ranks (the reference's "batch 16" on a scene of at most 6 images);
2. the run itself (``leftrefill.trainer.train``), into ``output_dir``, which becomes a model directory;
3. the adapters as one safetensors file beside the checkpoints (:data:`ADAPTER_NAME`): the peft LoRA
   tensors under the model's parameter names, with the resolved config and the base checkpoint's name and
   sha256 in its header, which is what test_realfill.py and RealFillPipeline load;
4. optionally the merged model: the adapters folded into the base weights, saved as one SD2-format
   state dict (the keys of ``512-inpainting-ema.ckpt``) in a .safetensors or .ckpt file
   (leftrefill.export_merged, which also writes it afterwards from the model directory: ``scripts/export.py
   --format sd2``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from leftrefill.checkpoint_io import export_safetensors
from leftrefill.data.realfill import read_scene
from leftrefill.export_merged import SUFFIXES as MERGED_SUFFIXES
from leftrefill.export_merged import merged_header, save_merged_model
from leftrefill.model_dir import LAST_NAME, read_trained_file
from leftrefill.realfill_pipeline import ADAPTER_NAME
from leftrefill.train_config import load_training_config
from leftrefill.trainer import train

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("realfill.yaml")  # configs/realfill.yaml, found by leftrefill.paths


def realfill_config(config_path: str | Path, scene: str | Path, *, devices: int = 1, max_steps: int | None = None,
                    resolution: int | None = None, seed: int | None = None, random_init: bool = False,
                    base_ckpt: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved experiment config for ``scene``: ``config_path`` with the scene, the batch (each image of
    the scene once per step, split over ``devices`` ranks), and the given values over the file's."""
    scene = read_scene(scene)  # checked before anything is built: one SceneError naming the file
    images = len(scene.images)
    per_rank = images // devices
    if per_rank < 1:
        raise ValueError(f"--ngpu {devices}: the scene {scene.path} has {images} images, fewer than the ranks")
    if images % devices:
        log.warning("%d images over %d ranks: each step trains on %d of them (the rest are dropped per epoch, "
                    "at random)", images, devices, per_rank * devices)
    given = [f"data.params.scene={json.dumps(str(scene.path))}", f"data.batch_size={per_rank}"]
    given += [f"trainer.max_steps={max_steps}"] if max_steps is not None else []
    given += [f"data.image_size={resolution}"] if resolution is not None else []
    given += [f"trainer.seed={seed}"] if seed is not None else []
    given += ["model.random_init=true"] if random_init else []
    given += [f"model.base_checkpoint={json.dumps(str(base_ckpt))}"] if base_ckpt is not None else []
    config = load_training_config(config_path, [*given, *overrides])
    if config.trainer.max_epochs == -1 and config.trainer.max_steps > 0:
        config.trainer.max_epochs = config.trainer.max_steps  # an epoch is one step: the progress bar counts them
    return config


def train_realfill(scene: str | Path, output_dir: str | Path, *, config: str | Path = DEFAULT_CONFIG,
                   max_steps: int | None = None, resolution: int | None = None, seed: int | None = None,
                   precision: str = "32", random_init: bool = False, base_ckpt: str | Path | None = None,
                   resume: str | Path | None = None, overwrite: bool = False, accelerator: str = "auto",
                   devices: int = 1, num_nodes: int = 1, save_merged: str | Path | None = None,
                   overrides: Sequence[str] = (), callbacks: Sequence[L.Callback] = ()) -> Path:
    """Fine-tune on ``scene`` (RealBench layout) into the model directory ``output_dir``; returns the adapter
    file. ``resume``: a checkpoint, or "last" for ``output_dir/ckpts/last.ckpt``. ``save_merged``: also write
    the merged model there (.safetensors). ``callbacks`` join the run's (the demo's progress bar)."""
    output_dir = Path(output_dir)
    if save_merged is not None and Path(save_merged).suffix not in MERGED_SUFFIXES:
        raise ValueError(f"--save_merged {save_merged}: the merged model is written as "
                         f"{' or '.join(MERGED_SUFFIXES)}")
    # 1. the config
    resolved = realfill_config(config, scene, devices=devices * num_nodes, max_steps=max_steps,
                               resolution=resolution, seed=seed, random_init=random_init, base_ckpt=base_ckpt,
                               overrides=overrides)
    if resolved.model.lora is None:
        raise ValueError(f"{config}: model.lora is empty; RealFill trains LoRA adapters")
    # 2. the run; adapters of an earlier run must not outlive it (test_realfill.py prefers the adapter file)
    resume = output_dir / "ckpts" / LAST_NAME if resume == "last" else resume
    adapter = output_dir / ADAPTER_NAME
    if adapter.is_file() and resume is None:
        if not overwrite:
            raise FileExistsError(f"{output_dir} already holds adapters ({adapter}); continue with --resume last, "
                                  f"replace them with --overwrite, or choose another --output_dir")
        if rank_zero_only.rank == 0:
            adapter.unlink()
    trainer = train(resolved, output_dir, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    precision=precision, resume=resume, overwrite=overwrite, callbacks=list(callbacks))
    if trainer.is_global_zero:
        # 3. the adapters, from the final state
        export_safetensors(output_dir / "ckpts" / LAST_NAME, adapter)
        log.info("adapters written to %s (model directory %s)", adapter, output_dir)
        # 4. the merged model
        if save_merged is not None:
            save_merged_model(trainer.lightning_module.model, save_merged, merged_metadata(resolved, adapter))
            log.info("merged SD2-format model written to %s", save_merged)
    return adapter


def merged_metadata(config: DictConfig, adapter: Path) -> dict[str, str]:
    """The merged file's header (leftrefill.export_merged.merged_header): where it came from, what the adapters
    were trained on and with which prompt and resolution, from the run's resolved ``config``."""
    return merged_header(read_trained_file(adapter), config)  # the base record was hashed once, by the run
