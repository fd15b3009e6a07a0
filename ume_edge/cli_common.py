"""What every ``python -m ume_edge.<verb>`` shares: help that shows each default, strict booleans, progress on
stderr."""

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


class _ProgressHandler(logging.StreamHandler):
    """The one handler ``show_progress`` adds (found again by its type, so a second call adds nothing). It writes to
    whatever ``sys.stderr`` is when a message is logged, not to the stream of the first call."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def show_progress(verbose: bool = False) -> None:
    """Show ume-edge's progress and warnings (INFO and up; DEBUG with ``verbose``) on stderr, message only.
    Calling it again (a command's ``main()`` run twice in one process) changes the level, never adds a handler."""
    logger = logging.getLogger("ume_edge")
    if not any(isinstance(handler, _ProgressHandler) for handler in logger.handlers):
        handler = _ProgressHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
