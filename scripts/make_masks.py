"""Write a fixed set of irregular masks from the generator training uses (leftrefill.data.masks).

    python scripts/make_masks.py --out_dir data/test_masks --count 100 --size 512 --seed 0

Mask i is drawn from its own generator seeded (seed, i), so the set is the same on every machine and a
larger --count only appends masks. Files: mask_0000.png ... (always 4 digits, so names do not depend on
--count; at most 10000 masks), 8-bit, 255 = hole, written atomically; use them with test_inpainting.py
--mask_path or as the training config's val_mask_path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from leftrefill.cli import HelpFormatter, seed
from leftrefill.data.masks import IrregularMaskGenerator
from leftrefill.prep.test_set import save_mask

log = logging.getLogger("make_masks")
NAME_DIGITS = 4  # fixed, so that a mask keeps its file name whatever --count is
MAX_COUNT = 10 ** NAME_DIGITS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder for mask_0000.png, mask_0001.png, ...")
    parser.add_argument("--count", type=int, default=100, help=f"number of masks, 1 to {MAX_COUNT}")
    parser.add_argument("--size", type=int, default=512, help="side of the square masks in pixels, at least 16")
    parser.add_argument("--seed", type=seed, default=0, help="mask i is drawn with the seed (seed, i)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.count <= MAX_COUNT or args.size < 16:
        parser.error(f"--count must be from 1 to {MAX_COUNT} and --size at least 16")
    generator = IrregularMaskGenerator(args.size)
    fractions = []
    for i in range(args.count):
        mask = generator.sample(np.random.default_rng([args.seed, i]))
        save_mask(mask, Path(args.out_dir) / f"mask_{i:0{NAME_DIGITS}d}.png")
        fractions.append(mask.mean())
    log.info("%d masks of %dx%d in %s; hole fraction mean %.3f, min %.3f, max %.3f", args.count, args.size,
             args.size, args.out_dir, np.mean(fractions), np.min(fractions), np.max(fractions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
