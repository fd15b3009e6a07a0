import json
import subprocess
import sys

import numpy as np
import pytest

from ume_edge.model import UMEModel
from ume_edge.scoring import discordant_pairs, mcnemar_exact, spread
from ume_edge.train import main
from ume_edge.train_options import build_parser
from ume_edge.train_report import select


@pytest.mark.parametrize("only_a, only_b, expected", [
    (0, 0, 1.0),  # no discordant pair: no evidence either way
    (0, 1, 1.0),  # 2 * 1/2
    (0, 5, 0.0625),  # 2 * 1/32
    (1, 5, 0.21875),  # 2 * (1 + 6)/64
    (2, 8, 0.109375),  # 2 * (1 + 10 + 45)/1024
    (8, 2, 0.109375),  # symmetric
    (5, 15, 0.041389465),  # 2 * (1 + 20 + 190 + 1140 + 4845 + 15504)/2**20
    (5, 5, 1.0),  # the doubled tail passes 1
])
def test_mcnemar_exact_matches_hand_computed_values(only_a, only_b, expected):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, abs=1e-9)


def test_discordant_pairs_count_the_samples_only_one_classifier_gets_right():
    labels = np.array([0, 1, 2, 3, 4])
    a = np.array([0, 1, 9, 9, 4])
    b = np.array([0, 9, 2, 9, 9])
    assert discordant_pairs(a, b, labels) == (2, 1)


def test_spread_is_mean_sample_sd_min_max():
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0}
    assert spread([4.5])["sd"] is None


def _correctness(samples=600, patterns=3, wrong_rows=()):
    """All right, except the given rows (wrong on every pattern)."""
    correct = np.ones((patterns, samples), dtype=bool)
    correct[:, list(wrong_rows)] = False
    return correct


def test_selection_within_noise_keeps_ume_unless_asked_otherwise():
    ume = _correctness(wrong_rows=range(0, 60))
    mma = _correctness(wrong_rows=range(1, 60))  # one sample better: 0.17 points, well within noise
    chosen = {rule: select(ume, mma, rule) for rule in ("prefer-ume", "prefer-mma", "higher-mean")}
    assert all(s["within_noise"] for s in chosen.values())
    assert chosen["prefer-ume"]["selected"] == "ume"
    assert chosen["prefer-mma"]["selected"] == "mma"
    assert chosen["higher-mean"]["selected"] == "mma"
    assert chosen["prefer-ume"]["mma_minus_ume"] == pytest.approx(100 / 600, abs=0.01)


def test_selection_beyond_noise_follows_the_better_model_whatever_the_rule():
    ume, mma = _correctness(wrong_rows=range(60)), _correctness()
    for rule in ("prefer-ume", "prefer-mma", "higher-mean"):
        assert select(ume, mma, rule)["selected"] == "mma"
        assert select(mma, ume, rule)["selected"] == "ume"
    result = select(ume, mma)
    assert not result["within_noise"] and result["mma_minus_ume"] == 10.0
    assert result["mma_minus_ume"] > result["noise_z"] * result["standard_error"]


def test_identical_models_are_within_noise_and_a_tie_goes_to_ume():
    same = _correctness(wrong_rows=range(100))
    result = select(same, same, "higher-mean")
    assert result["within_noise"] and result["standard_error"] == 0.0 and result["selected"] == "ume"
    with pytest.raises(ValueError, match="selection rule"):
        select(same, same, "coin-flip")


def test_cli_booleans_are_strict_and_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--learn-placeholder", "maybe"])
    assert exit_info.value.code == 2 and "expected true or false" in capsys.readouterr().err
    help_text = " ".join(build_parser().format_help().split())
    for default in ("(default: 0,1,2)", "(default: prefer-ume)", "(default: False)", "(default: 14)"):
        assert default in help_text


@pytest.mark.slow
def test_train_cli_over_two_seeds_writes_the_shipped_seed_and_a_consistent_summary(tmp_path):
    out = tmp_path / "m.pt"
    result = subprocess.run(
        [sys.executable, "-m", "ume_edge.train", "--dataset", "avdigits", "--out", str(out), "--seeds", "3,4",
         "--ship-seed", "4", "--max-samples", "120", "--uni-epochs", "1", "--mma-epochs", "1", "--naive-epochs", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for stage in ("seed 3 (1 of 2)", "seed 4 (2 of 2)", "[1/4] uni-modal pre-training: audio",
                  "[1/4] uni-modal pre-training: image", "[2/4] MMA", "[3/4] naive baseline", "[4/4] selection"):
        assert stage in result.stderr
    report = json.loads((tmp_path / "m-report.json").read_text())
    seeds, summary = report["seeds"], report["summary"]
    assert [e["seed"] for e in seeds] == summary["seeds"] == [3, 4] and report["shipped_seed"] == 4
    shipped = seeds[1]
    assert all(report[key] == value for key, value in shipped.items() if key not in ("seed", "train_seconds"))
    assert report["recipe"]["seed"] == 4 and summary["selected"] == [e["selected"] for e in seeds]
    for entry in seeds:
        assert set(entry["models"]) == {"uni:audio", "uni:image", "naive", "ume", "mma", "selected"}
        assert entry["models"]["selected"] == entry["models"][entry["selected"]]
        assert entry["models"]["uni:audio"]["image"] is None  # a uni-modal model cannot answer without its modality
        assert entry["ceiling_gaps"]["ume"] == {"audio": 0.0, "image": 0.0}
        assert "ume" in entry["ceiling_gaps_by_construction"]
        assert entry["targets"]["split"] == "val" and entry["selection"]["rule"] == "prefer-ume"
        for pattern, test in entry["ume_vs_mma"].items():
            # 120 test pairs: the accuracy difference is the difference of the discordant counts
            difference = (entry["models"]["ume"][pattern] - entry["models"]["mma"][pattern]) * 120 / 100
            assert round(difference) == test["ume_only_correct"] - test["mma_only_correct"]
            expected_p = mcnemar_exact(test["ume_only_correct"], test["mma_only_correct"])
            assert test["p"] == pytest.approx(expected_p, abs=1e-4)
    for role, cells in summary["models"].items():
        for pattern, cell in cells.items():
            values = [e["models"][role][pattern] for e in seeds]
            if values[0] is None:
                assert cell is None
                continue
            assert cell["mean"] == pytest.approx(np.mean(values), abs=0.006)
            assert cell["sd"] == pytest.approx(np.std(values, ddof=1), abs=0.006)
    for role, gaps in summary["ceiling_gaps"].items():
        for modality, gap in gaps.items():
            assert gap["mean"] == pytest.approx(np.mean([e["ceiling_gaps"][role][modality] for e in seeds]), abs=0.006)
    for pattern, paired in summary["ume_vs_mma"].items():
        assert paired["p_by_seed"] == [e["ume_vs_mma"][pattern]["p"] for e in seeds]
        assert paired["ume_better_seeds"] + paired["mma_better_seeds"] + paired["even_seeds"] == 2
    assert summary["ceiling_gaps_by_construction"] == ["ume"]
    assert "0 by construction" in result.stdout and " ± " in result.stdout and "McNemar" in result.stdout
    model = UMEModel.load(out)
    assert model.fusion == report["selected"] and model.name == "avdigits" and model.report["shipped_seed"] == 4
