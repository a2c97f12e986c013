r"""Fill a RealFill scene's target with its fine-tuned model, rank the samples by matches with the references,
and evaluate on RealBench (docs/realfill.md).

    # one scene: 16 samples (DDPM, 200 steps, guidance 1, as the reference), the best 4 kept
    python test_realfill.py --scene data/samples_realfill/sacre_coeur --model_path checkpoints/realfill_sacre_coeur \
        --output_path outputs/realfill_sacre_coeur
    # RealBench: every scene with target/gt.png, model <model_path>/<scene name> (train_realfill.py --output_dir)
    python test_realfill.py --benchmark_root data/RealBench --model_path checkpoints/realbench \
        --output_path outputs/realbench --dino_path pretrained_models/dino-vits16 \
        --clip_path pretrained_models/clip-vit-base-patch32
    # the code path in seconds: tiny random model
    python test_realfill.py --scene data/samples_realfill/sacre_coeur --model_path checkpoints/tiny_random_realfill \
        --random_init --num_samples 2 --steps 4 --keep 1 --output_path outputs/tiny_realfill

A scene: <scene>/ref/*.{jpg,png} (1 to 5), target/target.png, target/mask.png (white = fill), target/gt.png
(the benchmark's ground truth). Output per scene: samples/<k>.png (seed + k, target size, soft composite),
scores.csv, top/<rank>_<k>.png, a labelled grid.png; with --benchmark_root also metrics.csv and summary.json
(metrics over all samples and over the top 75/50/25 % by matches). Under torchrun, --benchmark_root's scenes
are shared out among the processes, which write what one process writes (docs/inference.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.checkpoint import CheckpointError
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options
from leftrefill.cli import HelpFormatter, precision
from leftrefill.data.realfill import SceneError, read_scene
from leftrefill.images import ImageInputError
from leftrefill.metrics import load_lpips_alex
from leftrefill.pipeline import DEFAULT_BASE_CKPT, WrongTaskError, resolve_device_and_dtype
from leftrefill.prep.matching import DEFAULT_METHOD, METHODS, MatchingError, check_options
from leftrefill.realbench import RealBenchMetrics
from leftrefill.realfill_eval import benchmark_scenes, evaluate_benchmark, fill_scene
from leftrefill.realfill_pipeline import (DEFAULT_CFG, DEFAULT_NUM_SAMPLES, DEFAULT_SAMPLER, DEFAULT_STEPS,
                                          RealFillPipeline)
from leftrefill.selection import REGIONS
from leftrefill.sharding import LaunchError, RankFailedError, Shard, sharded_run

log = logging.getLogger("test_realfill")
ERRORS = (SceneError, ImageInputError, CheckpointError, ConfigError, FileNotFoundError, WrongTaskError, MatchingError,
          ValueError)
MATCH_METHODS = tuple(method for method in METHODS if method != "loftr")  # LoFTR needs a weights flag: match_pairs.py


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scene", default=None, help="one scene folder (RealBench layout)")
    where.add_argument("--benchmark_root", default=None,
                       help="a folder of scenes; those with target/gt.png are filled and scored")
    parser.add_argument("--model_path", required=True,
                        help="the scene's model directory (train_realfill.py --output_dir); with --benchmark_root a "
                             "folder holding one per scene, named as the scenes")
    parser.add_argument("--output_path", default="outputs/test_realfill", help="where results are written")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_samples", type=int, default=DEFAULT_NUM_SAMPLES, help="samples per scene")
    sampling.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=list(SAMPLERS),
                          help="ddpm (ancestral, the reference's), ddim, dpmpp_2m, dpmpp_2m_sde")
    sampling.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps, in [1, 999]")
    sampling.add_argument("--cfg", type=float, default=DEFAULT_CFG,
                          help="classifier-free guidance (1: the conditional branch alone, as the reference)")
    sampling.add_argument("--eta", type=float, default=None, help="DDIM eta, for --sampler ddim only (None: 0)")
    sampling.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    sampling.add_argument("--batch_size", type=int, default=4, help="samples per UNet batch")
    selection = parser.add_argument_group("seed selection")
    selection.add_argument("--keep", type=int, default=4, help="how many of the best samples go to top/")
    selection.add_argument("--no_rank", action="store_true",
                           help="do not rank by matches (top/ then holds the first --keep samples)")
    selection.add_argument("--match_method", default=DEFAULT_METHOD, choices=list(MATCH_METHODS),
                           help="matcher for the ranking (leftrefill.prep.matching)")
    selection.add_argument("--match_region", default="hole", choices=list(REGIONS),
                           help="count matches whose candidate point is in the filled region (hole) or anywhere")
    model = parser.add_argument_group("model")
    model.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    model.add_argument("--skip_base_check", action="store_true",
                       help="do not check the base checkpoint's sha256 against the one the adapters were trained on")
    model.add_argument("--random_init", action="store_true",
                       help="random weights instead of the checkpoints: exercises the code path, results are noise")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda when available)")
    model.add_argument("--precision", type=precision, default="auto",
                       help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    metrics = parser.add_argument_group("metrics (--benchmark_root)")
    metrics.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    metrics.add_argument("--lpips_weights", default=None,
                         help="AlexNet backbone for LPIPS (alexnet-owt-7be5be79.pth); None: pretrained_models/ or "
                              "$TORCH_HOME/hub/checkpoints/")
    metrics.add_argument("--dino_path", default=None, help="local folder of facebook/dino-vits16 (None: DINO skipped)")
    metrics.add_argument("--clip_path", default=None,
                         help="local folder of openai/clip-vit-base-patch32 (None: CLIP skipped)")
    metrics.add_argument("--dreamsim_path", default=None,
                         help="local DreamSim cache folder; needs the dreamsim package (None: skipped)")
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    checks = [(args.num_samples >= 1, "--num_samples must be at least 1"),
              (args.batch_size >= 1, "--batch_size must be at least 1"),
              (1 <= args.keep, "--keep must be at least 1")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    args.keep = min(args.keep, args.num_samples)
    try:
        check_sampling_options(steps=args.steps, cfg=args.cfg, eta=args.eta, seed=args.seed,
                               num_seeds=args.num_samples, sampler=args.sampler, flags=True)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        with sharded_run() as shard:  # torchrun's ranks share out the scenes of --benchmark_root
            return run(args, shard)
    except LaunchError as err:
        log.error("%s", err)
        return 2


def run(args: argparse.Namespace, shard: Shard) -> int:
    """Fill --scene, or fill and score every scene of --benchmark_root (this rank's, when sharded)."""
    fill_options = {"num_samples": args.num_samples, "keep": args.keep, "seed": args.seed,
                    "batch_size": args.batch_size, "rank": not args.no_rank, "match_method": args.match_method,
                    "match_region": args.match_region,
                    "sampling": {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta}}
    device_flag = shard.device(args.device)  # one GPU per rank
    try:
        if args.scene is not None and shard.sharded:
            raise ValueError("--scene fills one scene in one process; under torchrun give --benchmark_root, whose "
                             "scenes are shared out among the ranks")
        # 1. the data, every file checked, and the matcher, before the model is loaded
        device = resolve_device_and_dtype(device_flag, args.precision)[0]
        fill_options["device"] = str(device)  # the matcher runs where the model does
        if not args.no_rank:
            check_options(args.match_method, load_weights=True, device=str(device))
        if args.scene is not None:
            scene = read_scene(args.scene)
            given = [flag for flag in ("dino_path", "clip_path", "dreamsim_path", "lpips_weights", "no_lpips")
                     if getattr(args, flag)]
            if given:
                log.warning("--scene fills and ranks only; %s apply to --benchmark_root (scored against gt.png)",
                            ", ".join(f"--{flag}" for flag in given))
        else:
            benchmark_scenes(Path(args.benchmark_root))
            metrics = RealBenchMetrics(None if args.no_lpips else load_lpips_alex(args.lpips_weights),
                                       dino_path=args.dino_path, clip_path=args.clip_path,
                                       dreamsim_path=args.dreamsim_path, device=device)
            for name, why in metrics.skipped.items():
                log.warning("%s skipped: %s", name, why)
        # 2. the model(s) and the run
        with logging_redirect_tqdm():
            if args.scene is not None:
                pipe = load_pipeline(args, args.model_path, device_flag)
                result = fill_scene(pipe, scene, args.output_path, **fill_options)
                log.info("%d samples of %s written to %s; best: sample %d", args.num_samples, scene.name,
                         args.output_path, result.ranking[0])
            else:
                summary = evaluate_benchmark(args.benchmark_root, args.model_path, args.output_path, metrics,
                                             lambda path: load_pipeline(args, path, device_flag), settings=vars(args),
                                             shard=shard, **fill_options)
                if shard.is_main:
                    log.info("%d scenes: %s; written to %s", summary["benchmark"]["scenes"],
                             ", ".join(f"{k} {v:.4f}" for k, v in summary["benchmark"]["all"].items()),
                             args.output_path)
    except ERRORS as err:
        log.error("%s", err)
        return 2
    except RankFailedError as err:
        log.error("%s; stopped", err)
        return 1
    except torch.cuda.OutOfMemoryError:
        log.error("out of GPU memory with --batch_size %d; try a smaller --batch_size", args.batch_size)
        return 1
    return 0


def load_pipeline(args: argparse.Namespace, model_path: str | Path, device: str | None) -> RealFillPipeline:
    return RealFillPipeline.from_model_dir(model_path, args.base_ckpt, device=device, precision=args.precision,
                                           random_init=args.random_init, check_base=not args.skip_base_check)


if __name__ == "__main__":
    sys.exit(main())
