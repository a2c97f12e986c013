"""The LeftRefill demo page: reference-guided inpainting in the browser.

    python ref_inpainting_gradio.py                      # http://127.0.0.1:7860, released tokens + SD2
    python ref_inpainting_gradio.py --server_name 0.0.0.0 --server_port 8080 --share

--model_path may be a one-reference or a multi-view model directory (e.g. checkpoints/multiview_ref_inpainting);
with a multi-view one the page asks for as many references as the model was trained for and uses them all.
Without pretrained_models/512-inpainting-ema.ckpt the page starts with a tiny random-weight model of the same
kind and says so, so that the interface can be tried on any machine. The "Novel view synthesis" tab runs the
NVS model of --nvs_model_path; while that directory holds no trained weights (none were released) or the
SD2 checkpoint is missing, it runs a tiny random-weight NVS model and says so on the tab. The "RealFill"
tab fine-tunes LoRA adapters on the scene a user uploads (configs/realfill.yaml over the SD2 checkpoint;
without it, the tiny random configs/tiny_realfill.yaml, announced), or loads one of the model directories
in --realfill_models by name. The default paths are in this script's folder, whatever the working
directory; paths you type are relative to the working directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from leftrefill.cli import HelpFormatter, precision
from leftrefill.demo import build_demo
from leftrefill.demo_realfill import RealFillSettings
from leftrefill.model_dir import resolve_model_dir
from leftrefill.multiview_pipeline import MultiViewPipeline, inpainting_pipeline_class
from leftrefill.nvs_pipeline import NVSPipeline
from leftrefill.paths import locate, looked_in
from leftrefill.pipeline import DEFAULT_BASE_CKPT, DEFAULT_MODEL_DIR, LeftRefillPipeline, WrongTaskError

log = logging.getLogger("ref_inpainting_gradio")
ROOT = Path(__file__).resolve().parent  # the project folder: default paths resolve from here, not the cwd
TINY_MODEL_DIR = ROOT / "checkpoints" / "tiny_random"
TINY_MULTIVIEW_MODEL_DIR = ROOT / "checkpoints" / "tiny_random_multiview"
NVS_MODEL_DIR = ROOT / "checkpoints" / "nvs_objaverse"  # the config; trained NVS weights go beside it
TINY_NVS_MODEL_DIR = ROOT / "checkpoints" / "tiny_random_nvs"
REALFILL_CONFIG = ROOT / "configs" / "realfill.yaml"
TINY_REALFILL_CONFIG = ROOT / "configs" / "tiny_realfill.yaml"
REALFILL_TRAIN_STEPS = 200  # the fine-tuning slider's start with SD2 (the recipe: 2,000)
TINY_REALFILL_TRAIN_STEPS = 20  # with the tiny random model: seconds on a CPU


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags; --help shows each one's default and keeps the example commands' line breaks."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model_path", default=str(DEFAULT_MODEL_DIR),
                        help="model directory (model_config.yaml + tokens) or token checkpoint; one-reference or "
                             "multi-view (the page then takes that model's number of references)")
    parser.add_argument("--base_ckpt", default=str(DEFAULT_BASE_CKPT),
                        help="SD2 512-inpainting-ema.ckpt; when absent, a tiny random-weight model runs")
    parser.add_argument("--nvs_model_path", default=str(NVS_MODEL_DIR),
                        help="NVS model directory (model_config.yaml + trained weights) for the novel-view tab; "
                             "without trained weights in it, a tiny random-weight NVS model runs")
    parser.add_argument("--no_nvs", action="store_true", help="leave out the novel-view-synthesis tab")
    parser.add_argument("--realfill_models", default=str(ROOT / "checkpoints"),
                        help="folder of saved RealFill model directories (train_realfill.py --output_dir) that the "
                             "RealFill tab offers to load, by name")
    parser.add_argument("--realfill_max_steps", type=positive_int, default=2000,
                        help="most fine-tuning steps a RealFill tab user may ask for")
    parser.add_argument("--no_realfill", action="store_true", help="leave out the RealFill tab")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None: cuda when available")
    parser.add_argument("--precision", type=precision, default="auto",
                        help="weights dtype: auto (fp16 on cuda, fp32 elsewhere), fp32, fp16 or bf16 (or 32, "
                             "16-mixed, bf16-mixed)")
    parser.add_argument("--server_name", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--server_port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--max_samples", type=positive_int, default=4, help="largest number of samples per request")
    parser.add_argument("--max_file_size", type=file_size, default="20mb",
                        help="largest upload Gradio accepts: a number and b, kb, mb or gb")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, --model_path and --base_ckpt found as leftrefill.paths says (a bare name: $LEFTREFILL_HOME,
    the project folder, the installed copies, then the working directory)."""
    args = build_parser().parse_args(argv)
    args.model_path = str(locate(args.model_path, "checkpoints"))
    args.base_ckpt = str(locate(args.base_ckpt, "pretrained_models"))
    return args


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def file_size(text: str) -> str:
    """argparse type: a size as Gradio's max_file_size takes it, e.g. 20mb."""
    if not re.fullmatch(r"\d+\s*(b|kb|mb|gb|tb)", text.strip(), flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"expected a number and a unit (b, kb, mb, gb, tb), e.g. 20mb; got {text!r}")
    return text.strip()


def load_pipeline(args: argparse.Namespace) -> tuple[LeftRefillPipeline, str]:
    """The model of --model_path, one-reference or multi-view as its config says, when the SD2 checkpoint is
    there; otherwise the tiny random one of the same kind (announced)."""
    pipeline_class = inpainting_pipeline_class(args.model_path)  # reads the config only
    if Path(args.base_ckpt).is_file():
        pipe = pipeline_class.from_model_dir(args.model_path, args.base_ckpt, device=args.device,
                                             precision=args.precision)
        return pipe, f"tokens from `{args.model_path}`, base `{args.base_ckpt}`"
    log.warning("%s not found%s: starting with a tiny random-weight model; results will be noise", args.base_ckpt,
                looked_in(args.base_ckpt, "pretrained_models"))
    tiny = TINY_MULTIVIEW_MODEL_DIR if pipeline_class is MultiViewPipeline else TINY_MODEL_DIR
    pipe = pipeline_class.from_model_dir(tiny, device=args.device, precision=args.precision, random_init=True,
                                         test_size=256)
    return pipe, f"tiny random model `{tiny}`"


def load_nvs_pipeline(args: argparse.Namespace) -> tuple[NVSPipeline, str] | None:
    """The NVS tab's model, built once: the trained one when --nvs_model_path holds weights and the SD2
    checkpoint is there; otherwise the tiny random one (announced). None with --no_nvs."""
    if args.no_nvs:
        return None
    try:
        trained = resolve_model_dir(args.nvs_model_path).weights
    except FileNotFoundError as err:  # its message names --model_path, the inpainting flag
        raise FileNotFoundError(str(err).replace("--model_path", "--nvs_model_path", 1)) from None
    if trained is not None and Path(args.base_ckpt).is_file():
        pipe = NVSPipeline.from_model_dir(args.nvs_model_path, args.base_ckpt, device=args.device,
                                          precision=args.precision)
        return pipe, f"NVS weights `{trained}`, base `{args.base_ckpt}`"
    missing = (f"{args.nvs_model_path} holds no trained NVS weights" if trained is None
               else f"{args.base_ckpt} not found{looked_in(args.base_ckpt, 'pretrained_models')}")
    log.warning("%s: the novel-view tab starts with a tiny random-weight model; its results will be noise", missing)
    # 128 px, not the release's 256: its views are noise anyway, and a turntable on a CPU takes seconds, not a minute
    pipe = NVSPipeline.from_model_dir(TINY_NVS_MODEL_DIR, device=args.device, precision=args.precision,
                                      random_init=True, test_size=128)
    return pipe, f"tiny random NVS model `{TINY_NVS_MODEL_DIR}`"


def realfill_settings(args: argparse.Namespace) -> RealFillSettings | None:
    """The RealFill tab's settings: the recipe over the SD2 checkpoint when it is there; otherwise the tiny
    random config (announced). None with --no_realfill. A ValueError for a device it cannot train on."""
    if args.no_realfill:
        return None
    real = Path(args.base_ckpt).is_file()
    if not real:
        log.warning("%s not found%s: the RealFill tab fine-tunes a tiny random-weight model; its results will be "
                    "noise", args.base_ckpt, looked_in(args.base_ckpt, "pretrained_models"))
    config = REALFILL_CONFIG if real else TINY_REALFILL_CONFIG
    settings = RealFillSettings(
        config, Path(args.base_ckpt) if real else None, model_root=Path(args.realfill_models), device=args.device,
        precision=args.precision, max_train_steps=args.realfill_max_steps,
        train_steps=REALFILL_TRAIN_STEPS if real else TINY_REALFILL_TRAIN_STEPS,
        overrides=(f"model.config={json.dumps(str(model_config_path(config)))}",))
    settings.training_target()  # the device is checked now, not when the page is built
    return settings


def model_config_path(training_config: Path) -> Path:
    """The training config's model.config, from this script's folder (the config names it relative to it)."""
    return ROOT / OmegaConf.load(training_config).model.config


def startup_message(local_url: str, share_url: str | None, share: bool = False) -> str:
    """The log line once the page is up: where it is, and how to share it (this script's flag, not
    Gradio's ``share=True``)."""
    if share_url:
        return f"Demo running on {local_url} and publicly on {share_url} (a temporary gradio.live link)"
    if share:
        return f"Demo running on {local_url}; --share could not create a public link (Gradio says why above)"
    return f"Demo running on {local_url}; to create a public link, restart with --share"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        pipe, description = load_pipeline(args)
    # WrongTaskError: the pipelines' conditioner check, a model directory of the other task
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, WrongTaskError) as err:
        log.error("%s", err)
        return 2
    try:
        nvs = load_nvs_pipeline(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, WrongTaskError) as err:
        log.error("--nvs_model_path %s: %s; the page starts without the novel-view tab", args.nvs_model_path, err)
        nvs = None
    try:
        realfill = realfill_settings(args)
    except ValueError as err:
        log.error("%s; the page starts without the RealFill tab", err)
        realfill = None
    demo = build_demo(pipe, description, max_samples=args.max_samples, nvs=nvs, realfill=realfill)
    demo.queue(default_concurrency_limit=1, max_size=16)
    try:  # quiet: Gradio's own lines would tell the user to set `share=True` in launch(), not --share
        _, local_url, share_url = demo.launch(server_name=args.server_name, server_port=args.server_port,
                                              share=args.share, max_file_size=args.max_file_size, quiet=True,
                                              prevent_thread_lock=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        log.error("cannot serve on %s:%d (%s); pick another --server_port or --server_name",
                  args.server_name, args.server_port, str(err).split(". ")[0])
        return 2
    log.info("%s", startup_message(local_url, share_url, args.share))
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
