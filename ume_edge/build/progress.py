"""Build progress as log records of ``ume_edge.build``: the command line shows them on stderr; a library caller
sees them only if it configures logging."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger("ume_edge.build")


def stage(number: int, total: int, text: str) -> None:
    LOGGER.info("[%d/%d] %s", number, total, text)


def note(text: str) -> None:
    LOGGER.info("      %s", text)
