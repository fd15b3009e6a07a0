"""The command line of ``python -m ume_edge.train``: the training hyper-parameters (``Recipe``), each with its option,
and the checks every option value passes before anything trains (a bad value is an argparse error that names the
option and what it expects).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from ume_edge.train_report import SELECTION_RULES

MAX_SEED = 2**32 - 1  # the largest seed NumPy accepts (torch accepts more)


def _number(text: str, kind: type, is_valid, expected: str):
    """``text`` as ``kind`` when ``is_valid`` holds for it; otherwise an argparse error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not is_valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")
    return value


def at_least_one(text: str) -> int:
    return _number(text, int, lambda value: value >= 1, "a whole number of at least 1")


def positive_finite(text: str) -> float:
    return _number(text, float, lambda value: math.isfinite(value) and value > 0, "a finite number above 0")


def non_negative_finite(text: str) -> float:
    return _number(text, float, lambda value: math.isfinite(value) and value >= 0, "a finite number of at least 0")


def probability(text: str) -> float:
    return _number(text, float, lambda value: 0 <= value <= 1, "a probability from 0 to 1")


def seed_number(text: str) -> int:
    return _number(text, int, lambda value: 0 <= value <= MAX_SEED, f"a seed from 0 to {MAX_SEED}")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (or ``yes``/``no``, ``1``/``0``); anything else is an error, never a silent false."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return words[text.lower()]


@dataclass
class Recipe:
    """The training hyper-parameters; ``parse`` in a field's metadata is how its command-line option is read."""
    uni_epochs: int = field(default=14, metadata={
        "help": "epochs of uni-modal pre-training, per modality", "parse": at_least_one})
    mma_epochs: int = field(default=8, metadata={"help": "epochs of MMA fine-tuning", "parse": at_least_one})
    naive_epochs: int = field(default=14, metadata={
        "help": "epochs of the naive joint baseline", "parse": at_least_one})
    batch_size: int = field(default=64, metadata={"help": "training batch size", "parse": at_least_one})
    lr: float = field(default=2e-3, metadata={
        "help": "peak one-cycle learning rate (uni-modal and naive)", "parse": positive_finite})
    mma_lr: float = field(default=3e-4, metadata={
        "help": "peak one-cycle learning rate of MMA fine-tuning", "parse": positive_finite})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay", "parse": non_negative_finite})
    missing_prob: float = field(default=0.5, metadata={
        "help": "MMA augmentation: probability that a sample loses one modality chosen at random",
        "parse": probability})
    learn_placeholder: bool = field(default=False, metadata={
        "help": "learn MMA's absent-modality placeholder features (true/false) instead of keeping zeros",
        "parse": parse_bool})
    seed: int = 0


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> ``[0, 1, 2]``: distinct seeds, each one ``seed_number`` accepts."""
    try:
        seeds = [seed_number(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seeds from 0 to {MAX_SEED} such as 0,1,2, not {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ume_edge.train", description=(
        "Train a UME-MMA model over one or more seeds: uni-modal encoders, UME, MMA (fine-tuned with "
        "missing-modality augmentation), the naive joint baseline; select UME or MMA on validation; write one "
        "seed's checkpoint and a report with every seed's results and their spread."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="avdigits", help="avdigits (shipped) or avmnist (needs --root)")
    parser.add_argument("--root", help="data folder for avmnist (MultiBench layout)")
    parser.add_argument("--out", type=Path, default=Path("models/avdigits.pt"),
                        help="checkpoint to write; the report goes next to it as <name>-report.json")
    parser.add_argument("--seeds", type=parse_seeds, default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--ship-seed", type=seed_number, help="the seed whose selected model --out gets; None: the "
                        "first of --seeds")
    parser.add_argument("--selection", choices=SELECTION_RULES, default="prefer-ume", help=(
        "UME or MMA, on validation: prefer-ume keeps UME unless MMA is better beyond noise (1.96 paired standard "
        "errors of the mean accuracy over patterns), prefer-mma the reverse, higher-mean ignores the noise"))
    parser.add_argument("--max-samples", type=at_least_one, help="keep only the first N pairs of every split (smoke "
                        "runs; the numbers then mean little); None: every pair")
    for recipe_field in fields(Recipe):
        if recipe_field.name != "seed":
            parser.add_argument(f"--{recipe_field.name.replace('_', '-')}", type=recipe_field.metadata["parse"],
                                default=recipe_field.default, help=recipe_field.metadata["help"])
    return parser

