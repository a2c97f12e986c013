r"""Cost of multi-view LeftRefill's joint self-attention: one UNet forward against the number of views.

With v views of a sample regrouped into one sequence (ldm.attention.ViewGrouping), every self-attention
attends over v*h*w tokens, so its cost grows as (v*h*w)^2 while everything else grows as v. One forward =
the UNet on v images of ``--size`` px each (latent size/8, 9 input channels, a 77-token context per view),
under no_grad, with the views grouped jointly or block-causally (METHOD 3.1, 3.3), against the same v images
run per view (no grouping: the cost every other layer has anyway), and against the one-reference model's
training-free multi-reference for the same v - 1 references (v - 1 canvases [reference_k | target], twice as
wide, each attending within itself). Random weights, nothing downloaded.
Each (views, mode) runs in its own process after one warm-up forward; memory is that process's peak
(CUDA max_memory_allocated, or the CPU's peak resident set size, weights included).

    python scripts/benchmark_multiview_attention.py --config configs/sd2_inpainting.yaml   # SD2 size, 512 px
    python scripts/benchmark_multiview_attention.py --config configs/tiny_sd2_inpainting.yaml --size 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch

from ldm.attention import ViewGrouping
from ldm.util import instantiate_from_config, load_config
from leftrefill.cli import HelpFormatter
from leftrefill.process_memory import peak_memory_gib, reset_peak_memory

MODES = ("per-view", "joint", "causal", "causal-mask", "canvases")


class MaskedCausalGrouping(ViewGrouping):
    """The block-causal attention as one joint attention under a (v*h*w)^2 boolean mask: the straightforward
    way, kept here as the peer ViewGrouping's view-by-view causal path is measured against."""

    def __init__(self, num_views: int):
        super().__init__(num_views, causal=True)

    def residual_attention(self, attention, norm, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        grouped = self.group(x, hw)
        view = torch.arange(self.num_views, device=x.device).repeat_interleave(x.shape[1])
        return self.ungroup(attention(norm(grouped), attn_mask=view[:, None] >= view[None, :]).add_(grouped), hw)


def grouping_of(mode: str, views: int) -> ViewGrouping | None:
    if mode in ("per-view", "canvases"):
        return None
    return MaskedCausalGrouping(views) if mode == "causal-mask" else ViewGrouping(views, causal=mode == "causal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/sd2_inpainting.yaml", help="model config (its unet_config)")
    parser.add_argument("--size", type=int, default=512, help="pixels per view (the latent is size / 8)")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 3, 4], help="numbers of views")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="per-view (no grouping), joint, causal (block lower-triangular: view by view over the "
                             "prefix, as ldm.attention does), causal-mask (the same as one attention under a "
                             "boolean mask), canvases (the training-free multi-reference of the one-reference "
                             "model for the same references: v - 1 canvases [reference_k | target], each 2 "
                             "size wide, per canvas)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per setting (median)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    return parser


def measure(config: str, size: int, views: int, mode: str, repeats: int, device: str) -> dict:
    """{"seconds": median s per forward, "peak": GiB} of one setting, in this process."""
    torch.manual_seed(0)
    node = load_config(config).model.params.unet_config
    unet = instantiate_from_config(node, "unet_config").eval().to(device)
    for parameter in unet.parameters():  # no zero-initialised output layer: every path does its real work
        torch.nn.init.normal_(parameter, std=0.02)
    latent = size // 8
    images, width = (views - 1, 2 * latent) if mode == "canvases" else (views, latent)
    x = torch.randn(images, node.params.in_channels, latent, width, device=device)
    t = torch.full((images,), 500, device=device)
    context = torch.randn(images, 77, node.params.context_dim, device=device)
    grouping = grouping_of(mode, views)
    device_ = torch.device(device)
    with torch.no_grad(), unet.self_attention_grouping(grouping):
        unet(x, t, context)  # warm-up
        reset_peak_memory(device_)
        times = []
        for _ in range(repeats):
            if device_.type == "cuda":
                torch.cuda.synchronize(device_)
            start = time.perf_counter()
            unet(x, t, context)
            if device_.type == "cuda":
                torch.cuda.synchronize(device_)
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak": peak_memory_gib(device_)}


def _child(connection, *args) -> None:
    try:
        connection.send(measure(*args))
    except (RuntimeError, MemoryError) as err:  # out of memory: a result, not a crash
        connection.send({"error": str(err).splitlines()[0][:120]})


def run_isolated(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, *args))
    process.start()
    result = receiver.recv()
    process.join()
    return result


def main() -> None:
    args = build_parser().parse_args()
    print(f"UNet of {args.config}, {args.size} px per view, {args.device}, {torch.get_num_threads()} threads")
    print(f"{'views':>5} {'mode':>11} {'s/forward':>10} {'s/view':>8} {'peak GiB':>9} {'time vs per-view':>17}")
    for views in args.views:
        baseline = None
        for mode in args.modes:
            if mode == "canvases" and views < 2:
                continue  # no reference
            result = run_isolated(args.config, args.size, views, mode, args.repeats, args.device)
            if "error" in result:
                print(f"{views:>5} {mode:>11} {result['error']}")
                continue
            baseline = result["seconds"] if mode == "per-view" else baseline
            ratio = f"{result['seconds'] / baseline:.2f}" if baseline else ""
            print(f"{views:>5} {mode:>11} {result['seconds']:>10.2f} {result['seconds'] / views:>8.2f} "
                  f"{result['peak']:>9.2f} {ratio:>17}", flush=True)


if __name__ == "__main__":
    main()
