r"""Export the trained tensors of a training checkpoint to one .safetensors file (no pickle).

    python scripts/export_trained.py --checkpoint checkpoints/NVS_OBJ_LORA/ckpts/last.ckpt \
        --out checkpoints/nvs_lora/nvs_lora.safetensors

The file holds exactly the run's trainable set (prompt tokens, pose MLP, a LoRA adapter or a UNet) and the
training metadata (config, trainable groups, base checkpoint hash) in its header, so that a model directory
with ``model_config.yaml`` beside it loads it as it loads the checkpoint (LoRA adapters included).
Exit status: 0 written; 2 bad input (a missing or unreadable checkpoint, a wrong --out suffix).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError
from leftrefill.checkpoint_io import export_safetensors
from leftrefill.cli import HelpFormatter

log = logging.getLogger("export_trained")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint written by training")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        out = export_safetensors(args.checkpoint, args.out)
    except (CheckpointError, ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
