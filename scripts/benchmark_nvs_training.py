"""NVS training-step throughput and peak memory for each trainable set, against the release's set in this process.

One step = the NVS loss on a (B, 3, S, 2S) canvas (S = 256: latent 32 x 64) with a pose per item and CFG
dropout, backward, AdamW over the config's groups. Trainable sets, each from its config file:
* ``tokens+pose`` (configs/nvs_training_config.yaml, the release's): 73 tokens + the pose MLP;
* ``full-unet`` (configs/nvs_full_finetune.yaml, the paper's): plus the whole UNet at lr 1e-5;
* ``lora`` (configs/nvs_lora.yaml): plus peft LoRA rank 16 on the UNet's attention and GEGLU projections.
Each set is built fresh (random weights, nothing downloaded), measured after one warm-up step, and
printed with its ratio to ``tokens+pose``. Memory as scripts/benchmark_training.py: CUDA
max_memory_allocated, or on a CPU the peak resident set size (VmHWM, reset between sets).

    python scripts/benchmark_nvs_training.py --config tiny
    python scripts/benchmark_nvs_training.py --config full --batch 1 --steps 1 --sets tokens+pose lora
    python scripts/benchmark_nvs_training.py --config full --device cuda --batch 16 --precision 16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.latent_diffusion import model_builder
from leftrefill.cli import HelpFormatter
from leftrefill.process_memory import peak_memory_gib, reset_peak_memory
from leftrefill.model_dir import build_random
from leftrefill.train_config import load_training_config
from leftrefill.training_module import LeftRefillModule

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"tiny": ROOT / "checkpoints/tiny_random_nvs/model_config.yaml",
          "full": ROOT / "checkpoints/nvs_objaverse/model_config.yaml"}
SETS = {"tokens+pose": ROOT / "configs/nvs_training_config.yaml", "full-unet": ROOT / "configs/nvs_full_finetune.yaml",
        "lora": ROOT / "configs/nvs_lora.yaml"}
AUTOCAST = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", choices=list(MODELS), default="tiny", help="model size: tiny or full (SD2)")
    parser.add_argument("--batch", type=int, default=2, help="canvases per step")
    parser.add_argument("--size", type=int, default=256, help="view size; the canvas is size x 2 size")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per set (after one warm-up step)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--precision", choices=list(AUTOCAST), default="32", help="autocast dtype, as Lightning's")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS), help="trainable sets, in order")
    return parser


def make_module(model_size: str, trainable_set: str, device: str) -> LeftRefillModule:
    """The set's config on a random model of ``model_size`` (the config's data paths are not read)."""
    config = load_training_config(SETS[trainable_set], [f"model.config={MODELS[model_size]}", "model.random_init=true"])
    lora = OmegaConf.to_container(config.model.lora) if config.model.lora is not None else None
    return LeftRefillModule(build_random(model_builder(MODELS[model_size]), adapter=lora).to(device), config)


def step(module: LeftRefillModule, optimizer, canvas, mask, pose, precision: str) -> None:
    dtype = AUTOCAST[precision]
    autocast = torch.autocast(canvas.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        loss = module.loss(canvas, mask, {"pose": pose})
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)






def measure(args, trainable_set: str, inputs) -> tuple[float, float, int]:
    """(samples/s, peak memory GiB, trained parameters) of one set, built and measured alone."""
    reset_peak_memory(torch.device(args.device))
    module = make_module(args.config, trainable_set, args.device)
    module.train()
    optimizer = module.configure_optimizers()
    trained = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    step(module, optimizer, *inputs, args.precision)  # warm-up
    times = []
    for _ in range(args.steps):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(module, optimizer, *inputs, args.precision)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_memory_gib(torch.device(args.device))
    del module, optimizer
    return args.batch / statistics.median(times), peak, trained


def main() -> None:
    args = build_parser().parse_args()
    generator = torch.Generator().manual_seed(0)
    size, batch = args.size, args.batch
    canvas = (torch.rand(batch, 3, size, 2 * size, generator=generator) * 2 - 1).to(args.device)
    mask = torch.zeros(batch, 1, size, 2 * size, device=args.device)
    mask[..., size // 4: 3 * size // 4, size + size // 4: 2 * size - size // 4] = 1
    pose = torch.tensor([[0.3, 0.5, 0.866, 0.1]], device=args.device).expand(batch, -1)
    results = {name: measure(args, name, (canvas, mask, pose)) for name in args.sets}
    base = results.get("tokens+pose")
    print(f"NVS training, config {args.config}, batch {batch}, canvas {size}x{2 * size}, {args.precision}, "
          f"{args.device}, {torch.get_num_threads()} threads")
    print(f"{'set':<12} {'trained params':>15} {'samples/s':>10} {'peak GiB':>9} {'speed vs tokens+pose':>21} "
          f"{'peak vs tokens+pose':>20}")
    for name, (throughput, peak, trained) in results.items():
        ratios = f"{throughput / base[0]:>21.2f} {peak / base[1]:>20.2f}" if base else ""
        print(f"{name:<12} {trained:>15,} {throughput:>10.3f} {peak:>9.2f} {ratios}")


if __name__ == "__main__":
    main()
