"""What the evaluation command lines (test_inpainting.py, test_multiview_inpainting.py, test_nvs.py) share:
their common flags and checks (the inpainting ones: ``add_inpainting_flags``), loading the model and the
metrics, and the run with its log lines and exit status.

Exit status: 0 done; 1 a result held NaN or infinite values, or the GPU ran out of memory; 2 bad input (a
flag, a file, a model directory): one message naming it, and nothing written unless a pair failed mid-run
(summary.json then records the failure).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.checkpoint import CheckpointError
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options
from leftrefill.cli import HelpFormatter, precision
from leftrefill.data.objaverse_nvs import NVSDataError
from leftrefill.evaluation import EvaluationTask, MatchSelection, evaluate
from leftrefill.images import ImageInputError
from leftrefill.metrics import InpaintingMetrics, load_lpips_alex
from leftrefill.pipeline import DEFAULT_BASE_CKPT, LeftRefillPipeline, WrongTaskError
from leftrefill.prep.matching import DEFAULT_METHOD, METHODS
from leftrefill.sharding import LaunchError, RankFailedError, Shard, sharded_run

log = logging.getLogger(__name__)

BANNER = "!" * 100
# A file that was fine when checked and is not when read mid-run: the pair is named in summary.json.
DATA_ERRORS = (ImageInputError, NVSDataError)
LOAD_ERRORS = (FileNotFoundError, ImageInputError, CheckpointError, ConfigError, ValueError)
SEED_HELP = "pair i is sampled with seed + i; seed + number of pairs - 1 must stay below 2^63"
INPAINTING_SEED_HELP = ("pair i is sampled with seed + i, its candidate k (--num_samples K) with seed + i * K + k; "
                        "the last seed must stay below 2^63")
# LoFTR needs a weights file that the evaluation scripts do not take
MATCH_METHODS = tuple(method for method in METHODS if method != "loftr")


def evaluation_parser(description: str, *, model_path: str, test_path_help: str, test_size: int, eta_help: str,
                      output_path: str, seed_help: str = SEED_HELP
                      ) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The flags both evaluations take, in the groups of the original test script; returns the parser and
    its "additional flags" group, for the script's own flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    original = parser.add_argument_group("flags of the original script")
    original.add_argument("--model_path", default=model_path,
                          help="model directory (model_config.yaml + ckpts/*.ckpt), or a token checkpoint in one")
    original.add_argument("--batch_size", type=int, default=1, help="pairs per batch")
    original.add_argument("--test_path", required=True, help=test_path_help)
    original.add_argument("--cfg", type=float, default=2.5, help="classifier-free guidance scale (finite, >= 0)")
    original.add_argument("--test_size", type=int, default=test_size, help="each view is resized to this square size")
    original.add_argument("--metric_size", type=int, default=None,
                          help="area-downsample results and ground truth to this size for the metrics "
                               "(None: test_size)")
    original.add_argument("--eta", type=float, default=None, help=eta_help)
    original.add_argument("--output_path", default=output_path, help="where results are written")
    extra = parser.add_argument_group("additional flags")
    extra.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                       help="ddim (the paper's), ddpm (ancestral), dpmpp_2m (DPM-Solver++(2M): at 20 steps its error "
                            "was below DDIM's at 50 in docs/benchmarks.md), dpmpp_2m_sde")
    extra.add_argument("--steps", type=int, default=50, help="sampler steps, in [1, 999]")
    extra.add_argument("--seed", type=int, default=42, help=seed_help)
    extra.add_argument("--precision", type=precision, default="auto",
                       help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (or 32, 16-mixed, bf16-mixed)")
    extra.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda when available)")
    extra.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs (None: all)")
    extra.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    extra.add_argument("--random_init", action="store_true",
                       help="random weights instead of the checkpoints: exercises the code path, results are noise")
    extra.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no AlexNet weights needed)")
    extra.add_argument("--lpips_weights", default=None,
                       help="AlexNet backbone for LPIPS (alexnet-owt-7be5be79.pth); None: pretrained_models/ "
                            "or $TORCH_HOME/hub/checkpoints/")
    return parser, extra


def add_inpainting_flags(extra: argparse._ArgumentGroup) -> None:
    """The flags of the reference-inpainting evaluations (test_inpainting.py, test_multiview_inpainting.py)
    beyond the shared ones: --strength, --mask_path and RealFill's selection (--num_samples,
    --select_by_matches, --match_method); check them with :func:`check_selection`."""
    extra.add_argument("--strength", type=float, default=1.0,
                       help="in (0, 1]: start from the target noised to this fraction of the steps and run only "
                            "those (SDEdit); 1: from pure noise")
    extra.add_argument("--mask_path", default=None,
                       help="folder of masks used instead of each pair's mask.png, cycled (None: mask.png)")
    extra.add_argument("--num_samples", type=int, default=1,
                       help="candidates drawn per pair, candidate k of pair i with seed + i * num_samples + k; "
                            "more than 1 needs --select_by_matches to keep one")
    extra.add_argument("--select_by_matches", action="store_true",
                       help="keep, of each pair's candidates, the one whose filled region (at the target's own "
                            "size) has the most verified matches with the reference(s), as RealFill; every "
                            "candidate goes to candidates/<id>/<k>.png and is scored in selection.csv")
    extra.add_argument("--match_method", default=None, choices=MATCH_METHODS,
                       help=f"matcher for --select_by_matches: aliked (ALIKED + LightGlue), sift or orb "
                            f"(None: {DEFAULT_METHOD})")


def check_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--num_samples, --select_by_matches, --match_method (None becomes the default matcher with a selection).

    Several candidates per pair need a rule to keep one: results/ and metrics.csv then hold one result per
    pair, comparable with any single-sample run, while selection.csv scores every candidate (their mean is
    what one unselected sample scores). Without a rule there would be several results per pair to score.
    Call it before :func:`check_args`: the seed check counts num_samples seeds per pair.
    """
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.select_by_matches and args.num_samples == 1:
        parser.error("--select_by_matches ranks the candidates of each pair: give --num_samples 2 or more")
    if args.num_samples > 1 and not args.select_by_matches:
        parser.error(f"--num_samples {args.num_samples} draws several candidates per pair; add --select_by_matches "
                     f"to keep the best of them")
    if args.match_method is not None and not args.select_by_matches:
        parser.error("--match_method applies only with --select_by_matches")
    if args.select_by_matches:
        args.match_method = args.match_method or DEFAULT_METHOD


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the shared flags (``metric_size`` None becomes test_size); a bad value is a parser error: exit
    status 2 and one message naming the flag."""
    args.metric_size = args.metric_size or args.test_size
    checks = [(args.batch_size >= 1, "--batch_size must be at least 1"),
              (args.test_size > 0 and args.test_size % 64 == 0, "--test_size must be a positive multiple of 64"),
              (7 <= args.metric_size <= args.test_size, "--metric_size must be in [7, test_size] (SSIM uses a "
                                                         "7x7 window)"),
              (args.limit is None or args.limit >= 1, "--limit must be at least 1")]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    output = Path(args.output_path)
    if output.exists() and not output.is_dir():
        parser.error(f"--output_path {output} is a file; results go into a folder")
    check_sampling(parser, args, num_pairs=args.limit or 1)  # the seed again once the pairs are counted


def check_sampling(parser: argparse.ArgumentParser, args: argparse.Namespace, num_pairs: int) -> None:
    """--sampler, --steps, --cfg, --eta, --strength (where the script has it) and --seed (with the last
    seed: seed + num_pairs * num_samples - 1, --num_samples where the script has it, else 1), or a parser
    error."""
    num_seeds = num_pairs * getattr(args, "num_samples", 1)
    try:
        check_sampling_options(steps=args.steps, cfg=args.cfg, eta=args.eta, seed=args.seed, num_seeds=num_seeds,
                               strength=getattr(args, "strength", None), sampler=args.sampler, flags=True)
    except ValueError as err:
        parser.error(str(err))


def sampling_options(args: argparse.Namespace) -> dict:
    """The pipeline's sampling options from the flags (``strength`` where the script has it)."""
    options = {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta}
    return options | ({"strength": args.strength} if hasattr(args, "strength") else {})


def selection_options(args: argparse.Namespace) -> MatchSelection | None:
    """--num_samples / --select_by_matches / --match_method (test_inpainting.py's) as a MatchSelection; None
    without --select_by_matches."""
    if not getattr(args, "select_by_matches", False):
        return None
    return MatchSelection(args.num_samples, args.match_method)


def load(pipeline_class: type[LeftRefillPipeline], args: argparse.Namespace, shard: Shard = Shard()
         ) -> tuple[LeftRefillPipeline, InpaintingMetrics] | None:
    """The LPIPS weights (small, first), then the model (on the shard's GPU when sharded); None after logging
    one error when either cannot be loaded, or when the model directory is for another task than
    ``pipeline_class``'s."""
    try:
        lpips_model = None if args.no_lpips else load_lpips_alex(args.lpips_weights)
        pipe = pipeline_class.from_model_dir(args.model_path, args.base_ckpt, device=shard.device(args.device),
                                             precision=args.precision, random_init=args.random_init,
                                             test_size=args.test_size)
    except LOAD_ERRORS as err:
        log.error("%s", err)
        return None
    except WrongTaskError as err:  # the pipeline's conditioner check: an inpainting model given to NVS, or back
        log.error("--model_path %s: %s", args.model_path, err)
        return None
    if lpips_model is not None:
        lpips_model.to(pipe.device)
    return pipe, InpaintingMetrics(args.metric_size, lpips_model)


def load_and_run(parser: argparse.ArgumentParser, args: argparse.Namespace, pipeline_class: type[LeftRefillPipeline],
                 task: EvaluationTask) -> int:
    """Once the task's pairs are checked: --seed against their number, the LPIPS weights (small), then the model,
    then the evaluation, on this process's shard when torchrun started several (leftrefill.sharding); the
    exit status."""
    check_sampling(parser, args, num_pairs=len(task.dataset))
    try:
        with sharded_run() as shard:
            loaded = load(pipeline_class, args, shard)
            if loaded is None:
                return 2
            pipe, metrics = loaded
            return run(pipe, task, metrics, args, shard)
    except LaunchError as err:
        log.error("%s", err)
        return 2


def run(pipe: LeftRefillPipeline, task: EvaluationTask, metrics: InpaintingMetrics, args: argparse.Namespace,
        shard: Shard = Shard()) -> int:
    """Evaluate with log lines printed above the progress bars, not across them; the exit status."""
    if pipe.random_weights and shard.is_main:
        announce_random_weights()
    log.info("%d pairs from %s -> %s (%s, %s)", len(task.dataset), args.test_path, args.output_path, pipe.device,
             str(pipe.dtype).removeprefix("torch."))
    if shard.sharded:
        log.info("rank %d of %d: %d of the pairs", shard.rank, shard.world_size,
                 sum(map(len, shard.steps(len(task.dataset), args.batch_size))))
    selection = selection_options(args)
    if selection:
        log.info("%d candidates per pair; the one with the most verified %s matches with the reference in its "
                 "filled region is kept (all in candidates/, scored in selection.csv)", selection.num_samples,
                 selection.method)
    try:
        with logging_redirect_tqdm(tqdm_class=tqdm):
            summary = evaluate(pipe, task, args.output_path, metrics, batch_size=args.batch_size, seed=args.seed,
                               sampling=sampling_options(args), settings=vars(args), selection=selection, shard=shard)
    except DATA_ERRORS as err:
        log.error("%s", err)
        return 2
    except RankFailedError as err:  # rank 0's summary.json names the pair
        log.error("%s; stopped", err)
        return 1
    except torch.cuda.OutOfMemoryError:
        log.error("out of GPU memory with --batch_size %d; try a smaller --batch_size, or --precision fp16",
                  args.batch_size)
        return 1
    return _report(summary, pipe, args.output_path, shard)


def _report(summary: dict, pipe: LeftRefillPipeline, output_path: str, shard: Shard) -> int:
    """Log the means (rank 0); 1 when a result held NaN or infinite values, else 0."""
    means = ", ".join(f"{name} {'n/a' if value is None else format(value, '.4f')}"
                      for name, value in summary["metrics"].items())
    if shard.is_main:
        log.info("%d pairs scored: %s; written to %s", summary["num_scored"], means, output_path)
    if pipe.random_weights and shard.is_main:
        announce_random_weights()
    if summary["non_finite_outputs"]:
        log.error("%d result(s) held NaN or infinite values (listed in summary.json)",
                  len(summary["non_finite_outputs"]))
        return 1
    return 0


def announce_random_weights() -> None:
    log.warning("\n%s\n!!! RANDOM WEIGHTS (--random_init): outputs are noise, metrics are meaningless. This run only "
                "exercises the code path.\n%s", BANNER, BANNER)
