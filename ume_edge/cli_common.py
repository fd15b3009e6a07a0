"""What every ``python -m ume_edge.<verb>`` shares: help that shows each default, strict booleans, progress on stderr."""

from __future__ import annotations

import argparse
import logging
import sys

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every option whose help does not already say its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.option_strings == []:
            return text
        return super()._get_help_string(action)


def strict_bool(text: str) -> bool:
    """``true``/``false`` (and yes/no, 1/0, on/off); anything else is an error, never a silent False."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def show_progress(verbose: bool = False) -> None:
    """Show ume-edge's progress and warnings (INFO and up; DEBUG with ``verbose``) on stderr, message only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ume_edge")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
