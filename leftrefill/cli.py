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
