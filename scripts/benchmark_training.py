"""Training-step throughput and peak memory: this project's step against an official-release-style peer.

One step = loss on a (B, 3, 512, 1024) canvas, backward, AdamW on the 50 prompt tokens. Variants:
* ``ours``: frozen weights have requires_grad False (no gradients are computed for them), with and
  without gradient checkpointing;
* ``peer``: the official release's step: the frozen weights still require gradients (computed, never
  used), gradient checkpointing on, and a VAE decode of the batch every step that is thrown away.
All variants run in this process, on the same weights and batch, and print their ratio to the peer.
Peak memory: CUDA max_memory_allocated, or on the CPU the peak resident set size (VmHWM, reset between
variants through /proc/self/clear_refs after malloc_trim). "step GiB" is the peak minus the memory in
use before the timed steps: the step's own activations, gradients and temporaries.

    python scripts/benchmark_training.py --config tiny
    python scripts/benchmark_training.py --config full --batch 1 --steps 2     # SD2 size (minutes on a CPU)
    python scripts/benchmark_training.py --config full --device cuda --batch 8 --precision 16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.latent_diffusion import load_model
from leftrefill.cli import HelpFormatter
from leftrefill.process_memory import peak_memory_gib, reset_peak_memory
from leftrefill.train_config import TrainingConfig
from leftrefill.training_module import LeftRefillModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "checkpoints/tiny_random/model_config.yaml",
           "full": ROOT / "checkpoints/ref_guided_inpainting/model_config.yaml"}
AUTOCAST = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny",
                        help="model config: tiny (checkpoints/tiny_random) or full (SD2 size); random weights")
    parser.add_argument("--batch", type=int, default=2, help="canvases per step")
    parser.add_argument("--size", type=int, default=512, help="view size; the canvas is size x 2 size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=list(AUTOCAST), default="32",
                        help="32: no autocast; 16-mixed / bf16-mixed: autocast to float16 / bfloat16")
    parser.add_argument("--variants", nargs="+", default=["ours", "ours-no-ckpt", "peer"],
                        help="steps to measure, in this order: ours, ours-no-ckpt (no gradient checkpointing), peer")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def make_module(config_name: str, device: str) -> LeftRefillModule:
    torch.manual_seed(0)
    model = load_model(CONFIGS[config_name]).to(device)
    config = OmegaConf.structured(TrainingConfig(model_config=str(CONFIGS[config_name]), image_path="-",
                                                 train_pair="-", random_init=True))
    return LeftRefillModule(model, config)


def configure(module: LeftRefillModule, variant: str) -> None:
    module.model.requires_grad_(variant == "peer")  # the peer computes gradients for frozen weights
    module.tokens.requires_grad_(True)
    module.model.set_gradient_checkpointing(variant != "ours-no-ckpt")


def step(module: LeftRefillModule, optimizer, canvas, mask, variant: str, precision: str) -> None:
    dtype = AUTOCAST[precision]
    autocast = torch.autocast(canvas.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        loss = module.loss(canvas, mask)
        if variant == "peer":  # the official release decoded a sample every step and threw it away
            with torch.no_grad():
                module.model.decode_first_stage(module.model.encode_first_stage(canvas))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.model.zero_grad(set_to_none=True)








def measure(module, canvas, mask, variant: str, steps: int, precision: str) -> tuple[float, float, float]:
    """(samples/s, peak memory GiB, peak minus the memory in use before the steps GiB)."""
    configure(module, variant)
    optimizer = torch.optim.AdamW([module.tokens], lr=3e-5, weight_decay=0.01)
    step(module, optimizer, canvas, mask, variant, precision)  # warm-up (kernel selection, allocations)
    baseline = reset_peak_memory(canvas.device)
    times = []
    for _ in range(steps):
        if canvas.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(module, optimizer, canvas, mask, variant, precision)
        if canvas.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_gib(canvas.device)
    return canvas.shape[0] / statistics.median(times), peak, peak - baseline


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    module = make_module(args.config, args.device)
    generator = torch.Generator().manual_seed(0)
    canvas = (torch.rand(args.batch, 3, args.size, 2 * args.size, generator=generator) * 2 - 1).to(device)
    mask = torch.zeros(args.batch, 1, args.size, 2 * args.size, device=device)
    mask[..., args.size // 4: 3 * args.size // 4, args.size + args.size // 4: 2 * args.size - args.size // 4] = 1
    results = {variant: measure(module, canvas, mask, variant, args.steps, args.precision) for variant in args.variants}
    peer = results.get("peer")
    print(f"config {args.config}, batch {args.batch}, canvas {args.size}x{2 * args.size}, {args.precision}, "
          f"{device}, {torch.get_num_threads()} threads")
    print(f"{'variant':<14} {'samples/s':>10} {'peak GiB':>9} {'step GiB':>9} {'speed vs peer':>14} "
          f"{'step memory vs peer':>20}")
    for variant, (throughput, peak, step_memory) in results.items():
        ratios = f"{throughput / peer[0]:>14.2f} {step_memory / peer[2]:>20.2f}" if peer else ""
        print(f"{variant:<14} {throughput:>10.3f} {peak:>9.2f} {step_memory:>9.2f} {ratios}")

if __name__ == "__main__":
    main()
