"""The UME-MMA recipe (docs/method.md): uni-modal pre-training, UME, MMA with missing-modality augmentation, the naive
joint baseline, and selection on validation, over one or more seeds. Writes one seed's selected checkpoint and a
report with every seed's results and their spread. Its options are read by ``train_options`` and the two files
written by ``train_output``.

    python -m ume_edge.train --dataset avdigits --seeds 0,1,2 --out models/avdigits.pt
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np

try:
    import torch
    from torch import nn
except ModuleNotFoundError as missing:  # `python -m ume_edge.train` without the [build] extra: one line, no traceback
    if __name__ != "__main__" or missing.name != "torch":
        raise
    print("error: python -m ume_edge.train needs PyTorch, which is not installed: pip install 'ume-edge[build]'",
          file=sys.stderr)
    sys.exit(2)

from ume_edge.cli_common import show_progress
from ume_edge.data import load, pattern_key, presence_patterns
from ume_edge.errors import UmeEdgeError
from ume_edge.model import UMEModel, conv_modalities
from ume_edge.scoring import accuracy_by_pattern, mean_over_patterns, predictions_by_pattern
from ume_edge.train_options import Recipe, build_parser
from ume_edge.train_output import NotWritten, check_writable, write_checkpoint_and_report
from ume_edge.train_report import format_report, multi_seed_report, seed_report

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


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


def main(argv=None) -> None:
    parser = build_parser()
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
