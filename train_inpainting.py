r"""Train LeftRefill prompt tokens on reference/target pairs (only the 50 token embeddings learn), or any
trainable set a nested experiment config declares (configs/ref_inpainting.yaml; docs/training.md).

    # the paper's run (2 GPUs, mixed precision)
    python train_inpainting.py --config_file configs/ref_inpainting_training_config.yaml \
        --exp_name RefInpainting_V0 --ngpu 2 --fp16
    # a tiny CPU run on the bundled samples (random weights, under a minute), then evaluate it
    python train_inpainting.py --config_file configs/tiny_training_config.yaml --exp_name tiny --accelerator cpu
    python test_inpainting.py --model_path checkpoints/tiny --random_init --test_path data/samples \
        --test_size 128 --no_lpips
    # continue a run from its newest state (ckpts/last.ckpt)
    python train_inpainting.py --config_file configs/tiny_training_config.yaml --exp_name tiny \
        --accelerator cpu --resume last

Trailing key=value arguments override the config: flat keys (optim_cfg.learning_rate=1e-4 batch_size=4) or
nested ones (trainer.max_steps=100 trainable.0.lr=1e-4).
The run directory <output_dir>/<exp_name> is a model directory: test_inpainting.py --model_path takes it
(the best checkpoint by the monitored metric, else ckpts/last.ckpt) or one of its ckpts/*.ckpt.
An existing run directory is refused unless --resume or --overwrite is given.
Multi-GPU and multi-node: see docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.cli import HelpFormatter, training_precision
from leftrefill.data.manifest import ManifestError
from leftrefill.data.masks import MaskError
from leftrefill.images import ImageInputError
from leftrefill.model_dir import LAST_NAME
from leftrefill.train_config import MAX_TRAINING_SEED, load_training_config
from leftrefill.trainer import train

log = logging.getLogger("train_inpainting")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    original = parser.add_argument_group("flags of the original script")
    original.add_argument("--config_file", required=True, help="training config (YAML)")
    original.add_argument("--exp_name", required=True, help="run name: results go to <output_dir>/<exp_name>")
    original.add_argument("--ngpu", type=int, default=1, help="devices per node (GPUs, or CPU processes)")
    original.add_argument("--fp16", action="store_true", help="the same as --precision 16-mixed")
    extra = parser.add_argument_group("additional flags")
    extra.add_argument("--precision", type=training_precision, default=None,
                       help="32, 16-mixed or bf16-mixed (or fp32, fp16, bf16); None: 32, or 16-mixed with --fp16")
    extra.add_argument("--num_nodes", type=int, default=1, help="machines (DDP over nodes)")
    extra.add_argument("--accelerator", default="auto", help="auto, gpu, cpu (Lightning's names)")
    extra.add_argument("--resume", default=None,
                       help="checkpoint to resume from, or 'last' for <output_dir>/<exp_name>/ckpts/last.ckpt")
    extra.add_argument("--overwrite", action="store_true",
                       help="start afresh in an existing run directory, removing its checkpoints and logs")
    extra.add_argument("--max_steps", type=int, default=None,
                       help="stop after this many optimiser steps (None: the config's max_steps)")
    extra.add_argument("--seed", type=int, default=None,
                       help=f"overrides the config's seed; in [0, {MAX_TRAINING_SEED}]")
    extra.add_argument("--output_dir", default="checkpoints", help="parent folder of the run directory")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (omegaconf dotlist)")
    args = parser.parse_args(argv)
    if args.fp16 and args.precision not in (None, "16-mixed"):
        parser.error(f"--fp16 contradicts --precision {args.precision}")
    args.precision = args.precision or ("16-mixed" if args.fp16 else "32")
    if args.ngpu < 1 or args.num_nodes < 1:
        parser.error("--ngpu and --num_nodes must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.seed is not None and not 0 <= args.seed <= MAX_TRAINING_SEED:
        parser.error(f"--seed must be in [0, {MAX_TRAINING_SEED}] (Lightning's seed_everything takes 32-bit "
                     f"seeds), got {args.seed}")
    if args.resume is not None and args.overwrite:
        parser.error("--resume and --overwrite contradict each other")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"max_steps={args.max_steps}"] if args.max_steps is not None else []
    overrides += [f"seed={args.seed}"] if args.seed is not None else []
    run_dir = Path(args.output_dir) / args.exp_name
    resume = run_dir / "ckpts" / LAST_NAME if args.resume == "last" else args.resume
    try:
        config = load_training_config(args.config_file, overrides)
        if config.model.random_init:
            log.warning("RANDOM WEIGHTS: random_init is set; the backbone is random and training learns nothing useful")
        train(config, run_dir, accelerator=args.accelerator, devices=args.ngpu, num_nodes=args.num_nodes,
              precision=args.precision, resume=resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, ManifestError, MaskError, ImageInputError, FileNotFoundError,
            FileExistsError, ValueError) as err:  # our ValueErrors name the file or key; the traceback would only bury it
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
