r"""Evaluate multi-view LeftRefill: each target filled from all its references at once (PSNR / SSIM / LPIPS).

    python test_multiview_inpainting.py --model_path checkpoints/multiview_ref_inpainting \
        --test_path data/megadepth_multiview_test --output_path outputs/megadepth_multiview_test
    python test_multiview_inpainting.py --model_path checkpoints/tiny_random_multiview --random_init \
        --test_path data/samples_multiview --test_size 64 --steps 2 --no_lpips    # the code path, in seconds

The test folder has the release's layout (METHOD 3.2): <id>/source.jpg, source_1.jpg, source_2.jpg, ...
(the references, most overlapping first), target.jpg and mask.png (white = fill); .png fallbacks are
accepted. A model trained for V views uses the first V - 1 sources of each folder; --view_num, when given,
must be the model's V. Every image is checked before the model is loaded.

Defaults follow the release's multi-view test script (METHOD 7.4): seed 666, cfg 1.0, DDIM eta 0, batch 4;
test_inpainting.py and the Python API keep the one-reference paper settings (cfg 2.5, eta 1.0, seed 42).
Unlike the release, --limit takes the first N folders (it strided the folders to 482) and item i draws
from its own seed + i, so results do not depend on the batch size.

The output folder holds what test_inpainting.py writes: results/ (test_size, scored), results_fullsize/
(each target at its own size, only the masked part filled), grids/ (labelled: every reference, the masked
target, the result, the ground truth), metrics.csv and summary.json (with the model's view_num and each
item's references); see leftrefill/evaluation.py. Under torchrun the processes share out the items and
write what one process writes (docs/inference.md, "Evaluating on many GPUs and nodes").
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.util import ConfigError
from leftrefill import evaluation_cli
from leftrefill.arguments import takes_eta
from leftrefill.data.multiview import MultiViewTestDataset, check_multiview_test_images
from leftrefill.evaluation import MultiViewInpaintingTask
from leftrefill.images import ImageInputError
from leftrefill.multiview_inpaint import references_per_sample
from leftrefill.multiview_pipeline import MultiViewPipeline, multiview_conditioner
from leftrefill.pipeline import WrongTaskError
from leftrefill.prep.matching import MatchingError, check_options

log = logging.getLogger("test_multiview_inpainting")

DEFAULT_MODEL_DIR = "multiview_ref_inpainting"  # checkpoints/multiview_ref_inpainting (leftrefill.paths): the config
# The release's test_multiview_inpainting.py (METHOD 7.4)
RELEASE_DEFAULTS = {"seed": 666, "cfg": 1.0, "batch_size": 4}
RELEASE_ETA = 0.0


def build_parser() -> argparse.ArgumentParser:
    """The command line: test_inpainting.py's flags (leftrefill.evaluation_cli) with the release's multi-view
    defaults, and --view_num."""
    parser, extra = evaluation_cli.evaluation_parser(
        __doc__, model_path=DEFAULT_MODEL_DIR, test_size=512, output_path="outputs/test_multiview_inpainting",
        test_path_help="folder of <id>/{source,source_1,...,target}.{jpg,png} + mask.png",
        eta_help=f"DDIM eta, for --sampler ddim only (None: {RELEASE_ETA}, the release's multi-view test script)",
        seed_help=evaluation_cli.INPAINTING_SEED_HELP)
    evaluation_cli.add_inpainting_flags(extra)
    parser.set_defaults(**RELEASE_DEFAULTS)
    views = parser.add_argument_group("multi-view")
    views.add_argument("--view_num", type=int, default=None,
                       help="the model's number of views: the target and view_num - 1 references (source.jpg, "
                            "source_1.jpg, ...); must match the model (None: the model's)")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad value exits with status 2 and one message naming the flag."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.eta is None and takes_eta(args.sampler):
        args.eta = RELEASE_ETA
    if args.view_num is not None and args.view_num < 2:
        parser.error(f"--view_num must be at least 2 (the target and one reference), got {args.view_num}")
    evaluation_cli.check_selection(parser, args)  # first: the seed check counts num_samples seeds per pair
    evaluation_cli.check_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        # 1. the model's views from its config (no weights read), then the data, every file checked
        embedder = multiview_conditioner(args.model_path)
        if args.view_num is not None and args.view_num != embedder.num_views:
            log.error("--model_path %s was trained for %d views; --view_num %d does not match it (leave --view_num "
                      "out to use the model's)", args.model_path, embedder.num_views, args.view_num)
            return 2
        args.view_num = embedder.num_views
        dataset = MultiViewTestDataset(args.test_path, args.test_size, references_per_sample(embedder) + 1,
                                       args.mask_path, args.limit)
        check_multiview_test_images(dataset.items)
        if args.select_by_matches:  # the matcher's package and weights: a broken install fails now
            check_options(args.match_method, load_weights=True)
    except WrongTaskError as err:
        log.error("--model_path %s: %s", args.model_path, err)
        return 2
    except (FileNotFoundError, ConfigError, ImageInputError, MatchingError) as err:
        log.error("%s", err)
        return 2
    # 2. the LPIPS weights (small), then the model; 3. the evaluation
    return evaluation_cli.load_and_run(parser, args, MultiViewPipeline,
                                       MultiViewInpaintingTask(dataset, view_num=args.view_num))


if __name__ == "__main__":
    sys.exit(main())
