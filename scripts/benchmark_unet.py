"""Time this project's SD2 UNet against diffusers' UNet2DConditionModel with identical weights.

Both models hold the same weights (diffusers' get them through its own single-file converter), see the
same inputs, and run alternately in one process so that machine noise hits both alike. Prints the median
time of each and the ratio project / diffusers (< 1 means this project is faster).

    python scripts/benchmark_unet.py                       # CPU, fp32, batch 2, latent 64x128 (512x1024 canvas)
    python scripts/benchmark_unet.py --device cuda --dtype bf16 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from leftrefill.cli import HelpFormatter

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/sd2_inpainting.yaml",
                        help="model config; its unet_config is timed")
    parser.add_argument("--batch", type=int, default=2, help="batch size; 2 = the classifier-free guidance pair")
    parser.add_argument("--latent", type=int, nargs=2, default=[64, 128], metavar=("H", "W"),
                        help="latent height and width (the canvas size / 8)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of both models and of the inputs")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--rounds", type=int, default=3, help="timed forwards per model, alternating")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed forwards per model; the first (always run) compares the outputs")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def build_models(config_path: str, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = OmegaConf.load(config_path)
    ours = instantiate_from_config(config.model.params.unet_config, "unet_config").eval()
    with torch.no_grad():  # zero-initialised output layers would make the output check meaningless
        generator = torch.Generator().manual_seed(0)
        for param in ours.parameters():
            param.add_(torch.randn(param.shape, generator=generator), alpha=0.01)
    state_dict = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    original = OmegaConf.to_container(config, resolve=True)
    original["model"]["params"]["unet_config"]["params"]["use_linear_in_transformer"] = True
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, state_dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = sfu.convert_ldm_unet_checkpoint(state_dict, unet_config)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**unet_config)
    theirs.load_state_dict(converted, strict=True, assign=True)
    return ours.to(device, dtype), theirs.eval().to(device, dtype)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, theirs = build_models(args.config, device, dtype)
    context_dim = ours.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, ours.in_channels, *args.latent, generator=generator).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device)
    context = torch.randn(args.batch, 77, context_dim, generator=generator).to(device, dtype)

    run_ours = lambda: ours(x, t, context)  # noqa: E731
    run_theirs = lambda: theirs(x, t, encoder_hidden_states=context).sample  # noqa: E731
    times = {"project": [], "diffusers": []}
    with torch.inference_mode():
        reference = run_theirs().float()
        difference = (run_ours().float() - reference).abs().max().item() / reference.abs().max().item()
        for _ in range(args.warmup - 1):
            run_ours(), run_theirs()
        for i in range(args.rounds):  # alternate which model goes first, so neither gains from order
            order = [("project", run_ours), ("diffusers", run_theirs)]
            for name, fn in order if i % 2 == 0 else reversed(order):
                times[name].append(timed(fn, device))

    medians = {name: statistics.median(values) for name, values in times.items()}
    threads = torch.get_num_threads()
    print(f"SD2 UNet forward, batch {args.batch}, latent {args.latent[0]}x{args.latent[1]}, {args.dtype}, "
          f"{device} ({threads} threads), {args.rounds} alternating rounds")
    print(f"max abs output difference relative to max abs output: {difference:.3g}")
    for name, values in times.items():
        print(f"{name:>10}: median {medians[name]:.3f} s  (all: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"ratio project/diffusers: {medians['project'] / medians['diffusers']:.3f}")


if __name__ == "__main__":
    main()
