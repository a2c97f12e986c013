"""What every command line of the project shares: its help layout."""

from __future__ import annotations

import argparse

from leftrefill.arguments import MAX_SEED


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the line breaks of the description (its example commands) and shows each optional flag's
    default; a required flag has none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required else super()._get_help_string(action)


def seed(text: str) -> int:
    """argparse type for ``--seed``: an integer in [0, 2^63 - 1] (leftrefill.arguments.MAX_SEED)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


# One precision vocabulary for every command line: each spelling is accepted everywhere, the inference
# names (fp32, fp16, bf16) and Lightning's training names (32, 16-mixed, bf16-mixed).
PRECISION_SPELLINGS = {"fp32": "fp32", "32": "fp32", "32-true": "fp32", "fp16": "fp16", "16": "fp16",
                       "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16"}
LIGHTNING_PRECISION = {"fp32": "32", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def precision(text: str) -> str:
    """argparse type for an inference ``--precision``: ``auto`` or any spelling, as fp32 / fp16 / bf16."""
    if text == "auto":
        return text
    return _precision(text)


def training_precision(text: str) -> str:
    """argparse type for a training ``--precision``: any spelling, as Lightning's 32 / 16-mixed / bf16-mixed."""
    return LIGHTNING_PRECISION[_precision(text)]


def _precision(text: str) -> str:
    if text not in PRECISION_SPELLINGS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(PRECISION_SPELLINGS)}, got {text!r}")
    return PRECISION_SPELLINGS[text]
