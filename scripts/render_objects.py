r"""Render procedural objects into the Zero-1-to-3 layout, as stand-ins for Objaverse renders (METHOD 2.2).

Each object (a textured sphere, box, cylinder or a union of them) is rendered from --num_views random
cameras (polar 30 to 120 degrees, radius 1.5 to 2.2, Zero123's 49.1 degree field of view) into
<out_dir>/views_release/<uid>/000.png ... (RGBA) and 000.npy ... (float32 (3, 4) world-to-camera,
Blender convention), plus cameras.json with each view's spherical coordinates.

    python scripts/render_objects.py --out_dir data/procedural --objects sphere_checker totem
    python scripts/render_objects.py --out_dir data/samples_nvs --objects sphere_checker box_stripes totem \
        --size 128 --seed 0 --num_test 1

With --num_test the script also writes obj_train.txt / obj_test.txt (the split of
scripts/objaverse_lists.py, by leftrefill.prep.objaverse.make_lists) and, for each test object, the fill
mask of its target view 000 in <out_dir>/masks/<uid>/000.png (255 = fill: the silhouette dilated by
--mask_dilation px). Without it, run scripts/objaverse_lists.py on <out_dir>/views_release afterwards.

Exit status: 0 done; 2 bad input. The renderer lives in leftrefill.prep.render.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from leftrefill.cli import HelpFormatter, seed
from leftrefill.prep.objaverse import NUM_VIEWS, TEST_LIST, ObjaverseError, make_lists
from leftrefill.prep.render import (DEFAULT_SIZE, MASK_DILATION, OBJECTS, VIEWS_DIR, render_dataset,
                                    write_fill_masks)

log = logging.getLogger("render_objects")
MIN_SIZE = 16  # below this the textures are not recognisable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="root of views_release/ (and the lists)")
    parser.add_argument("--objects", nargs="+", choices=list(OBJECTS), default=list(OBJECTS), metavar="NAME",
                        help=f"objects to render (uid proc_<name>), from: {', '.join(OBJECTS)}")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels, at least {MIN_SIZE}")
    parser.add_argument("--num_views", type=int, default=NUM_VIEWS, help="views per object")
    parser.add_argument("--seed", type=seed, default=0,
                        help="camera seed; an object's cameras depend on the seed and its uid only")
    parser.add_argument("--num_test", type=int, default=None,
                        help="also write the train/test lists with this many test objects, and their masks; "
                             "None: views only")
    parser.add_argument("--mask_dilation", type=int, default=MASK_DILATION,
                        help="px by which the test view's silhouette grows into the fill mask (with --num_test)")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """A one-line description of the first bad setting, or None."""
    if args.size < MIN_SIZE:
        return f"--size must be at least {MIN_SIZE}, got {args.size}"
    if args.num_views < 1:
        return f"--num_views must be at least 1, got {args.num_views}"
    if args.num_test is not None and not 0 <= args.num_test <= len(set(args.objects)):
        return f"--num_test must be from 0 to the {len(set(args.objects))} objects, got {args.num_test}"
    if args.mask_dilation < 0:
        return f"--mask_dilation must be >= 0, got {args.mask_dilation}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Render, then optionally list and mask; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    objects = list(dict.fromkeys(args.objects))  # a name given twice is rendered once
    render_dataset(args.out_dir, objects, args.num_views, args.size, args.seed)
    log.info("%d objects rendered in %.1f s", len(objects), time.perf_counter() - start)
    if args.num_test is None:
        return 0
    try:
        report = make_lists(args.out_dir / VIEWS_DIR, args.out_dir, seed=args.seed, num_test=args.num_test,
                            num_views=args.num_views)
    except ObjaverseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    test = (args.out_dir / TEST_LIST).read_text().split()
    write_fill_masks(args.out_dir, test, dilation=args.mask_dilation)
    log.info("lists: %d train, %d test objects; fill masks of view 000 in %s", report["counts"]["train"],
             report["counts"]["test"], args.out_dir / "masks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
