"""The line under each demo tab's title (leftrefill.demo, demo_nvs, demo_realfill): which weights answer and
where they run, or a loud warning that they are random."""

from __future__ import annotations

RANDOM_WEIGHTS = "### ⚠️ Random weights: results are noise\n"  # a Markdown heading: not to be missed


def banner(pipe, description: str, random_note: str) -> str:
    """``description`` with the pipeline's device and dtype; when ``pipe`` (a LeftRefillPipeline or an
    NVSPipeline) has random weights, RANDOM_WEIGHTS and then ``random_note``: what is missing, how to get it."""
    if pipe.random_weights:
        return RANDOM_WEIGHTS + random_note
    return f"Weights: {description} · {pipe.device}, {str(pipe.dtype).removeprefix('torch.')}"
