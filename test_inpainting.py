"""Evaluate LeftRefill reference-guided inpainting on test pairs (PSNR / SSIM / LPIPS, as the paper).

    python test_inpainting.py --model_path checkpoints/ref_guided_inpainting --test_path data/samples \
        --output_path outputs/samples --batch_size 1 --cfg 2.5 --eta 1.0 --test_size 512 --metric_size 512

The original script's flags are kept; see leftrefill/evaluation.py for what is written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.data.test_pairs import TestPairDataset
from leftrefill.evaluation import evaluate
from leftrefill.images import ImageInputError
from leftrefill.metrics import InpaintingMetrics, load_lpips_alex
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, PRECISIONS, LeftRefillPipeline

log = logging.getLogger("test_inpainting")

BANNER = "!" * 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    original = parser.add_argument_group("flags of the original script")
    original.add_argument("--model_path", default=str(DEFAULT_MODEL_DIR),
                          help="model directory (model_config.yaml + ckpts/*.ckpt), or a token checkpoint in one")
    original.add_argument("--batch_size", type=int, default=1, help="pairs per batch")
    original.add_argument("--test_path", required=True, help="folder of <id>/{source,target}.{jpg,png} + mask.png")
    original.add_argument("--cfg", type=float, default=2.5, help="classifier-free guidance scale")
    original.add_argument("--test_size", type=int, default=512, help="each view is resized to this square size")
    original.add_argument("--metric_size", type=int, default=None,
                          help="area-downsample results and ground truth to this size for the metrics "
                               "(default: test_size)")
    original.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1.0 as the paper's test command)")
    original.add_argument("--output_path", default="outputs/test_inpainting", help="where results are written")
    extra = parser.add_argument_group("additional flags")
    extra.add_argument("--steps", type=int, default=50, help="DDIM steps")
    extra.add_argument("--seed", type=int, default=42, help="pair i is sampled with seed + i")
    extra.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                       help="auto: fp16 on CUDA, fp32 on CPU")
    extra.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    extra.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    extra.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    extra.add_argument("--random_init", action="store_true",
                       help="random weights instead of the checkpoints: exercises the code path, results are noise")
    extra.add_argument("--mask_path", default=None, help="folder of masks used instead of mask.png (cycled)")
    extra.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    extra.add_argument("--lpips_weights", default=None,
                       help="AlexNet backbone for LPIPS (alexnet-owt-7be5be79.pth); default: pretrained_models/ "
                            "or $TORCH_HOME/hub/checkpoints/")
    args = parser.parse_args(argv)
    args.metric_size = args.metric_size or args.test_size
    checks = [(args.batch_size >= 1, "--batch_size must be at least 1"),
              (1 <= args.steps <= 1000, "--steps must be in [1, 1000]"),
              (args.test_size > 0 and args.test_size % 64 == 0, "--test_size must be a positive multiple of 64"),
              (7 <= args.metric_size <= args.test_size, "--metric_size must be in [7, test_size] (SSIM uses a "
                                                         "7x7 window)"),
              (args.limit is None or args.limit >= 1, "--limit must be at least 1"),
              (args.cfg >= 0, "--cfg must be >= 0"), (args.eta >= 0, "--eta must be >= 0")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        # Cheap checks first: the data and the LPIPS weights, before loading 5 GB of SD2.
        dataset = TestPairDataset(args.test_path, args.test_size, args.mask_path, args.limit)
        lpips_model = None if args.no_lpips else load_lpips_alex(args.lpips_weights)
        pipe = LeftRefillPipeline.from_model_dir(args.model_path, args.base_ckpt, device=args.device,
                                                 precision=args.precision, random_init=args.random_init,
                                                 test_size=args.test_size)
    except (FileNotFoundError, ImageInputError, CheckpointError, ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    if lpips_model is not None:
        lpips_model.to(pipe.device)
    if pipe.random_weights:
        _announce_random_weights()
    log.info("%d pairs from %s -> %s (%s, %s)", len(dataset), args.test_path, args.output_path, pipe.device,
             str(pipe.dtype).removeprefix("torch."))
    try:
        summary = evaluate(pipe, dataset, args.output_path, InpaintingMetrics(args.metric_size, lpips_model),
                           batch_size=args.batch_size, steps=args.steps, cfg=args.cfg, eta=args.eta, seed=args.seed,
                           settings=vars(args))
    except ImageInputError as err:
        log.error("%s", err)
        return 2
    means = ", ".join(f"{name} {value:.4f}" for name, value in summary["metrics"].items())
    log.info("%d pairs scored: %s; written to %s", summary["num_scored"], means, args.output_path)
    if pipe.random_weights:
        _announce_random_weights()
    if summary["non_finite_outputs"]:
        log.error("%d result(s) held NaN or infinite values (listed in summary.json)", len(summary["non_finite_outputs"]))
        return 1
    return 0


def _announce_random_weights() -> None:
    log.warning("\n%s\n!!! RANDOM WEIGHTS (--random_init): outputs are noise, metrics are meaningless. This run only "
                "exercises the code path.\n%s", BANNER, BANNER)


if __name__ == "__main__":
    sys.exit(main())
