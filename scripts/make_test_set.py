r"""Turn test pairs into test_inpainting.py folders with matching-based masks (METHOD 1.12, 1.14).

    python scripts/make_test_set.py --pairs data/megadepth_0.4_0.7/test_pairs.json \
        --match_dir data/megadepth_0.4_0.7/test_matches --out_dir data/megadepth_test

Each pair becomes ``<out_dir>/<pair id, 6 digits>/source.jpg, target.jpg, mask.png``. With
``--multiview`` (an extended manifest from extend_multiview.py) the extra references are written as
source_1.jpg, source_2.jpg, source_3.jpg. The mask is a matching-based mask on the target where the
pair's matching file has enough confident matches, otherwise a procedural irregular mask; both are
deterministic for a given --seed. A matching file made for another size of the target image (e.g. before
the image was replaced) is not used: that pair gets an irregular mask, counted in the report.
``--num_pairs N`` (N >= 1) picks N pairs at random (seeded), as the original's test_pairs_100.
Unreadable pairs are skipped and reported; every file is written atomically.

Exit status: 0 done; 1 no test folder was written (every pair skipped); 2 bad manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from leftrefill.atomic import write_text_atomic
from leftrefill.cli import HelpFormatter, seed
from leftrefill.data.manifest import ManifestError, read_multiview_pairs, read_pairs
from leftrefill.images import ImageInputError, load_rgb
from leftrefill.prep.matching import Matches
from leftrefill.prep.test_set import copy_image, evaluation_mask, save_mask

log = logging.getLogger("make_test_set")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pairs", required=True, help="pair manifest (.json), or an extended one with --multiview")
    parser.add_argument("--out_dir", required=True, help="folder for the <pair id>/ folders and test_set_report.json")
    parser.add_argument("--match_dir", default=None,
                        help="matching files <pair id:08d>.npz from match_pairs.py; None: irregular masks only")
    parser.add_argument("--multiview", action="store_true", help="--pairs is an extended multi-view manifest")
    parser.add_argument("--size", type=int, default=512, help="the test size the masks are designed at")
    parser.add_argument("--num_pairs", type=int, default=None,
                        help="a seeded random subset of this many pairs; None: all")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the masks and of the --num_pairs subset")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_pairs is not None and args.num_pairs < 1:
        parser.error(f"--num_pairs must be at least 1, got {args.num_pairs}")
    return args


def load_pairs(args: argparse.Namespace) -> list[tuple[int, list[Path], Path]]:
    """(pair id, [reference paths], target path) in manifest order, or a seeded subset of them."""
    if args.multiview:
        pairs = [(p.id, list(p.references), p.target) for p in read_multiview_pairs(args.pairs)]
    else:
        pairs = [(p.id, [p.reference], p.target) for p in read_pairs(args.pairs)]
    if args.num_pairs is not None and args.num_pairs < len(pairs):
        chosen = np.random.default_rng(args.seed).choice(len(pairs), size=args.num_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(chosen)]
    return pairs


def target_matches(match_dir: Path | None, pair_id: int,
                   target_size: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(target points, confidences, why there are none) from the pair's matching file; its points are
    used only when it was made for a target of ``target_size`` (width, height)."""
    if match_dir is None:
        return None, None, "no --match_dir"
    path = match_dir / f"{pair_id:08d}.npz"
    if not path.is_file():
        return None, None, "no matching file"
    matches = Matches.load(path)
    if tuple(matches.target_size.tolist()) != tuple(target_size):  # points of another image: meaningless here
        return None, None, "matching file is for another image size"
    return matches.target_points, matches.confidence, "too few confident matches"


def write_pair(out_dir: Path, pair_id: int, references: list[Path], target: Path, args) -> str:
    """Write one folder; return the mask kind ("matching"), or "irregular: <reason>"."""
    height, width = load_rgb(target, "target").shape[:2]  # EXIF-corrected, as every reader sees it
    for reference in references:
        load_rgb(reference, "reference")  # fail on an unreadable reference before writing anything
    match_dir = Path(args.match_dir) if args.match_dir else None
    points, confidence, reason = target_matches(match_dir, pair_id, (width, height))
    rng = np.random.default_rng([args.seed, pair_id])
    mask, kind = evaluation_mask((width, height), points, confidence, rng, args.size)
    folder = out_dir / f"{pair_id:06d}"
    for k, reference in enumerate(references):
        copy_image(reference, folder, "source" if k == 0 else f"source_{k}")  # the file names of the layout
    copy_image(target, folder, "target")
    save_mask(mask, folder / "mask.png")
    return kind if kind == "matching" else f"irregular: {reason}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        pairs = load_pairs(args)
    except (ManifestError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    kinds, skipped = Counter(), {}
    for pair_id, references, target in tqdm(pairs, desc="test pairs", unit="pair"):
        try:
            kinds[write_pair(out_dir, pair_id, references, target, args)] += 1
        except (ImageInputError, ValueError) as err:
            skipped[pair_id] = str(err)
            log.warning("pair %d skipped: %s", pair_id, err)
    report = {"pairs_written": sum(kinds.values()), "masks": dict(sorted(kinds.items())),
              "skipped": len(skipped), "skipped_pairs": skipped, "seed": args.seed, "size": args.size}
    write_text_atomic(out_dir / "test_set_report.json", json.dumps(report, indent=1) + "\n")
    log.info("%d test folders in %s; masks: %s; %d skipped", report["pairs_written"], out_dir,
             ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none", len(skipped))
    if not kinds:
        log.warning("no test folder was written: every one of the %d pairs was skipped", len(pairs))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
