"""What every command shares: progress on stderr, added once however often a command's main() runs."""

import logging

from ume_edge.cli_common import show_progress


def test_progress_is_shown_once_when_a_command_runs_twice_in_one_process(capsys):
    logger = logging.getLogger("ume_edge")
    before = list(logger.handlers)
    try:
        show_progress()
        show_progress(verbose=True)
        logging.getLogger("ume_edge.build").info("stage one done")
        assert capsys.readouterr().err.splitlines() == ["stage one done"]
        assert logger.level == logging.DEBUG
    finally:
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_progress_goes_to_the_stderr_of_the_moment(capsys):
    logger = logging.getLogger("ume_edge")
    before = list(logger.handlers)
    try:
        show_progress()
        capsys.readouterr()
        logging.getLogger("ume_edge.train").warning("seed 1 diverged")
        assert "seed 1 diverged" in capsys.readouterr().err
    finally:
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
