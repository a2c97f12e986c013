r"""Evaluate LeftRefill reference-guided inpainting on test pairs (PSNR / SSIM / LPIPS, as the paper).

    python test_inpainting.py --model_path checkpoints/ref_guided_inpainting --test_path data/samples \
        --output_path outputs/samples --batch_size 1 --cfg 2.5 --eta 1.0 --test_size 512 --metric_size 512

Every image of the test folder is checked before the model is loaded. The output folder holds results/
(test_size, scored), results_fullsize/ (each target at its own size with only the masked part filled),
labelled grids/, metrics.csv and summary.json (status "complete", or "failed" naming the pair); see
leftrefill/evaluation.py. The original script's flags are kept. Under torchrun the processes share out the
pairs and write what one process writes (docs/inference.md, "Evaluating on many GPUs and nodes").

RealFill's seed selection, for LeftRefill: draw K candidates per pair and keep the one whose filled region
has the most verified matches with the reference (candidate k of pair i uses seed + i * K + k):

    python test_inpainting.py --test_path data/samples --output_path outputs/samples_best_of_4 \
        --num_samples 4 --select_by_matches
"""

from __future__ import annotations

import argparse
import logging
import sys

from leftrefill import evaluation_cli
from leftrefill.data.test_pairs import TestPairDataset, check_pair_images
from leftrefill.evaluation import InpaintingTask
from leftrefill.images import ImageInputError
from leftrefill.pipeline import DEFAULT_MODEL_DIR, LeftRefillPipeline
from leftrefill.prep.matching import MatchingError, check_options

log = logging.getLogger("test_inpainting")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the original script's flags, then this project's (leftrefill.evaluation_cli)."""
    parser, extra = evaluation_cli.evaluation_parser(
        __doc__, model_path=str(DEFAULT_MODEL_DIR), test_size=512, output_path="outputs/test_inpainting",
        test_path_help="folder of <id>/{source,target}.{jpg,png} + mask.png",
        eta_help="DDIM eta, for --sampler ddim only (None: 1.0, as the paper's test command)",
        seed_help=evaluation_cli.INPAINTING_SEED_HELP)
    evaluation_cli.add_inpainting_flags(extra)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad value exits with status 2 and one message naming the flag."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    evaluation_cli.check_selection(parser, args)  # first: the seed check counts num_samples seeds per pair
    evaluation_cli.check_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        # 1. the data, every file checked, before 5 GB of SD2 are loaded
        dataset = TestPairDataset(args.test_path, args.test_size, args.mask_path, args.limit)
        check_pair_images(dataset.pairs)
        if args.select_by_matches:  # the matcher's package and weights: a broken install fails now, not at pair 1
            check_options(args.match_method, load_weights=True)
    except (FileNotFoundError, ImageInputError, MatchingError) as err:
        log.error("%s", err)
        return 2
    # 2. the LPIPS weights (small), then the model; 3. the evaluation
    return evaluation_cli.load_and_run(parser, args, LeftRefillPipeline, InpaintingTask(dataset))


if __name__ == "__main__":
    sys.exit(main())
