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
summary.json; see leftrefill/evaluation.py. Under torchrun the processes share out the objects and write
what one process writes (docs/inference.md, "Evaluating on many GPUs and nodes").

With a block-causal multi-view NVS model (MultiViewPosePromptCLIPEmbedder, METHOD 3.3, e.g.
checkpoints/nvs_autoregressive) --views K scores --target_view generated as the last of K views, after K - 1
earlier views of the object (--earlier_views; default the first K - 1 renders other than the reference and
the target): given as ground truth, or with --autoregressive generated one after another from the reference
alone (then written to generated/<view>/<id>.png). A view the model sees as known carries, by default
(--known_masks adaptive), the adaptive mask of its own silhouette, as in training; --known_masks given keeps
the --mask_mode mask. K defaults to the model's number of views; K = 1 is one-reference NVS through that
model, with the same seed. The scored view is the same render with the same initial noise for every K, so a
sweep over K scores one view with more and more views before it; see leftrefill/nvs_autoregressive_eval.py.

    python test_nvs.py --model_path checkpoints/tiny_random_nvs_autoregressive --random_init --views 2 \
        --test_path data/samples_nvs/views_release --test_size 64 --steps 2 --no_lpips
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldm.util import ConfigError
from leftrefill import evaluation_cli, nvs_autoregressive_eval
from leftrefill.data.objaverse_nvs import (MASK_MODES, NUM_VIEWS, NVSDataError, check_test_arguments,
                                          check_test_files, nvs_test_pairs)
from leftrefill.evaluation import NVSTask
from leftrefill.images import ImageInputError
from leftrefill.nvs_autoregressive import KNOWN_MASKS, AutoregressiveNVSPipeline, autoregressive_view_count
from leftrefill.nvs_autoregressive_eval import AutoregressiveNVSTask, last_view_test_items
from leftrefill.nvs_pipeline import DEFAULT_MODEL_DIR, NVSPipeline

log = logging.getLogger("test_nvs")



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
    multi = parser.add_argument_group("autoregressive multi-view NVS (a block-causal multi-view model only)")
    multi.add_argument("--views", type=int, default=None,
                       help="K: --target_view is generated as the last of K views (None: one more than "
                            "--earlier_views, else the model's number of views; 1 for a one-view model)")
    multi.add_argument("--earlier_views", type=int, nargs="+", default=None,
                       help="the K - 1 renders before the target, in order (None: the first K - 1 indices other "
                            "than --reference_view and --target_view)")
    multi.add_argument("--autoregressive", action="store_true",
                       help="generate the earlier views from the reference, one after another, instead of giving "
                            "their ground truth; all K are written to generated/<view>/<id>.png")
    multi.add_argument("--known_masks", default="adaptive", choices=KNOWN_MASKS,
                       help="the mask in the concat channels of an earlier (known) view: adaptive, that of its own "
                            "silhouette (pixels not near white) as in training; given, its --mask_mode mask")
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
    if args.views is not None and args.views < 1:
        parser.error(f"--views must be at least 1, got {args.views}")
    return args


def multiview_flags(args: argparse.Namespace) -> str | None:
    """The multi-view flags given, as typed (None: none): a one-view model refuses them."""
    given = [f"--views {args.views}"] if args.views not in (None, 1) else []
    given += [f"--earlier_views {' '.join(map(str, args.earlier_views))}"] if args.earlier_views is not None else []
    given += ["--autoregressive"] if args.autoregressive else []
    given += [f"--known_masks {args.known_masks}"] if args.known_masks != "adaptive" else []
    return " ".join(given) or None


def model_views(args: argparse.Namespace) -> int | None:
    """The autoregressive model's number of views, read from --model_path's config; None for another model,
    or when the directory cannot be read and no multi-view flag needs it (the model's load then says why)."""
    try:
        return autoregressive_view_count(args.model_path)
    except (FileNotFoundError, ConfigError):
        if multiview_flags(args) is None:
            return None
        raise


def evaluation_task(args: argparse.Namespace) -> tuple[type[NVSPipeline], NVSTask]:
    """The pipeline class and the task for --model_path's kind of model, every test file checked; bad input
    raises (NVSDataError, ImageInputError, FileNotFoundError, ConfigError or another ValueError) naming it.
    Sets ``args.views`` to the K used (1 for a one-view model)."""
    # 1. which model: one-view, or block-causal multi-view, and its views (from its config alone)
    views = model_views(args)
    if views is None and multiview_flags(args):
        raise ValueError(f"{multiview_flags(args)}: needs a block-causal multi-view NVS model "
                         f"(MultiViewPosePromptCLIPEmbedder, e.g. checkpoints/nvs_autoregressive); --model_path "
                         f"{args.model_path} holds another model (a one-view NVS model scores its one view: leave "
                         f"out the multi-view flags)")
    if args.views is None:  # as many as --earlier_views says, else the model's
        args.views = len(args.earlier_views) + 1 if args.earlier_views is not None else views or 1
    if views is not None and args.views > views:
        raise ValueError(f"--views {args.views}: --model_path {args.model_path} is an autoregressive NVS model of "
                         f"{views} views; --views must be in [1, {views}]")
    # 2. the data: every render, camera and mask checked before 5 GB of SD2 are loaded
    if views is None:
        dataset = nvs_test_pairs(args.test_path, args.object_list, size=args.test_size,
                                 reference_view=args.reference_view, target_view=args.target_view,
                                 mask_mode=args.mask_mode, mask_path=args.mask_path, limit=args.limit)
        check_test_files(dataset)
        return NVSPipeline, NVSTask(dataset)
    dataset = last_view_test_items(args.test_path, args.object_list, size=args.test_size, views=args.views,
                                   reference_view=args.reference_view, target_view=args.target_view,
                                   earlier_views=args.earlier_views, mask_mode=args.mask_mode,
                                   mask_path=args.mask_path, limit=args.limit)
    nvs_autoregressive_eval.check_test_files(dataset)
    return AutoregressiveNVSPipeline, AutoregressiveNVSTask(dataset, args.autoregressive, args.known_masks)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        pipeline_class, task = evaluation_task(args)
    except (NVSDataError, ImageInputError, FileNotFoundError, ConfigError, ValueError) as err:
        log.error("%s", err)
        return 2
    # 3. the LPIPS weights (small), then the model; 4. the evaluation
    return evaluation_cli.load_and_run(parser, args, pipeline_class, task)


if __name__ == "__main__":
    sys.exit(main())
