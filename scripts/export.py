r"""Export a LeftRefill model for other tools, or import a textual inversion or a LoRA from them (docs/export.md).

    python scripts/export.py --model_path checkpoints/ref_guided_inpainting --format diffusers-ti \
        --out leftrefill.safetensors                      # then pipe.load_textual_inversion(..., token="<leftrefill>")
    python scripts/export.py --model_path checkpoints/ref_guided_inpainting --format a1111 --out leftrefill.pt
    python scripts/export.py --import leftrefill.safetensors --out checkpoints/imported_tokens
    python scripts/export.py --model_path checkpoints/realfill_scene --format diffusers-lora --out scene.safetensors
    python scripts/export.py --model_path checkpoints/realfill_scene --format kohya --out scene_kohya.safetensors
    python scripts/export.py --import scene.safetensors --base_model checkpoints/realfill --out checkpoints/imported
    python scripts/export.py --model_path checkpoints/realfill_scene --format sd2 --out scene_merged.safetensors \
        --base_ckpt pretrained_models/512-inpainting-ema.ckpt   # then from_single_file, A1111, or --base_ckpt here

Formats: diffusers-ti (safetensors {token: (n, width)}), a1111 (.pt or .safetensors by the --out suffix);
LoRA adapters (UNet, text encoder): diffusers-lora (pipe.load_lora_weights) and kohya (A1111, ComfyUI);
sd2: the adapters merged into --base_ckpt, an SD2-format checkpoint (.safetensors or .ckpt by the --out suffix).
--import tells a LoRA file (lora_A / lora_down keys) from a textual inversion by its keys.
Exit status: 0 written; 2 bad input (nothing to export, a width, rank or layer set that does not fit, a wrong
suffix, an unreadable file, a model an SD2 checkpoint cannot hold, another base checkpoint than the adapters').
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.cli import HelpFormatter
from leftrefill.export_merged import FORMAT as MERGED_FORMAT
from leftrefill.export_merged import export_merged
from leftrefill.export_lora import FORMATS as LORA_FORMATS
from leftrefill.export_lora import export_lora, import_lora, is_lora_file
from leftrefill.export_tokens import (DEFAULT_BASE_CONFIG, DEFAULT_TOKEN, FORMATS, ExportError, export_tokens,
                                      import_textual_inversion)
from leftrefill.pipeline import DEFAULT_BASE_CKPT

log = logging.getLogger("export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_path", type=Path, help="export: a model directory or a trained file inside one")
    source.add_argument("--import", dest="import_file", type=Path,
                        help="import: a diffusers or A1111 textual-inversion file, or a diffusers or kohya LoRA; --out "
                             "is the model directory made")
    parser.add_argument("--format", choices=FORMATS + LORA_FORMATS + (MERGED_FORMAT,), default="diffusers-ti",
                        help="export format: prompt tokens (diffusers-ti, a1111), LoRA adapters (diffusers-lora, "
                             "kohya), or the adapters merged into the base model as an SD2 checkpoint (sd2)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the embedding's token (diffusers) or name (A1111)")
    parser.add_argument("--base_config", type=Path, default=DEFAULT_BASE_CONFIG,
                        help="import: the model config the directory gets (its text encoder width must match)")
    parser.add_argument("--base_model", type=Path,
                        help="LoRA import: the model directory the LoRA was trained on (config, and an adapter or "
                             "tokens to keep); required for a LoRA")
    parser.add_argument("--base_ckpt", type=Path, default=DEFAULT_BASE_CKPT,
                        help="sd2: the SD2 inpainting checkpoint the adapters were trained on (a bare name is "
                             "looked up in pretrained_models/)")
    parser.add_argument("--random_init", action="store_true",
                        help="sd2: merge into seeded random base weights instead of --base_ckpt (tries the code "
                             "path; the result is noise)")
    parser.add_argument("--overwrite", action="store_true", help="import: replace an existing model directory")
    parser.add_argument("--out", type=Path, required=True, help="the file (export) or model directory (import)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.import_file is not None and is_lora_file(args.import_file):
            if args.base_model is None:
                raise ExportError(f"{args.import_file} is a LoRA: give --base_model, the model directory it was "
                                  f"trained on (e.g. checkpoints/realfill or checkpoints/nvs_objaverse)")
            out = import_lora(args.import_file, args.out, args.base_model, overwrite=args.overwrite)
        elif args.import_file is not None:
            out = import_textual_inversion(args.import_file, args.out, args.base_config, overwrite=args.overwrite)
        elif args.format == MERGED_FORMAT:
            out = export_merged(args.model_path, args.out, base_ckpt=args.base_ckpt, random_init=args.random_init)
        elif args.format in LORA_FORMATS:
            out = export_lora(args.model_path, args.format, args.out)
        else:
            out = export_tokens(args.model_path, args.format, args.out, token=args.token)
    except (ExportError, CheckpointError, ConfigError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
