"""The one-pair command line: fill one photo, synthesise one view, run one RealFill target.

    leftrefill fill --reference r.jpg --target t.jpg --mask m.png -o out.png
    leftrefill fill --reference a.jpg --reference b.jpg --target t.jpg --mask m.png -o out.png --num_samples 4
    leftrefill nvs --reference chair.png --pose 0 90 0 -o view.png
    leftrefill realfill --target t.png --mask m.png --model_path checkpoints/realfill_scene -o out.png
    leftrefill fill --model_path checkpoints/tiny_random --random_init --steps 4 --test_size 64 ...  # code path only

(also ``python -m leftrefill ...``). Each subcommand's --help lists its flags and defaults.

Outputs: ``-o out.png`` gets the one sample; with ``--num_samples N`` (N > 1) sample k goes to
``out_k.png`` (k = 0 .. N-1, drawn with seed + k) and ``out.png`` itself is not written. The format follows
the suffix (.png, .jpg or .jpeg); missing parent folders are created; each file appears whole or not at all.

fill: the model directory decides the pipeline. A one-reference model (checkpoints/ref_guided_inpainting)
takes one --reference, or several for training-free multi-reference (each step costs K times one
reference); a multi-view model (checkpoints/multiview_ref_inpainting) takes exactly the references it
was trained for, most overlapping first. Outputs have the target's own size; pixels outside the mask are
the target's.

Exit status: 0 done; 1 out of GPU memory; 2 bad input (a flag, an image, a model directory): one line
naming it, nothing written.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ldm.checkpoint import CheckpointError
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from leftrefill.arguments import check_sampling_options
from leftrefill.atomic import atomic_path
from leftrefill.cli import HelpFormatter, precision, seed
from leftrefill.evaluation_cli import announce_random_weights
from leftrefill.images import ImageInputError, image_file_problem
from leftrefill.multiview_pipeline import MultiViewPipeline, inpainting_pipeline_class
from leftrefill.nvs_pipeline import DEFAULT_MODEL_DIR as NVS_MODEL_DIR
from leftrefill.nvs_pipeline import NVS_MASK_MODES, NVSPipeline
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, LeftRefillPipeline, WrongTaskError
from leftrefill.realfill_pipeline import RealFillPipeline

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = {".png": {}, ".jpg": {"quality": 95}, ".jpeg": {"quality": 95}}  # PIL save options
# Bad input found once the model is loading or sampling: one line, exit status 2.
INPUT_ERRORS = (FileNotFoundError, ImageInputError, CheckpointError, ConfigError, WrongTaskError, ValueError)


# -- the parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``leftrefill`` with the subcommands fill, nvs and realfill."""
    parser = argparse.ArgumentParser(prog="leftrefill", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{fill,nvs,realfill}",
                                     help="fill: reference-guided inpainting; nvs: novel view synthesis; "
                                          "realfill: a RealFill scene model")
    fill = _subparser(commands, "fill", "Fill the white part of --mask in --target with what --reference shows.")
    fill.add_argument("--reference", action="append", required=True,
                      help="reference image; give it several times for several references")
    fill.add_argument("--target", required=True, help="the image to fill")
    fill.add_argument("--mask", required=True, help="white (> 127) = fill; resized to the target if needed")
    _add_shared(fill, LeftRefillPipeline.__call__, model_path=DEFAULT_MODEL_DIR,
                test_size=LeftRefillPipeline.default_test_size, eta_default=LeftRefillPipeline.default_eta)

    nvs = _subparser(commands, "nvs", "The object of --reference seen from a camera moved by --pose.")
    nvs.add_argument("--reference", required=True,
                     help="the object's view: RGBA (alpha 0 = background) or RGB on a white background")
    nvs.add_argument("--pose", type=float, nargs=3, required=True, metavar=("D_POLAR", "D_AZIMUTH", "D_RADIUS"),
                     help="camera change: polar and azimuth in degrees, radius in world units")
    nvs.add_argument("--mask_mode", default="reference", choices=NVS_MASK_MODES,
                     help="what is generated: the reference's silhouette (the release's setting) or the whole view")
    _add_shared(nvs, NVSPipeline.__call__, model_path=NVS_MODEL_DIR, test_size=NVSPipeline.default_test_size,
                eta_default=NVSPipeline.default_eta)

    realfill = _subparser(commands, "realfill", "Fill --target with a scene's RealFill model (train_realfill.py).")
    realfill.add_argument("--target", required=True, help="the image to fill")
    realfill.add_argument("--mask", required=True, help="white (> 127) = fill; resized to the target if needed")
    _add_shared(realfill, RealFillPipeline.__call__, model_path=None, test_size=None, eta_default=0.0)
    return parser


def _subparser(commands, name: str, description: str) -> argparse.ArgumentParser:
    """One subcommand's parser; ``args.run`` is its run function, ``args.subparser`` the parser itself."""
    sub = commands.add_parser(name, description=description, help=description, formatter_class=HelpFormatter)
    sub.set_defaults(run=RUNS[name], subparser=sub)
    return sub


def _add_shared(parser: argparse.ArgumentParser, call: Callable, *, model_path: Path | None, test_size: int | None,
                eta_default: float) -> None:
    """-o and the sampling, model and device flags; sampling defaults are those of the pipeline's ``call``."""
    defaults = {name: p.default for name, p in inspect.signature(call).parameters.items()}
    parser.add_argument("-o", "--output", required=True,
                        help="output image (.png, .jpg, .jpeg); with --num_samples N > 1, sample k goes to "
                             "<stem>_<k><suffix> instead")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_samples", type=int, default=1, help="samples to draw; sample k uses seed + k")
    sampling.add_argument("--seed", type=seed, default=defaults["seed"], help="seed of sample 0")
    sampling.add_argument("--steps", type=int, default=defaults["steps"], help="sampler steps, in [1, 999]")
    sampling.add_argument("--sampler", default=defaults["sampler"], choices=list(SAMPLERS), help="sampler")
    sampling.add_argument("--cfg", type=float, default=defaults["cfg"],
                          help="classifier-free guidance scale (finite, >= 0; 1: conditional branch only)")
    sampling.add_argument("--eta", type=float, default=None,
                          help=f"DDIM eta, ddim and dpmpp_2m_sde only (None: {eta_default:g})")
    model = parser.add_argument_group("model")
    if model_path is None:
        model.add_argument("--model_path", required=True,
                           help="the scene's RealFill run directory (train_realfill.py --output_dir)")
        model.add_argument("--resolution", type=int, default=None,
                           help="sampling size, a multiple of 64 (None: the size the adapters were trained at)")
    else:
        model.add_argument("--model_path", default=str(model_path),
                           help="model directory (model_config.yaml + ckpts/*.ckpt), or a token checkpoint in one")
        model.add_argument("--test_size", type=int, default=test_size,
                           help="images are resized to this square size for sampling (a multiple of 64)")
    model.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT), help="SD2 512-inpainting-ema.ckpt")
    model.add_argument("--random_init", action="store_true",
                       help="random weights instead of the checkpoints: exercises the code path, outputs are noise")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (None: cuda when available)")
    model.add_argument("--precision", type=precision, default="auto",
                       help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag and input file; a bad one exits with status 2 and one message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args.subparser  # its errors read "leftrefill fill: error: ..." under the subcommand's usage
    size_flag = "--resolution" if args.command == "realfill" else "--test_size"
    size = args.resolution if args.command == "realfill" else args.test_size
    checks = [(args.num_samples >= 1, f"--num_samples must be at least 1, got {args.num_samples}"),
              (size is None or (size > 0 and size % 64 == 0),
               f"{size_flag} must be a positive multiple of 64, got {size}"),
              (Path(args.output).suffix.lower() in OUTPUT_SUFFIXES,
               f"-o {args.output}: the suffix picks the format, one of {', '.join(OUTPUT_SUFFIXES)}"),
              (not Path(args.output).is_dir(), f"-o {args.output} is a folder; give an image file name")]
    for ok, message in checks:
        if not ok:
            sub.error(message)
    try:
        check_sampling_options(steps=args.steps, cfg=args.cfg, eta=args.eta, seed=args.seed,
                               num_seeds=args.num_samples, sampler=args.sampler, flags=True)
    except ValueError as err:
        sub.error(str(err))
    for flag, path in _input_files(args):
        problem = image_file_problem(path)
        if problem is not None:
            sub.error(f"{flag} {path}: {problem}")
    return args


def _input_files(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of every input image of the subcommand."""
    references = getattr(args, "reference", [])
    files = [("--reference", path) for path in (references if isinstance(references, list) else [references])]
    return files + [(f"--{name}", getattr(args, name)) for name in ("target", "mask") if hasattr(args, name)]


def output_paths(output: str | Path, num_samples: int) -> list[Path]:
    """Where the samples go: ``output`` for one sample, else ``<stem>_<k><suffix>`` for sample k."""
    output = Path(output)
    if num_samples == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{k}{output.suffix}") for k in range(num_samples)]


def save_image(path: Path, image: Image.Image | np.ndarray) -> None:
    """Write ``image`` (RGB) atomically in the format of the suffix, creating the parent folders."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, **OUTPUT_SUFFIXES[path.suffix.lower()])


# -- the runs --------------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace) -> dict:
    return {"sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "eta": args.eta, "seed": args.seed,
            "num_samples": args.num_samples, "progress": True}


def _device_options(args: argparse.Namespace) -> dict:
    return {"device": args.device, "precision": args.precision, "random_init": args.random_init}


def run_fill(args: argparse.Namespace) -> list:
    """The pipeline the model directory is for (one-reference or multi-view), called on the inputs."""
    pipeline_class = inpainting_pipeline_class(args.model_path)
    pipe = pipeline_class.from_model_dir(args.model_path, args.base_ckpt, test_size=args.test_size,
                                         **_device_options(args))
    _announce(pipe)
    if pipeline_class is MultiViewPipeline:
        log.info("multi-view model (%d views): %d reference(s) filled jointly", pipe.num_views, len(args.reference))
    elif len(args.reference) > 1:
        log.info("%d references: training-free multi-reference, each step %d times the work of one",
                 len(args.reference), len(args.reference))
    references = args.reference if len(args.reference) > 1 or pipeline_class is MultiViewPipeline else args.reference[0]
    return pipe(references, args.target, args.mask, **_sampling(args))


def run_nvs(args: argparse.Namespace) -> list:
    pipe = NVSPipeline.from_model_dir(args.model_path, args.base_ckpt, test_size=args.test_size,
                                      **_device_options(args))
    _announce(pipe)
    return pipe(args.reference, pose=tuple(args.pose), mask_mode=args.mask_mode, **_sampling(args))


def run_realfill(args: argparse.Namespace) -> list:
    pipe = RealFillPipeline.from_model_dir(args.model_path, args.base_ckpt, resolution=args.resolution,
                                           **_device_options(args))
    _announce(pipe)
    options = _sampling(args)
    options.pop("progress")
    with tqdm(total=args.num_samples, desc="samples") as bar:
        return pipe(args.target, args.mask, **options, on_batch=lambda done, total: bar.update(done - bar.n))


def _announce(pipe) -> None:
    log.info("sampling on %s (%s)", pipe.device, str(pipe.dtype).removeprefix("torch."))
    if pipe.random_weights:
        announce_random_weights()


RUNS = {"fill": run_fill, "nvs": run_nvs, "realfill": run_realfill}


def main(argv: list[str] | None = None) -> int:
    """Parse, load, sample, write; the exit status (module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        with logging_redirect_tqdm(tqdm_class=tqdm):
            images = args.run(args)
    except INPUT_ERRORS as err:
        log.error("%s", err)
        return 2
    except torch.cuda.OutOfMemoryError:
        log.error("out of GPU memory; try --precision fp16, a smaller --num_samples or --test_size")
        return 1
    paths = output_paths(args.output, args.num_samples)
    for path, image in zip(paths, images):
        save_image(path, image)
    log.info("wrote %s", paths[0] if len(paths) == 1 else f"{len(paths)} samples: {paths[0]} ... {paths[-1]}")
    if args.random_init:  # said again after the progress bars, where it is seen
        announce_random_weights()
    return 0


if __name__ == "__main__":
    sys.exit(main())
