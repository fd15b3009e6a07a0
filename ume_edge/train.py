"""The UME-MMA recipe (METHOD.md): uni-modal pre-training, UME, MMA with missing-modality augmentation, the naive
joint baseline, and selection on validation. Writes the selected checkpoint and a report.

    python -m ume_edge.train --dataset avdigits --out models/avdigits.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ume_edge.data import load, pattern_key, presence_patterns
from ume_edge.metrics import accuracy_by_pattern, mean_over_patterns
from ume_edge.model import UMEModel, conv_modalities


@dataclass
class Recipe:
    uni_epochs: int = 14
    mma_epochs: int = 8
    naive_epochs: int = 14
    batch_size: int = 64
    lr: float = 2e-3
    mma_lr: float = 3e-4
    weight_decay: float = 1e-4
    missing_prob: float = 0.5
    learn_placeholder: bool = False
    seed: int = 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tensors(inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(x)) for name, x in inputs.items()}


def torch_predictor(model: UMEModel):
    """A NumPy-in / NumPy-out predictor for ``ume_edge.metrics``."""
    def predict(batch: dict[str, np.ndarray | None]) -> np.ndarray:
        with torch.no_grad():
            feeds = {k: (torch.from_numpy(np.ascontiguousarray(v)) if v is not None else None) for k, v in batch.items()}
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
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * -(-len(labels) // recipe.batch_size))
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
        _log(f"  {label:<12} epoch {epoch:>2}/{epochs}  loss {loss.item():.3f}  val mean acc {score:.2f}%")
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
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


def train_all(dataset: str, recipe: Recipe, root=None, num_classes: int = 10, class_names=None) -> tuple[dict[str, UMEModel], dict]:
    """Run every stage of METHOD.md. Returns the models by role and the report."""
    torch.manual_seed(recipe.seed)
    train, val, test = (load(dataset, split, root) for split in ("train", "val", "test"))
    names = sorted(train[0])
    shapes = {name: x.shape[1:] for name, x in train[0].items()}

    def modalities_factory():
        return conv_modalities(shapes)

    models: dict[str, UMEModel] = {}
    for modality in modalities_factory():
        _log(f"[1/4] uni-modal pre-training: {modality.name}")
        uni = _uni_model(modality, num_classes, f"uni:{modality.name}")
        models[f"uni:{modality.name}"] = fit(uni, train, val, recipe.uni_epochs, recipe.lr, recipe, modality.name)
    uni_models = {n: models[f"uni:{n}"] for n in names}
    models["ume"] = _assemble(uni_models, "ume", recipe, dataset, class_names)
    _log(f"[2/4] MMA: fine-tuning from the uni-modal weights, missing-modality augmentation p={recipe.missing_prob}")
    mma = _assemble(uni_models, "mma", recipe, dataset, class_names)
    models["mma"] = fit(mma, train, val, recipe.mma_epochs, recipe.mma_lr, recipe, "mma", recipe.missing_prob)
    _log("[3/4] naive baseline: joint late fusion from scratch, no augmentation")
    naive = UMEModel(modalities_factory(), num_classes, "mma", class_names=class_names, name=f"{dataset}-naive")
    models["naive"] = fit(naive, train, val, recipe.naive_epochs, recipe.lr, recipe, "naive")
    _log("[4/4] selection on validation, report on test")
    report = build_report(models, val, test, names, recipe, dataset)
    models["selected"] = models[report["selected"]]
    return models, report


def _uni_table(acc: float, modality: str, patterns) -> dict[str, float | None]:
    """A uni-modal model answers any pattern that holds its modality (from that modality alone)."""
    return {pattern_key(p): (acc if modality in p else None) for p in patterns}


def build_report(models, val, test, names, recipe: Recipe, dataset: str) -> dict:
    patterns = presence_patterns(names)
    fused = ("naive", "ume", "mma")
    val_mean = {role: mean_over_patterns(evaluate(models[role], *val)) for role in ("ume", "mma")}
    selected = max(("ume", "mma"), key=lambda role: val_mean[role])
    tables = {}
    for name in names:
        acc = evaluate(models[f"uni:{name}"], *test)[name]
        tables[f"uni:{name}"] = _uni_table(acc, name, patterns)
    for role in fused:
        tables[role] = evaluate(models[role], *test)
    tables["selected"] = tables[selected]
    gaps = {role: {n: round(tables[f"uni:{n}"][n] - tables[role][n], 2) for n in names}
            for role in (*fused, "selected")}
    return {
        "dataset": dataset, "split": "test", "patterns": [pattern_key(p) for p in patterns],
        "models": tables, "selected": selected, "val_mean_accuracy": val_mean,
        "ceiling_gaps": gaps, "recipe": asdict(recipe),
    }


def format_report(report: dict) -> str:
    """The report as a Markdown table: accuracy per pattern (rows: models), then the ceiling gaps."""
    patterns = report["patterns"]
    roles = [r for r in report["models"] if r != "selected"] + ["selected"]
    lines = ["| model | " + " | ".join(patterns) + " | mean |", "|---" * (len(patterns) + 2) + "|"]
    for role in roles:
        row = report["models"][role]
        cells = [f"{row[p]:.2f}" if row[p] is not None else "-" for p in patterns]
        label = f"selected ({report['selected']})" if role == "selected" else role
        mean = f"{mean_over_patterns(row):.2f}" if not role.startswith("uni:") else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    singles = sorted({n for gaps in report["ceiling_gaps"].values() for n in gaps})
    lines += ["", "Ceiling gap (uni-modal accuracy minus the fused model's, one modality present; lower is better):", "",
              "| model | " + " | ".join(singles) + " |", "|---" * (len(singles) + 1) + "|"]
    for role, gaps in report["ceiling_gaps"].items():
        lines.append(f"| {role} | " + " | ".join(f"{gaps[n]:+.2f}" for n in singles) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ume_edge.train", description=(
        "Train a UME-MMA model: uni-modal encoders, UME, MMA (fine-tuned with missing-modality augmentation), "
        "the naive joint baseline; select UME or MMA on validation; write the checkpoint and a report."))
    parser.add_argument("--dataset", default="avdigits", help="avdigits (shipped) or avmnist (needs --root)")
    parser.add_argument("--root", help="data folder for avmnist (MultiBench layout)")
    parser.add_argument("--out", type=Path, default=Path("models/avdigits.pt"), help="checkpoint to write")
    defaults = Recipe()
    for field, value in asdict(defaults).items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=value, help=f"default: {value}")
    args = parser.parse_args(argv)
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(defaults)})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    models, report = train_all(args.dataset, recipe, root=args.root, class_names=[str(d) for d in range(10)])
    report["train_seconds"] = round(time.perf_counter() - started, 1)
    models["selected"].name = args.dataset
    models["selected"].save(args.out, report)
    report_path = args.out.with_name(args.out.stem + "-report.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nselected: {report['selected']}; wrote {args.out} and {report_path} in {report['train_seconds']} s")


if __name__ == "__main__":
    main()
