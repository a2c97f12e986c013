"""The LeftRefill demo page: reference-guided inpainting in the browser.

    python ref_inpainting_gradio.py                      # http://127.0.0.1:7860, released tokens + SD2
    python ref_inpainting_gradio.py --server_name 0.0.0.0 --server_port 8080 --share

Without pretrained_models/512-inpainting-ema.ckpt the page starts with a tiny random-weight model and
says so, so that the interface can be tried on any machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.demo import build_demo
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, PRECISIONS, LeftRefillPipeline

log = logging.getLogger("ref_inpainting_gradio")
TINY_MODEL_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny_random"  # works from any folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=str(DEFAULT_MODEL_DIR), help="model directory or token checkpoint")
    parser.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto")
    parser.add_argument("--server_name", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--server_port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max_samples", type=int, default=4, help="largest number of samples per request")
    parser.add_argument("--max_file_size", default="20mb", help="largest upload Gradio accepts")
    return parser.parse_args(argv)


def load_pipeline(args: argparse.Namespace) -> tuple[LeftRefillPipeline, str]:
    """The real model when the SD2 checkpoint is there; otherwise the tiny random one (announced)."""
    if Path(args.base_ckpt).is_file():
        pipe = LeftRefillPipeline.from_model_dir(args.model_path, args.base_ckpt, device=args.device,
                                                 precision=args.precision)
        return pipe, f"tokens from `{args.model_path}`, base `{args.base_ckpt}`"
    log.warning("%s not found: starting with a tiny random-weight model; results will be noise", args.base_ckpt)
    pipe = LeftRefillPipeline.from_model_dir(TINY_MODEL_DIR, device=args.device, precision=args.precision,
                                             random_init=True, test_size=256)
    return pipe, f"tiny random model `{TINY_MODEL_DIR}`"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        pipe, description = load_pipeline(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    demo = build_demo(pipe, description, max_samples=args.max_samples)
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.launch(server_name=args.server_name, server_port=args.server_port, share=args.share,
                max_file_size=args.max_file_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
