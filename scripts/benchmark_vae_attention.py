r"""The VAE's mid-block attention (ldm.autoencoder.AttnBlock) against the same block fed transposed q/k/v views.

On the CPU, ``scaled_dot_product_attention`` with one head and the transposed (B, 1, HW, C) views of the 1x1
conv outputs falls back to a slower kernel than with contiguous tensors; AttnBlock makes them contiguous. This
times both on the same weights and input, in this process, and prints the ratio and the largest difference.

    python scripts/benchmark_vae_attention.py                     # SD2's width (512) at a 512 px image (64 x 64)
    python scripts/benchmark_vae_attention.py --channels 64 --batch 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ldm.autoencoder import AttnBlock
from leftrefill.cli import HelpFormatter


def transposed_views(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's forward with the q/k/v views left transposed (what it did before)."""
    b, c, h, w = x.shape
    hn = block.norm(x)
    q, k, v = (proj(hn).flatten(2).transpose(1, 2)[:, None] for proj in (block.q, block.k, block.v))
    out = F.scaled_dot_product_attention(q, k, v)
    return x + block.proj_out(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--channels", type=int, default=512, help="the block's width (SD2's VAE: 512)")
    parser.add_argument("--side", type=int, default=64, help="feature map side (64: a 512 px image)")
    parser.add_argument("--batch", type=int, default=5, help="images (RealFill: 4 references + the target)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    torch.manual_seed(0)
    block = AttnBlock(args.channels).eval()
    for parameter in block.parameters():  # no zero output layer: the attention must matter
        torch.nn.init.normal_(parameter, std=args.channels ** -0.5)
    x = torch.randn(args.batch, args.channels, args.side, args.side)
    with torch.no_grad():
        ours = timed(lambda: block(x), args.repeats)
        peer = timed(lambda: transposed_views(block, x), args.repeats)
        difference = (block(x) - transposed_views(block, x)).abs().max().item()
    print(f"AttnBlock C={args.channels}, {args.batch} x {args.side}x{args.side}, {torch.get_num_threads()} threads")
    print(f"  contiguous (AttnBlock): {ours:.3f} s   transposed views: {peer:.3f} s   ratio {peer / ours:.2f}x   "
          f"max |difference| {difference:.1e}")


if __name__ == "__main__":
    main()
