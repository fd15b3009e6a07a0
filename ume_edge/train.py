"""The UME-MMA recipe (docs/method.md): uni-modal pre-training, UME, MMA with missing-modality augmentation, the naive
joint baseline, and selection on validation, over one or more seeds. Writes one seed's selected checkpoint and a
report with every seed's results and their spread.

    python -m ume_edge.train --dataset avdigits --seeds 0,1,2 --out models/avdigits.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ume_edge.cli_common import show_progress
from ume_edge.data import load, pattern_key, presence_patterns
from ume_edge.errors import UmeEdgeError
from ume_edge.model import UMEModel, conv_modalities
from ume_edge.scoring import accuracy_by_pattern, mean_over_patterns, predictions_by_pattern
from ume_edge.train_report import SELECTION_RULES, format_report, multi_seed_report, seed_report

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
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


def _tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(x)) for name, x in inputs.items()}


def torch_predictor(model: UMEModel):
    """A NumPy-in / NumPy-out predictor for ``ume_edge.scoring``."""
    def predict(batch: dict[str, np.ndarray | None]) -> np.ndarray:
        with torch.no_grad():
            feeds = {k: (torch.from_numpy(np.ascontiguousarray(v)) if v is not None else None)
                     for k, v in batch.items()}
            return model(feeds).numpy()
    return predict


def evaluate(model: UMEModel, inputs, labels) -> dict[str, float]:
    model.eval()
    subset = {name: inputs[name] for name in model.modality_names}
    return accuracy_by_pattern(torch_predictor(model), subset, labels)


def _augmentation_masks(batch: int, names: list[str], prob: float, generator: torch.Generator):
    """Per row, with probability ``prob``, one modality chosen at random is made absent (never all of them)."""
    masks = torch.ones(len(names), batch, dtype=torch.bool)
    drop = torch.rand(batch, generator=generator) < prob
    which = torch.randint(len(names), (batch,), generator=generator)
    masks[which[drop], drop.nonzero().flatten()] = False
    return {name: masks[i] for i, name in enumerate(names)}


def fit(model: UMEModel, train, val, epochs: int, lr: float, recipe: Recipe, label: str,
        missing_prob: float = 0.0) -> UMEModel:
    """Train with cross-entropy; keep the weights of the epoch with the best mean validation accuracy."""
    inputs, labels = _tensors(train[0]), torch.from_numpy(train[1])
    names = model.modality_names
    generator = torch.Generator().manual_seed(recipe.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr,
                                                   total_steps=epochs * -(-len(labels) // recipe.batch_size))
    best, best_state = -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), recipe.batch_size):
            rows = order[start:start + recipe.batch_size]
            batch = {name: inputs[name][rows] for name in names}
            present = _augmentation_masks(len(rows), names, missing_prob, generator) if missing_prob else None
            loss = nn.functional.cross_entropy(model(batch, present), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        score = mean_over_patterns(evaluate(model, *val))
        LOGGER.info(f"  {label:<12} epoch {epoch:>2}/{epochs}  loss {loss.item():.3f}  val mean acc {score:.2f}%")
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    if best_state is None:
        raise UmeEdgeError(f"{label}: no epoch to keep ({epochs} epochs, validation accuracy {best})")
    model.load_state_dict(best_state)
    return model.eval()


def _uni_model(modality, num_classes, name) -> UMEModel:
    return UMEModel([modality], num_classes, "ume", name=name)


def _assemble(uni_models: dict[str, UMEModel], fusion: str, recipe: Recipe, name: str, class_names) -> UMEModel:
    """A late-fusion model whose encoders and heads are copies of the uni-modal ones."""
    modalities = [copy.deepcopy(u.modalities[0]) for u in uni_models.values()]
    model = UMEModel(modalities, uni_models[modalities[0].name].num_classes, fusion, recipe.learn_placeholder,
                     class_names, name)
    for m_name, uni in uni_models.items():
        model.encoders[m_name].load_state_dict(uni.encoders[m_name].state_dict())
        model.heads[m_name].load_state_dict(uni.heads[m_name].state_dict())
    return model.eval()


def load_splits(dataset: str, root=None, max_samples: int | None = None) -> dict[str, tuple]:
    """Train, validation and test splits; ``max_samples`` keeps each split's first rows (for smoke runs only)."""
    splits = {}
    for split in SPLITS:
        try:
            inputs, labels = load(dataset, split, root)
        except (ValueError, OSError) as error:
            raise UmeEdgeError(str(error)) from None
        if labels is None:
            raise UmeEdgeError(f"{dataset} {split}: no labels, and training needs them")
        if max_samples is not None:
            inputs, labels = {name: x[:max_samples] for name, x in inputs.items()}, labels[:max_samples]
        splits[split] = (inputs, labels)
    return splits


def train_all(splits: dict[str, tuple], recipe: Recipe, dataset: str, num_classes: int = 10,
              class_names=None) -> dict[str, UMEModel]:
    """Run every training stage of docs/method.md for ``recipe.seed``. Returns the models by role."""
    torch.manual_seed(recipe.seed)
    train, val = splits["train"], splits["val"]
    names = sorted(train[0])
    shapes = {name: x.shape[1:] for name, x in train[0].items()}

    def modalities_factory():
        return conv_modalities(shapes)

    models: dict[str, UMEModel] = {}
    for modality in modalities_factory():
        LOGGER.info(f"[1/4] uni-modal pre-training: {modality.name}")
        uni = _uni_model(modality, num_classes, f"uni:{modality.name}")
        models[f"uni:{modality.name}"] = fit(uni, train, val, recipe.uni_epochs, recipe.lr, recipe, modality.name)
    uni_models = {n: models[f"uni:{n}"] for n in names}
    models["ume"] = _assemble(uni_models, "ume", recipe, dataset, class_names)
    LOGGER.info("[2/4] MMA: fine-tuning from the uni-modal weights, missing-modality augmentation "
                f"p={recipe.missing_prob}")
    mma = _assemble(uni_models, "mma", recipe, dataset, class_names)
    models["mma"] = fit(mma, train, val, recipe.mma_epochs, recipe.mma_lr, recipe, "mma", recipe.missing_prob)
    LOGGER.info("[3/4] naive baseline: joint late fusion from scratch, no augmentation")
    naive = UMEModel(modalities_factory(), num_classes, "mma", class_names=class_names, name=f"{dataset}-naive")
    models["naive"] = fit(naive, train, val, recipe.naive_epochs, recipe.lr, recipe, "naive")
    return models


def predict_all(models: dict[str, UMEModel], inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Predicted classes per presence pattern for every model (a uni-modal model: its own modality only)."""
    predictions = {}
    for role, model in models.items():
        model.eval()
        subset = {name: inputs[name] for name in model.modality_names}
        predictions[role] = predictions_by_pattern(torch_predictor(model), subset)
    return predictions


def train_seed(splits: dict[str, tuple], recipe: Recipe, dataset: str, selection: str = "prefer-ume",
               num_classes: int = 10, class_names=None) -> tuple[dict[str, UMEModel], dict]:
    """Train and report one seed: the models by role (``selected`` among them) and the seed's report entry."""
    started = time.perf_counter()
    models = train_all(splits, recipe, dataset, num_classes, class_names)
    LOGGER.info("[4/4] selection on validation, report on test")
    names = sorted(splits["train"][0])
    (val_inputs, val_labels), (test_inputs, test_labels) = splits["val"], splits["test"]
    entry = seed_report(predict_all(models, val_inputs), predict_all(models, test_inputs), val_labels, test_labels,
                        names, _pattern_keys(names), selection)
    models["selected"] = models[entry["selected"]]
    return models, {"seed": recipe.seed, **entry, "recipe": asdict(recipe),
                    "train_seconds": round(time.perf_counter() - started, 1)}


def _pattern_keys(names: list[str]) -> list[str]:
    return [pattern_key(p) for p in presence_patterns(names)]


def train_seeds(dataset: str, recipe: Recipe, seeds: list[int], shipped_seed: int, selection: str = "prefer-ume",
                root=None, max_samples: int | None = None, num_classes: int = 10,
                class_names=None) -> tuple[dict[str, UMEModel], dict]:
    """Train every seed (each exactly as it would train alone). Returns the shipped seed's models and the report."""
    if shipped_seed not in seeds:
        raise ValueError(f"the shipped seed {shipped_seed} is not among the seeds {seeds}")
    started = time.perf_counter()
    splits = load_splits(dataset, root, max_samples)
    entries, shipped = [], None
    for number, seed in enumerate(seeds, 1):
        LOGGER.info(f"seed {seed} ({number} of {len(seeds)})")
        models, entry = train_seed(splits, replace(recipe, seed=seed), dataset, selection, num_classes, class_names)
        entries.append(entry)
        shipped = models if seed == shipped_seed else shipped
    report = multi_seed_report(entries, shipped_seed, dataset, _pattern_keys(sorted(splits["train"][0])),
                               round(time.perf_counter() - started, 1))
    if not report["summary"]["targets"]["met_on_every_seed"]:
        LOGGER.warning("the data-set targets are not met on validation for every seed (see the report's targets)")
    assert shipped is not None  # ``shipped_seed`` is one of ``seeds``
    return shipped, report


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


def _parser() -> argparse.ArgumentParser:
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


class NotWritten(UmeEdgeError):
    """The checkpoint or its report could not be written; the previous ones are as they were."""


def check_writable(path: Path) -> None:
    """Raise ``UmeEdgeError`` unless a file can be written at ``path`` (its folder exists or can be created)."""
    try:
        problem = _why_not_writable(path)
    except OSError as error:
        problem = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
    if problem:
        raise UmeEdgeError(f"cannot write {path}: {problem}")


def _why_not_writable(path: Path) -> str | None:
    if path.is_dir():
        return f"it is a folder; give a file name, such as {path / 'model.pt'}"
    folder = path.parent
    existing = next(ancestor for ancestor in (folder, *folder.parents) if ancestor.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if existing != folder:  # try creating the first missing folder (and remove it again)
        first_missing = next(ancestor for ancestor in (folder, *folder.parents) if ancestor.parent == existing)
        first_missing.mkdir()
        first_missing.rmdir()
        return None
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
        return None


def write_checkpoint_and_report(model: UMEModel, report: dict, out: Path, report_path: Path) -> None:
    """Write both to temporary files next to them and rename them over the old ones only once both are complete.
    On any failure (``NotWritten``) or interruption the old files are untouched and the temporaries removed."""
    staged = {final: final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial") for final in (out, report_path)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save(staged[out], report)
        staged[report_path].write_text(json.dumps(report, indent=2) + "\n")
        with _sigint_ignored():
            for final, temporary in staged.items():  # the report last
                os.replace(temporary, final)
    except OSError as error:
        raise NotWritten(f"could not write {out} and {report_path} ({error.strerror or error}); "
                         "both are as they were") from None
    except RuntimeError as error:  # how torch.save reports a failed write, without the cause
        raise NotWritten(f"could not write {out}: saving stopped part-way, most likely on a full disk or a file-size "
                         f"limit ({str(error).splitlines()[0]}); {out} and {report_path} are as they were") from None
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


@contextmanager
def _sigint_ignored():
    """Ctrl-C is ignored inside, so that the checkpoint and the report are renamed both or neither."""
    if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    shipped_seed = args.seeds[0] if args.ship_seed is None else args.ship_seed
    if shipped_seed not in args.seeds:
        parser.error(f"--ship-seed {shipped_seed} is not among --seeds {','.join(map(str, args.seeds))}")
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe) if f.name != "seed"})
    report_path = args.out.with_name(args.out.stem + "-report.json")
    show_progress()
    try:
        for path in (args.out, report_path):
            check_writable(path)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        models, report = train_seeds(args.dataset, recipe, args.seeds, shipped_seed, args.selection, args.root,
                                     args.max_samples, class_names=[str(d) for d in range(10)])
        models["selected"].name = args.dataset
        write_checkpoint_and_report(models["selected"], report, args.out, report_path)
    except UmeEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1 if isinstance(error, NotWritten) else 2) from None
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written; {args.out} is as it was", file=sys.stderr)
        raise SystemExit(130) from None
    print(format_report(report))
    print(f"\nshipped: seed {shipped_seed}'s {report['selected']}; wrote {args.out} and {report_path} "
          f"in {report['train_seconds']} s")


if __name__ == "__main__":  # run as the imported module, so that its progress logs under ume_edge.train
    from ume_edge.train import main as train_main

    train_main()
