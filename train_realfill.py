r"""Fine-tune RealFill on one scene: LoRA adapters of SD2 inpainting on the UNet and the text encoder, trained on
the scene's references and the target's known pixels (docs/realfill.md).

    # the recipe (configs/realfill.yaml: 2,000 steps, rank 8, lr 2e-4 / 4e-5), one GPU, mixed precision
    python train_realfill.py --scene data/samples_realfill/sacre_coeur --output_dir checkpoints/realfill_sacre_coeur \
        --precision 16-mixed
    # a tiny CPU run with random weights (seconds; exercises the code path only)
    python train_realfill.py --config configs/tiny_realfill.yaml --scene data/samples_realfill/sacre_coeur \
        --output_dir checkpoints/tiny_realfill_run --random_init --accelerator cpu
    # then fill the target with 16 samples, ranked by matches with the references
    python test_realfill.py --scene data/samples_realfill/sacre_coeur --model_path checkpoints/realfill_sacre_coeur \
        --output_path outputs/realfill_sacre_coeur

Scene layout: <scene>/ref/*.{jpg,png} (1 to 5), <scene>/target/target.png, <scene>/target/mask.png (white = fill).
The output directory is a model directory: adapters.safetensors (the LoRA tensors, with the resolved config and
the base checkpoint's sha256 in its header), model_config.yaml, training_config.yaml, ckpts/last.ckpt (what
--resume last continues from) and TensorBoard logs/. Trailing key=value arguments override the config
(trainer.logger_freq=100, trainable.0.lr=1e-4).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.cli import HelpFormatter, training_precision
from leftrefill.data.realfill import SceneError
from leftrefill.images import ImageInputError
from leftrefill.realfill_training import DEFAULT_CONFIG, train_realfill
from leftrefill.train_config import MAX_TRAINING_SEED

log = logging.getLogger("train_realfill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--scene", required=True, help="scene folder: ref/*.jpg|png, target/target.png, target/mask.png")
    parser.add_argument("--output_dir", required=True, help="the model directory to write (adapters, config, logs)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (YAML)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimiser steps (None: the config's, 2000)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training crop size, a multiple of 64 (None: the config's, 512)")
    parser.add_argument("--precision", type=training_precision, default="32",
                        help="32, 16-mixed or bf16-mixed (or fp32, fp16, bf16)")
    parser.add_argument("--seed", type=int, default=None, help=f"in [0, {MAX_TRAINING_SEED}] (None: the config's, 0)")
    parser.add_argument("--random_init", action="store_true",
                        help="random weights instead of the SD2 checkpoint (with a tiny config: a quick trial)")
    parser.add_argument("--base_ckpt", default=None,
                        help="SD2 512-inpainting-ema.ckpt (None: the config's model.base_checkpoint)")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from, or 'last' for <output_dir>/ckpts/last.ckpt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output directory that holds a run (its checkpoints and logs go)")
    parser.add_argument("--save_merged", default=None,
                        help="also write the merged model (adapters folded in) here, an SD2-format .safetensors or .ckpt")
    parser.add_argument("--ngpu", type=int, default=1, help="devices per node (GPUs, or CPU processes)")
    parser.add_argument("--num_nodes", type=int, default=1, help="machines (DDP over nodes)")
    parser.add_argument("--accelerator", default="auto", help="auto, gpu, cpu (Lightning's names)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (omegaconf dotlist)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = [(args.max_steps is None or args.max_steps >= 1, f"--max_steps must be at least 1, got {args.max_steps}"),
              (args.resolution is None or (args.resolution > 0 and args.resolution % 64 == 0),
               f"--resolution must be a positive multiple of 64, got {args.resolution}"),
              (args.seed is None or 0 <= args.seed <= MAX_TRAINING_SEED,
               f"--seed must be in [0, {MAX_TRAINING_SEED}], got {args.seed}"),
              (args.ngpu >= 1 and args.num_nodes >= 1, "--ngpu and --num_nodes must be at least 1"),
              (not (args.resume and args.overwrite), "--resume and --overwrite contradict each other")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.random_init:
        log.warning("RANDOM WEIGHTS: --random_init; the backbone is random and the adapters learn nothing useful")
    try:
        train_realfill(args.scene, args.output_dir, config=args.config, max_steps=args.max_steps,
                       resolution=args.resolution, seed=args.seed, precision=args.precision,
                       random_init=args.random_init, base_ckpt=args.base_ckpt, resume=args.resume,
                       overwrite=args.overwrite, accelerator=args.accelerator, devices=args.ngpu,
                       num_nodes=args.num_nodes, save_merged=args.save_merged, overrides=args.overrides)
    except (SceneError, ConfigError, CheckpointError, ImageInputError, FileNotFoundError, FileExistsError,
            ValueError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
