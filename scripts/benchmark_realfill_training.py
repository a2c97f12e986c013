"""RealFill training-step time and peak memory, without gradient checkpointing against with it, in one run.

One step = RealFillModule.training_step on one batch of a 4-reference scene at 512 (B = 5: four references
with their random box masks and the target with its real mask and loss weight, the recipe's "every image
of the scene once per step"), backward, gradient clipping at 1.0 over the LoRA parameters (Lightning's
gradient_clip_val), and AdamW over the config's two groups (UNet LoRA, text-encoder LoRA). The batch comes
from the bundled scene (data/samples_realfill/sacre_coeur: 3 references + target) through the training
set; its first reference is drawn a second time, with another crop and mask, as the fourth.
The recipe's config (configs/realfill.yaml, full SD2, LoRA rank 8; configs/tiny_realfill.yaml, rank 4)
on random weights, nothing downloaded; ``--precision`` autocasts as Lightning does (16-mixed also scales the
loss with a GradScaler).

Each setting (gradient checkpointing on, off) runs in its own process, one after the other, after one
warm-up step; on a CPU that process may map only ``--memory_limit_gb`` GiB of address space beyond what it
maps once torch is loaded (RLIMIT_AS; what it maps is a little more than what is resident), so a setting
that would exhaust the machine's memory ends as "did not fit" instead of waking the OOM killer.
Peak memory: CUDA max_memory_allocated, or on a CPU the process's peak resident set size (VmHWM, reset once
the model is built); both include the weights. "step GiB" is the peak minus the memory in use before the
warm-up step. The 2,000-step time is the median step
time x 2,000 (the recipe's max_steps; the reference reports about 1 h on a V100).

    python scripts/benchmark_realfill_training.py --config tiny --steps 3
    python scripts/benchmark_realfill_training.py --config full --steps 1 --settings checkpointing
    python scripts/benchmark_realfill_training.py --config full --steps 1 --settings no-checkpointing
    python scripts/benchmark_realfill_training.py --config full --device cuda --steps 20 --precision 16-mixed
    python scripts/benchmark_realfill_training.py --config full --device cuda --steps 20 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import re
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.latent_diffusion import model_builder
from leftrefill.cli import HelpFormatter
from leftrefill.process_memory import peak_memory_gib, reset_peak_memory, status_gib
from leftrefill.data.realfill import realfill_training_set
from leftrefill.model_dir import build_random
from leftrefill.realfill_module import RealFillModule
from leftrefill.realfill_training import realfill_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": ROOT / "configs/tiny_realfill.yaml", "full": ROOT / "configs/realfill.yaml"}
SCENE = ROOT / "data/samples_realfill/sacre_coeur"
SETTINGS = {"checkpointing": True, "no-checkpointing": False}
AUTOCAST = {"32": None, "16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
RECIPE_STEPS = 2000  # configs/realfill.yaml trainer.max_steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="tiny",
                        help="tiny (configs/tiny_realfill.yaml) or full (configs/realfill.yaml, SD2 size)")
    parser.add_argument("--scene", default=str(SCENE), help="scene folder (RealBench layout) the batch comes from")
    parser.add_argument("--references", type=int, default=4,
                        help="references per step (beyond the scene's own, its references are drawn again); "
                             "the batch is these plus the target")
    parser.add_argument("--size", type=int, default=512, help="training resolution")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=list(AUTOCAST), default="32",
                        help="32: no autocast; 16-mixed / bf16-mixed: autocast to float16 / bfloat16")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="gradient checkpointing on / off, measured in this order")
    parser.add_argument("--memory_limit_gb", type=float, default=18.0,
                        help="GiB of address space each setting's process may map on a CPU beyond torch's libraries "
                             "(0: no limit; not applied on CUDA, whose driver maps far more than it uses). 18 leaves "
                             "about 5 GiB of a shared 24 GB machine to the rest of its work")
    return parser


def make_batch(config, references: int, device: str) -> dict:
    """``references`` reference items then the target item of the config's scene, each drawn with its own
    seeded generator: {"image" (B, 3, S, S), "mask" (B, 1, S, S), "loss_weight" (B, 1, S, S), "prompt" [B]}."""
    params = config.data.params
    dataset = realfill_training_set(params.scene, size=config.data.image_size, prompt=params.prompt,
                                    prompt_dropout=params.prompt_dropout, full_mask_rate=params.full_mask_rate,
                                    max_resize=params.max_resize, target_random_mask=params.target_random_mask)
    scene_references = len(dataset) - 1
    indices = [i % scene_references for i in range(references)] + [scene_references]
    items = [dataset.item(index, np.random.default_rng(position)) for position, index in enumerate(indices)]
    batch = default_collate([{k: v for k, v in item.items() if k != "id"} for item in items])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_module(args, checkpointing: bool) -> RealFillModule:
    """The config's model (random weights) with its LoRA adapters, in a RealFillModule outside a Trainer."""
    config = realfill_config(CONFIGS[args.config], args.scene, resolution=args.size, random_init=True,
                             overrides=[f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    model_config = ROOT / config.model.config  # the configs name it relative to the repository root
    model = build_random(model_builder(model_config), adapter=OmegaConf.to_container(config.model.lora))
    module = RealFillModule(model.to(args.device), config)
    module.log = lambda *a, **k: None  # self.log needs a Trainer
    return module.train()


def step(module, optimizer, scaler, parameters, batch, precision: str, clip: float) -> None:
    """Loss, backward, clipping and the optimizer step, as Lightning orders them under ``precision``."""
    dtype = AUTOCAST[precision]
    device_type = batch["image"].device.type
    with torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext():
        loss = module.training_step(batch, 0)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)






def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, checkpointing: bool) -> dict:
    """{"step_s": median s/step, "peak": GiB, "step_gib": GiB, "trained": parameters, "batch": B} of one
    setting; "error" instead when it does not fit."""
    device = torch.device(args.device)
    module = make_module(args, checkpointing)
    batch = make_batch(module.config, args.references, args.device)
    optimizer = module.configure_optimizers()  # lr_scheduler none: the AdamW alone
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    clip = module.config.trainer.gradient_clip_val
    before = reset_peak_memory(device)
    step(module, optimizer, scaler, parameters, batch, args.precision, clip)  # warm-up
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step(module, optimizer, scaler, parameters, batch, args.precision, clip)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = peak_memory_gib(device)
    return {"step_s": statistics.median(times), "peak": peak, "step_gib": peak - before,
            "trained": sum(p.numel() for p in parameters), "batch": batch["image"].shape[0]}


def worker(args, checkpointing: bool, connection) -> None:
    """One setting in a fresh process (clean peak memory), under the address-space limit on a CPU."""
    if args.memory_limit_gb > 0 and not args.device.startswith("cuda"):
        # beyond what is mapped by now: torch's libraries map ~4 GiB (its CUDA kernels), < 1 GiB resident
        limit = int((status_gib("VmSize") + args.memory_limit_gb) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = measure(args, checkpointing)
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError
        if not isinstance(err, MemoryError) and "allocate" not in str(err) and "out of memory" not in str(err):
            raise
        result = {"error": out_of_memory(args, err)}
    connection.send(result)


def out_of_memory(args, err: BaseException) -> str:
    """What a setting that ran out of memory reached, for the table."""
    if args.device.startswith("cuda"):
        return f"CUDA out of memory (peak allocated {peak_memory_gib(torch.device(args.device)):.2f} GiB)"
    request = re.search(r"allocate (\d+) bytes", str(err))
    asked = f", asking for {int(request[1]) / 2**30:.2f} GiB more" if request else ""
    return (f"did not fit: {args.memory_limit_gb:g} GiB more address space than torch's libraries map (peak "
            f"resident {status_gib('VmHWM'):.2f} GiB{asked})")


def run_isolated(args, checkpointing: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=worker, args=(args, checkpointing, sender))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:  # killed, or an error other than memory (its traceback is on stderr)
        result = None
    process.join()
    return result or {"error": f"the process ended with exit code {process.exitcode}"}


def main() -> None:
    args = build_parser().parse_args()
    results = {name: run_isolated(args, SETTINGS[name]) for name in args.settings}
    base = results.get("checkpointing", {})  # the recipe's setting
    print(f"RealFill training, config {args.config}, {args.references} references + target at {args.size}, "
          f"{args.precision}, {args.device}, {torch.get_num_threads()} threads, median of {args.steps} step(s)")
    columns = ["batch", "trained params", "s/step", "steps/s", "peak GiB", "step GiB", f"{RECIPE_STEPS} steps",
               "time vs ckpt", "peak vs ckpt", "step GiB vs ckpt"]
    print(f"{'setting':<17}" + "".join(f" {column:>{max(len(column), 8)}}" for column in columns))
    for name, result in results.items():
        if "error" in result:
            print(f"{name:<17} {result['error']}")
            continue
        time_s, peak, step_gib = result["step_s"], result["peak"], result["step_gib"]
        cells = [result["batch"], f"{result['trained']:,}", f"{time_s:.2f}", f"{1 / time_s:.3f}", f"{peak:.2f}",
                 f"{step_gib:.2f}", f"{time_s * RECIPE_STEPS / 3600:.2f} h"]
        if "step_s" in base:
            ratios = (time_s / base["step_s"], peak / base["peak"], step_gib / base["step_gib"])
            cells += [f"{ratio:.2f}" for ratio in ratios]
        print(f"{name:<17}" + "".join(f" {cell:>{max(len(column), 8)}}" for cell, column in zip(cells, columns)))


if __name__ == "__main__":
    main()
