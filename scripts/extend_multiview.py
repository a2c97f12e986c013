r"""Give every pair up to three extra references of the same target (METHOD 1.11, extend_data_for_multiview).

    python scripts/extend_multiview.py --pairs data/megadepth_0.4_0.7/train_pairs.json \
        --index_dir data/megadepth/index/scene_info_0.1_0.7 --data_root data/megadepth \
        --out data/megadepth_0.4_0.7/extended_train_pairs.json

For each pair, the extra references are drawn (seeded, without replacement) among the images that a
scene index lists as co-visible with the target at overlap >= --min_overlap (0.2), other than the pair's
own two images and present on disk. Unlike the original, which only looked at index entries (target, other), both orders
of an index pair count: the index lists each unordered pair once. Pairs with fewer than --min_extra
candidates are left out (the original: 3). Extra images not yet in the image table are appended to a
copy of it, written beside the output and named after it: ``--out .../extended_train_pairs.json`` writes
``.../extended_train_pairs_images.json``, so train and test can be extended into the same folder.

Exit status: 0 done; 1 no pair could be extended (nothing is written); 2 bad input, including an image of
the table that is not under --data_root.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from leftrefill.cli import HelpFormatter, seed
from leftrefill.data.manifest import (ManifestError, Pair, image_table_of, read_image_table, read_pairs,
                                      write_image_table, write_multiview_manifest)
from leftrefill.prep.megadepth import IndexFileError, covisible_neighbours, extend_pair

log = logging.getLogger("extend_multiview")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pairs", required=True, help="pair manifest (.json) from megadepth_pairs.py")
    parser.add_argument("--index_dir", required=True, help="the LoFTR scene index files the pairs came from")
    parser.add_argument("--data_root", required=True, help="MegaDepth root (index paths are relative to it)")
    parser.add_argument("--out", required=True, help="extended manifest to write (.json)")
    parser.add_argument("--num_extra", type=int, default=3, help="extra references drawn per pair, at most")
    parser.add_argument("--min_extra", type=int, default=3, help="leave out pairs that get fewer extra references")
    parser.add_argument("--min_overlap", type=float, default=0.2,
                        help="lowest scene-index overlap between an extra reference and the target")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the draws, combined with each pair's id")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.min_extra <= args.num_extra:
        parser.error("need 0 <= --min_extra <= --num_extra")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    root, out = Path(args.data_root), Path(args.out)
    try:
        pairs = read_pairs(args.pairs)
        index_files = sorted(Path(args.index_dir).glob("*.npz"))
        if not index_files:
            raise FileNotFoundError(f"--index_dir {args.index_dir}: no .npz scene index files in it")
        neighbours = covisible_neighbours(index_files, args.min_overlap, root)
        table = read_image_table(image_table_of(args.pairs))
    except (ManifestError, IndexFileError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    try:
        relative = {image_id: relative_path(path, root) for image_id, path in table.items()}
    except ValueError as err:
        log.error("%s: %s", image_table_of(args.pairs), err)
        return 2
    ids = {path: image_id for image_id, path in relative.items()}
    rows, outcome = extend_pairs(pairs, root, ids, neighbours, args)
    if not rows:
        log.warning("none of the %d pairs could be extended (%s); nothing written", len(pairs),
                    ", ".join(f"{k}: {v}" for k, v in sorted(outcome.items())) or "no pairs")
        return 1
    images_out = images_table_path(out)
    write_image_table(images_out, root, {image_id: path for path, image_id in ids.items()})
    write_multiview_manifest(out, images_out, rows)
    log.info("%d of %d pairs extended -> %s (%s)", len(rows), len(pairs), out,
             ", ".join(f"{k}: {v}" for k, v in sorted(outcome.items())))
    return 0


def extend_pairs(pairs: list[Pair], root: Path, ids: dict[str, int], neighbours: dict[str, dict[str, float]],
                 args: argparse.Namespace) -> tuple[list[dict], Counter]:
    """The multi-view rows {id, target, sources (the references), scene} of the pairs with at least
    --min_extra extra views, and a count of outcomes. ``ids`` {path relative to root: image id} gains the new views."""
    rows, outcome, next_id = [], Counter(), max(ids.values(), default=-1) + 1
    for pair in pairs:
        reference, target = relative_path(pair.reference, root), relative_path(pair.target, root)
        rng = np.random.default_rng([args.seed, pair.id])
        extra = extend_pair(reference, target, neighbours, rng, args.num_extra)
        if len(extra) < args.min_extra:
            outcome["left out: too few co-visible views"] += 1
            continue
        for path in extra:
            if path not in ids:  # a view no pair used yet: append it to the image table
                ids[path], next_id = next_id, next_id + 1
        references = [ids[reference]] + [ids[p] for p in extra]
        rows.append({"id": pair.id, "target": ids[target], "sources": references, "scene": pair.scene})
        outcome[f"{len(extra)} extra references"] += 1
    return rows, outcome


def images_table_path(out: Path) -> Path:
    """The image table written with the manifest ``out``: ``<out stem>_images.json`` beside it."""
    return out.with_name(f"{out.stem}_images.json")


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (posix); ValueError when it is not under ``root``, because the index
    files name images relative to the MegaDepth root."""
    try:
        relative = Path(os.path.relpath(path, root))
    except ValueError:  # another drive on Windows
        relative = Path("..")
    if relative.parts[:1] == ("..",):
        raise ValueError(f"image {path} is not under --data_root {root}")
    return relative.as_posix()


if __name__ == "__main__":
    sys.exit(main())
