"""Verified matches between related and unrelated photos, and seconds per pair, for each matcher.

    python scripts/benchmark_matchers.py --root PHOTOS --scenes scene_a scene_b --views 4 --methods aliked sift

PHOTOS holds one folder per scene with its photos (sorted by name; the first --views are used).
Related pairs: every two photos of one scene. Unrelated pairs: photo i of one scene against photo i of
another. Each pair is matched with leftrefill.prep.matching.match_images (MAGSAC++-verified) at
--max_side; a good matcher finds many verified matches between related photos and few between
unrelated ones (chance inliers of a fundamental matrix). Prints a markdown table; --json keeps every pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from leftrefill.cli import HelpFormatter
from leftrefill.images import load_rgb
from leftrefill.prep.matching import DEFAULT_METHOD, METHODS, match_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="folder of scene folders of photos")
    parser.add_argument("--scenes", nargs="+", required=True, help="scene folders under --root (two or more)")
    parser.add_argument("--views", type=int, default=4, help="photos per scene (the first, by name)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=[DEFAULT_METHOD, "sift"],
                        help="matchers to compare")
    parser.add_argument("--max_side", type=int, default=1024, help="as scripts/match_pairs.py")
    parser.add_argument("--device", default="cpu", help="torch device of method aliked")
    parser.add_argument("--json", type=Path, default=None, help="write every pair's count and time here")
    return parser


def scene_photos(root: Path, scenes: Sequence[str], views: int) -> dict[str, list[Path]]:
    photos = {}
    for scene in scenes:
        files = sorted(p for p in (root / scene).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise SystemExit(f"benchmark_matchers.py: {root / scene}: needs at least two photos")
        photos[scene] = files[:views]
    return photos


def benchmark_pairs(photos: dict[str, list[Path]]) -> list[tuple[str, Path, Path]]:
    """(kind, target, reference): related within each scene, unrelated across scenes at equal index."""
    pairs = [("related", a, b) for files in photos.values() for a, b in itertools.combinations(files, 2)]
    for scene_a, scene_b in itertools.combinations(photos, 2):
        pairs += [("unrelated", a, b) for a, b in zip(photos[scene_a], photos[scene_b])]
    return pairs


def run(method: str, pairs: list[tuple[str, Path, Path]], images: dict[Path, object], max_side: int,
        device: str) -> list[dict[str, object]]:
    kind, target, reference = pairs[0]
    match_images(images[target], images[reference], method=method, max_side=max_side, device=device)  # warm-up
    rows = []
    for kind, target, reference in pairs:
        start = time.perf_counter()
        matches = match_images(images[target], images[reference], method=method, max_side=max_side, device=device)
        rows.append({"method": method, "kind": kind, "target": f"{target.parent.name}/{target.name}",
                     "reference": f"{reference.parent.name}/{reference.name}", "matches": len(matches),
                     "seconds": round(time.perf_counter() - start, 3)})
        print(f"{method:7s} {kind:9s} {rows[-1]['target']} -> {rows[-1]['reference']}: {len(matches)} "
              f"({rows[-1]['seconds']:.2f} s)", file=sys.stderr)
    return rows


def table(rows: list[dict[str, object]], methods: Sequence[str]) -> str:
    lines = ["| matcher | related: median (min to max) | unrelated: median (min to max) | s / pair |",
             "|---|---|---|---|"]
    for method in methods:
        cells = []
        for kind in ("related", "unrelated"):
            counts = [r["matches"] for r in rows if r["method"] == method and r["kind"] == kind]
            cells.append(f"{statistics.median(counts):g} ({min(counts)} to {max(counts)}), {len(counts)} pairs"
                         if counts else "n/a")
        seconds = statistics.mean(r["seconds"] for r in rows if r["method"] == method)
        lines.append(f"| {method} | {cells[0]} | {cells[1]} | {seconds:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    photos = scene_photos(args.root, args.scenes, args.views)
    pairs = benchmark_pairs(photos)
    images = {path: load_rgb(path) for files in photos.values() for path in files}
    rows = [row for method in args.methods for row in run(method, pairs, images, args.max_side, args.device)]
    print(table(rows, args.methods))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
