"""Mine LeftRefill training and test pairs from MegaDepth with LoFTR's scene index files (METHOD 1.11).

    python scripts/megadepth_pairs.py --data_root data/megadepth --out_dir data/megadepth_0.4_0.7

Reads ``<data_root>/index/scene_info_0.1_0.7/*.npz`` (training; pairs with overlap in [0.4, 0.7]) and
``<data_root>/index/scene_info_val_1500/*.npz`` (test, MegaDepth-1500; every pair), and writes into
``--out_dir``: images.json, train_pairs.json, test_pairs.json (docs/data.md) and scene_report.json
(training pairs per scene as written, i.e. after --drop_small_scenes, the scenes with fewer than
--n_sample_per_scene training pairs and those dropped, what was skipped). Pairs whose images are not on
disk are skipped and counted. Nothing is written unless every input was read and every output built;
exit status 2 then.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from leftrefill.atomic import write_text_atomic
from leftrefill.cli import HelpFormatter
from leftrefill.data.manifest import ManifestError, image_table_text, pairs_manifest_text
from leftrefill.prep.megadepth import IndexFileError, MinedPairs, drop_small_scenes, mine_pairs, scene_counts

log = logging.getLogger("megadepth_pairs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data_root", required=True, help="MegaDepth root: Undistorted_SfM/ and index/")
    parser.add_argument("--train_index", default=None,
                        help="training scene index folder; None: <data_root>/index/scene_info_0.1_0.7")
    parser.add_argument("--test_index", default=None,
                        help="test scene index folder; None: <data_root>/index/scene_info_val_1500")
    parser.add_argument("--out_dir", required=True,
                        help="folder for images.json, train_pairs.json, test_pairs.json, scene_report.json")
    parser.add_argument("--min_overlap", type=float, default=0.4, help="training pairs: lowest overlap kept")
    parser.add_argument("--max_overlap", type=float, default=0.7, help="training pairs: highest overlap kept")
    parser.add_argument("--n_sample_per_scene", type=int, default=150,
                        help="scenes with fewer training pairs are reported (the sampler needs this many)")
    parser.add_argument("--drop_small_scenes", action="store_true",
                        help="leave the scenes with fewer than n_sample_per_scene training pairs out")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.min_overlap <= args.max_overlap <= 1:
        parser.error(f"empty or invalid overlap range [{args.min_overlap}, {args.max_overlap}]: need "
                     f"0 <= --min_overlap <= --max_overlap <= 1")
    root = Path(args.data_root)
    args.train_index = Path(args.train_index or root / "index" / "scene_info_0.1_0.7")
    args.test_index = Path(args.test_index or root / "index" / "scene_info_val_1500")
    return args


def index_files(folder: Path, flag: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such directory")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{flag} {folder}: no .npz scene index files in it")
    return files


def build_outputs(out: Path, root: Path, images: dict[int, str], train: list[dict], test: list[dict],
                  report: dict) -> dict[Path, str]:
    """{output path: text} of the four outputs; ManifestError (naming the file) before anything is written."""
    table = out / "images.json"
    return {table: image_table_text(table, root, images),
            out / "train_pairs.json": pairs_manifest_text(out / "train_pairs.json", table, train),
            out / "test_pairs.json": pairs_manifest_text(out / "test_pairs.json", table, test),
            out / "scene_report.json": json.dumps(report, indent=1) + "\n"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    root, out = Path(args.data_root), Path(args.out_dir)
    mined = MinedPairs()
    try:
        mine_pairs(mined, "train", index_files(args.train_index, "--train_index"), root,
                   (args.min_overlap, args.max_overlap))
        mine_pairs(mined, "test", index_files(args.test_index, "--test_index"), root, None)
    except (FileNotFoundError, IndexFileError) as err:
        log.error("%s", err)
        return 2
    train, test = mined.pairs["train"], mined.pairs["test"]
    small = sorted(scene for scene, count in scene_counts(train).items() if count < args.n_sample_per_scene)
    if args.drop_small_scenes:
        train, small = drop_small_scenes(train, args.n_sample_per_scene)
    report = {"train_pairs": len(train), "test_pairs": len(test), "images": len(mined.images),
              "overlap_range": [args.min_overlap, args.max_overlap],
              "train_pairs_per_scene": scene_counts(train), "test_pairs_per_scene": scene_counts(test),
              "n_sample_per_scene": args.n_sample_per_scene,
              "scenes_below_n_sample_per_scene": small, "small_scenes_dropped": args.drop_small_scenes,
              "dropped_scenes": small if args.drop_small_scenes else [],
              "skipped_pairs": dict(mined.skipped), "missing_images_examples": mined.missing_examples}
    try:
        outputs = build_outputs(out, root, mined.images, train, test, report)
    except ManifestError as err:
        log.error("%s", err)
        return 2
    for path, text in outputs.items():  # every output was built, so none is written in vain
        write_text_atomic(path, text)
    log.info("%d training pairs in %d scenes, %d test pairs, %d images -> %s", len(train),
             len({row['scene'] for row in train}), len(test), len(mined.images), out)
    if mined.skipped:
        log.warning("skipped: %s", ", ".join(f"{reason} {count}" for reason, count in sorted(mined.skipped.items())))
    if small:
        log.warning("%d scene(s) have fewer than %d training pairs%s: %s", len(small), args.n_sample_per_scene,
                    " and were dropped" if args.drop_small_scenes else " (--drop_small_scenes leaves them out)",
                    ", ".join(small))
    return 0


if __name__ == "__main__":
    sys.exit(main())
