r"""Evaluate LeftRefill novel view synthesis on Objaverse renders (PSNR / SSIM / LPIPS of the new view).

    python test_nvs.py --model_path checkpoints/NVS_OBJ_V0 --test_path views_release --object_list obj_test.txt \
        --output_path outputs/test_nvs --mask_mode reference --test_size 256
    python test_nvs.py --model_path checkpoints/tiny_random_nvs --random_init --test_path \
        data/samples_nvs/views_release --test_size 64 --steps 2 --no_lpips    # the code path, in seconds

Per object of --object_list (default: every folder of --test_path), view --reference_view (2) is the
reference and view --target_view (0) the view to make, as the release. --mask_mode says what the model is
shown of the target: "reference" (default, the release's deployment setting: nothing, and the region to
generate is the reference's silhouette), "fixed" (the target outside the test mask <mask_path>/<uid>/
000.png) or "complete" (nothing: the whole view is generated). The metrics compare the whole generated
view with the ground-truth render, nothing blended (METHOD 2.5). Every render, camera and mask is checked
before the model is loaded. The output folder holds results/, labelled grids/, metrics.csv and
summary.json; see leftrefill/evaluation.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from leftrefill import evaluation_cli
from leftrefill.data.objaverse_nvs import (MASK_MODES, NUM_VIEWS, NVSDataError, check_test_arguments,
                                          check_test_files, nvs_test_pairs)
from leftrefill.evaluation import NVSTask
from leftrefill.images import ImageInputError
from leftrefill.nvs_pipeline import NVSPipeline

log = logging.getLogger("test_nvs")

DEFAULT_MODEL_DIR = Path("checkpoints/nvs_objaverse")  # config only until NVS weights are trained into it


def build_parser() -> argparse.ArgumentParser:
    """The command line: test_inpainting.py's flags (leftrefill.evaluation_cli), then the views and masks."""
    parser, _ = evaluation_cli.evaluation_parser(
        __doc__, model_path=str(DEFAULT_MODEL_DIR), test_size=NVSPipeline.default_test_size,
        output_path="outputs/test_nvs", test_path_help="views_release folder: <uid>/000.png ... 011.png + .npy cameras",
        eta_help=f"DDIM eta, for --sampler ddim only (None: {NVSPipeline.default_eta}, the release's validation "
                 f"setting)")
    views = parser.add_argument_group("novel view synthesis")
    views.add_argument("--object_list", default=None,
                       help="file of object uids, one per line, e.g. obj_test.txt (None: every folder of --test_path)")
    views.add_argument("--reference_view", type=int, default=2, help=f"view shown to the model, in [0, {NUM_VIEWS})")
    views.add_argument("--target_view", type=int, default=0, help=f"view to generate and score, in [0, {NUM_VIEWS})")
    views.add_argument("--mask_mode", default="reference", choices=MASK_MODES,
                       help="reference: generate the reference's silhouette, target unseen; fixed: the target "
                            "outside --mask_path's mask is shown; complete: generate the whole view")
    views.add_argument("--mask_path", default=None,
                       help="--mask_mode fixed only: folder of <uid>/<target_view:03d>.png masks, white = generate")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags; a bad value exits with status 2 and one message naming the flag."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    evaluation_cli.check_args(parser, args)
    try:  # the dataset's own check, which names these flags
        check_test_arguments(args.test_size, NUM_VIEWS, args.reference_view, args.target_view, args.mask_mode,
                             args.mask_path)
    except ValueError as err:
        parser.error(str(err))
    if args.mask_mode != "fixed" and args.mask_path is not None:
        parser.error(f"--mask_path is for --mask_mode fixed only; --mask_mode {args.mask_mode} makes its own masks")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        # 1. the data: every render, camera and mask checked before 5 GB of SD2 are loaded
        dataset = nvs_test_pairs(args.test_path, args.object_list, size=args.test_size,
                                 reference_view=args.reference_view, target_view=args.target_view,
                                 mask_mode=args.mask_mode, mask_path=args.mask_path, limit=args.limit)
        check_test_files(dataset)
    except (NVSDataError, ImageInputError) as err:
        log.error("%s", err)
        return 2
    # 2. the LPIPS weights (small), then the model; 3. the evaluation
    return evaluation_cli.load_and_run(parser, args, NVSPipeline, NVSTask(dataset))


if __name__ == "__main__":
    sys.exit(main())
