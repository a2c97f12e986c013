r"""Evaluate LeftRefill reference-guided inpainting on test pairs (PSNR / SSIM / LPIPS, as the paper).

    python test_inpainting.py --model_path checkpoints/ref_guided_inpainting --test_path data/samples \
        --output_path outputs/samples --batch_size 1 --cfg 2.5 --eta 1.0 --test_size 512 --metric_size 512

Every image of the test folder is checked before the model is loaded. The output folder holds results/
(test_size, scored), results_fullsize/ (each target at its own size with only the masked part filled),
labelled grids/, metrics.csv and summary.json (status "complete", or "failed" naming the pair); see
leftrefill/evaluation.py. The original script's flags are kept.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.checkpoint import CheckpointError
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options
from leftrefill.cli import HelpFormatter, precision
from leftrefill.data.test_pairs import TestPairDataset, check_pair_images
from leftrefill.evaluation import evaluate
from leftrefill.images import ImageInputError
from leftrefill.metrics import InpaintingMetrics, load_lpips_alex
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, LeftRefillPipeline

log = logging.getLogger("test_inpainting")

BANNER = "!" * 100


def build_parser() -> argparse.ArgumentParser:
    """The command line: the original script's flags, then this project's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    original = parser.add_argument_group("flags of the original script")
    original.add_argument("--model_path", default=str(DEFAULT_MODEL_DIR),
                          help="model directory (model_config.yaml + ckpts/*.ckpt), or a token checkpoint in one")
    original.add_argument("--batch_size", type=int, default=1, help="pairs per batch")
    original.add_argument("--test_path", required=True, help="folder of <id>/{source,target}.{jpg,png} + mask.png")
    original.add_argument("--cfg", type=float, default=2.5, help="classifier-free guidance scale (finite, >= 0)")
    original.add_argument("--test_size", type=int, default=512, help="each view is resized to this square size")
    original.add_argument("--metric_size", type=int, default=None,
                          help="area-downsample results and ground truth to this size for the metrics "
                               "(None: test_size)")
    original.add_argument("--eta", type=float, default=None,
                          help="DDIM eta, for --sampler ddim only (None: 1.0, as the paper's test command)")
    original.add_argument("--output_path", default="outputs/test_inpainting", help="where results are written")
    extra = parser.add_argument_group("additional flags")
    extra.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                       help="ddim (the paper's), ddpm (ancestral), dpmpp_2m (DPM-Solver++(2M): at 20 steps its error "
                            "was below DDIM's at 50 in docs/benchmarks.md), dpmpp_2m_sde")
    extra.add_argument("--steps", type=int, default=50, help="sampler steps, in [1, 999]")
    extra.add_argument("--strength", type=float, default=1.0,
                       help="in (0, 1]: start from the target noised to this fraction of the steps and run only "
                            "those (SDEdit); 1: from pure noise")
    extra.add_argument("--seed", type=int, default=42,
                       help="pair i is sampled with seed + i; seed + number of pairs - 1 must stay below 2^63")
    extra.add_argument("--precision", type=precision, default="auto",
                       help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (or 32, 16-mixed, bf16-mixed)")
    extra.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda when available)")
    extra.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs (None: all)")
    extra.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    extra.add_argument("--random_init", action="store_true",
                       help="random weights instead of the checkpoints: exercises the code path, results are noise")
    extra.add_argument("--mask_path", default=None,
                       help="folder of masks used instead of each pair's mask.png, cycled (None: mask.png)")
    extra.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    extra.add_argument("--lpips_weights", default=None,
                       help="AlexNet backbone for LPIPS (alexnet-owt-7be5be79.pth); None: pretrained_models/ "
                            "or $TORCH_HOME/hub/checkpoints/")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad value exits with status 2 and one message naming the flag."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    args.metric_size = args.metric_size or args.test_size
    checks = [(args.batch_size >= 1, "--batch_size must be at least 1"),
              (args.test_size > 0 and args.test_size % 64 == 0, "--test_size must be a positive multiple of 64"),
              (7 <= args.metric_size <= args.test_size, "--metric_size must be in [7, test_size] (SSIM uses a "
                                                         "7x7 window)"),
              (args.limit is None or args.limit >= 1, "--limit must be at least 1")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    _check_sampling(parser, args, num_pairs=args.limit or 1)  # the seed again once the pairs are counted
    return args


def _check_sampling(parser: argparse.ArgumentParser, args: argparse.Namespace, num_pairs: int) -> None:
    """--sampler, --steps, --cfg, --eta, --strength and --seed (with seed + num_pairs - 1, the last pair's seed),
    or a parser error."""
    try:
        check_sampling_options(steps=args.steps, cfg=args.cfg, eta=args.eta, seed=args.seed, num_seeds=num_pairs,
                               strength=args.strength, sampler=args.sampler, flags=True)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        # 1. the data, every file checked, before 5 GB of SD2 are loaded
        dataset = TestPairDataset(args.test_path, args.test_size, args.mask_path, args.limit)
        check_pair_images(dataset.pairs)
    except (FileNotFoundError, ImageInputError) as err:
        log.error("%s", err)
        return 2
    _check_sampling(parser, args, num_pairs=len(dataset))
    try:
        # 2. the LPIPS weights (small), then the model
        lpips_model = None if args.no_lpips else load_lpips_alex(args.lpips_weights)
        pipe = LeftRefillPipeline.from_model_dir(args.model_path, args.base_ckpt, device=args.device,
                                                 precision=args.precision, random_init=args.random_init,
                                                 test_size=args.test_size)
    except (FileNotFoundError, ImageInputError, CheckpointError, ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    if lpips_model is not None:
        lpips_model.to(pipe.device)
    return _run(pipe, dataset, InpaintingMetrics(args.metric_size, lpips_model), args)


def _run(pipe: LeftRefillPipeline, dataset: TestPairDataset, metrics: InpaintingMetrics,
         args: argparse.Namespace) -> int:
    """3. Evaluate with log lines printed above the progress bars, not across them; the exit status."""
    if pipe.random_weights:
        _announce_random_weights()
    log.info("%d pairs from %s -> %s (%s, %s)", len(dataset), args.test_path, args.output_path, pipe.device,
             str(pipe.dtype).removeprefix("torch."))
    try:
        with logging_redirect_tqdm(tqdm_class=tqdm):
            sampling = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta,
                        "strength": args.strength}
            summary = evaluate(pipe, dataset, args.output_path, metrics, batch_size=args.batch_size, seed=args.seed,
                               sampling=sampling, settings=vars(args))
    except ImageInputError as err:
        log.error("%s", err)
        return 2
    except torch.cuda.OutOfMemoryError:
        log.error("out of GPU memory with --batch_size %d; try a smaller --batch_size, or --precision fp16",
                  args.batch_size)
        return 1
    return _report(summary, pipe, args.output_path)


def _report(summary: dict, pipe: LeftRefillPipeline, output_path: str) -> int:
    """Log the means; 1 when a result held NaN or infinite values, else 0."""
    means = ", ".join(f"{name} {'n/a' if value is None else format(value, '.4f')}"
                      for name, value in summary["metrics"].items())
    log.info("%d pairs scored: %s; written to %s", summary["num_scored"], means, output_path)
    if pipe.random_weights:
        _announce_random_weights()
    if summary["non_finite_outputs"]:
        log.error("%d result(s) held NaN or infinite values (listed in summary.json)",
                  len(summary["non_finite_outputs"]))
        return 1
    return 0


def _announce_random_weights() -> None:
    log.warning("\n%s\n!!! RANDOM WEIGHTS (--random_init): outputs are noise, metrics are meaningless. This run only "
                "exercises the code path.\n%s", BANNER, BANNER)


if __name__ == "__main__":
    sys.exit(main())
