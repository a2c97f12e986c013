r"""Objaverse train/test object lists for novel view synthesis (METHOD 2.2).

Checks every ``<views_root>/<uid>`` folder of the Zero-1-to-3 renders (000..011 .png + .npy, cameras
(3, 4) and finite, PNGs readable), skips incomplete objects, splits the complete ones by a seeded hash of
the uid, and writes ``obj_train.txt``, ``obj_test.txt`` and ``objaverse_report.json`` (atomically).

    python scripts/objaverse_lists.py --views_root data/objaverse/views_release
    python scripts/objaverse_lists.py --views_root views_release --out_dir data/objaverse/lists \
        --num_test 100 --seed 0 --workers 16

Exit status: 0 done; 1 no object is complete (only the report is written); 2 bad input.
The scan and split live in ``leftrefill.prep.objaverse``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from leftrefill.cli import HelpFormatter
from leftrefill.prep.objaverse import NUM_VIEWS, NoCompleteObjects, ObjaverseError, make_lists

log = logging.getLogger("objaverse_lists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--views_root", type=Path, required=True, help="the views_release folder")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="where the lists and the report go; None: the parent of views_root")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--test_fraction", type=float, default=None,
                       help="expected fraction of test objects; None: 0.01 unless --num_test is given")
    split.add_argument("--num_test", type=int, default=None,
                       help="exact number of test objects; None: use --test_fraction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the uid hash that decides the split")
    parser.add_argument("--num_views", type=int, default=NUM_VIEWS, help="views an object must have")
    parser.add_argument("--workers", type=int, default=1, help="threads checking objects")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the list step; returns the exit status (see the module docstring)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.views_root.is_dir():
        print(f"error: {args.views_root}: views_root does not exist or is not a folder", file=sys.stderr)
        return 2
    out_dir = args.out_dir if args.out_dir is not None else args.views_root.resolve().parent
    try:
        report = make_lists(args.views_root, out_dir, seed=args.seed, test_fraction=args.test_fraction,
                            num_test=args.num_test, num_views=args.num_views, workers=args.workers)
    except ObjaverseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, NoCompleteObjects) else 2
    counts = report["counts"]
    skipped = {reason: n for reason, n in report["skipped_by_reason"].items() if n}
    log.info("%d objects found, %d complete (%d train, %d test), %d skipped %s; written to %s",
             counts["found"], counts["complete"], counts["train"], counts["test"], counts["skipped"],
             skipped or "", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
