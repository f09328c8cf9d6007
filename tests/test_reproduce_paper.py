"""The paper's reproduction script: seeds per learning rate, their aggregation, and the report's epochs."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "examples" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_paper"] = module
    spec.loader.exec_module(module)
    return module


def test_report_epochs_are_lightnings_zero_based_epochs_with_the_initialisation(reproduce):
    assert reproduce.report_epochs(20) == ["initialisation", 0, 4, 19]
    assert reproduce.report_epochs(2) == ["initialisation", 0, 1]
    assert reproduce.report_epochs(1) == ["initialisation", 0]


def test_probe_schedule_starts_dense_and_ends_at_the_last_epoch(reproduce):
    schedule = reproduce.probe_schedule(20)
    assert schedule[:3] == [0, 1, 2] and schedule[-1] == 19
    assert all(0 <= e < 20 for e in schedule) and schedule == sorted(set(schedule))


def test_mean_interval_is_the_student_t_interval_over_seeds(reproduce):
    values = [0.52, 0.61, 0.55]
    got = reproduce.mean_interval(values)
    mean = np.mean(values)
    half = stats.t.ppf(0.975, df=2) * np.std(values, ddof=1) / np.sqrt(3)  # 4.303 * s / sqrt(n)
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(mean)
    assert got["low"] == pytest.approx(mean - half) and got["high"] == pytest.approx(mean + half)
    one = reproduce.mean_interval([0.7])
    assert one == {"mean": 0.7, "low": 0.7, "high": 0.7, "n": 1}
    assert reproduce.mean_interval([float("nan"), 0.4, 0.6])["n"] == 2  # a probe without ξ does not count


def test_aggregate_groups_by_learning_rate_and_averages_over_seeds(reproduce):
    def row(lr, seed, within):
        at = {"within_train": within, "xi_input": 1.0 + seed}
        return {
            "lr": lr, "seed": seed, "start": at, "end": at, "peak_within_train": within, "peak_at_epochs": 1,
            "best_val_loss": 0.1, "best_val_loss_epochs": 3, "final_val_loss": 0.2,
        }  # fmt: skip

    rows = [row(1e-3, 0, 0.5), row(1e-2, 0, 0.2), row(1e-3, 1, 0.7), row(1e-2, 1, 0.4)]
    aggregated = reproduce.aggregate(rows)
    assert [a["lr"] for a in aggregated] == [1e-3, 1e-2]  # ascending learning rate
    small = aggregated[0]
    assert small["seeds"] == [0, 1]
    assert small["end"]["within_train"]["mean"] == pytest.approx(0.6)
    assert small["start"]["xi_input"]["mean"] == pytest.approx(1.5)
    assert small["end"]["within_train"]["low"] < 0.6 < small["end"]["within_train"]["high"]


def test_a_short_reproduction_runs_every_seed_logs_it_and_draws_the_initialisation(reproduce, tmp_path):
    out = tmp_path / "repro"
    args = ["--epochs", "2", "--lrs", "1e-2", "--seeds", "0", "1", "--max-examples", "300"]
    report = reproduce.main([*args, "--samples-per-class", "2", "--out", str(out)])

    summary = json.loads((out / "summary.json").read_text())
    assert sorted((r["lr"], r["seed"]) for r in summary["runs"]) == [(1e-2, 0), (1e-2, 1)]
    assert [a["seeds"] for a in summary["by_lr"]] == [[0, 1]]
    for entry in summary["by_lr"]:
        within = entry["end"]["within_train"]
        assert within["n"] == 2 and within["low"] <= within["mean"] <= within["high"]
    for run in summary["runs"]:
        hparams = yaml.safe_load((Path(run["run_dir"]) / "hparams.yaml").read_text())
        assert hparams["seed"] == run["seed"] and hparams["lr"] == run["lr"]
        assert Path(run["run_dir"]).parent.name == f"lr={run['lr']:g}"
        assert run["epochs_at_end"] == 2
    # Different seeds train different models: their numbers differ.
    ends = {(r["lr"], r["seed"]): r["end"]["within_train"] for r in summary["runs"]}
    assert ends[(1e-2, 0)] != ends[(1e-2, 1)]
    text = report.read_text()
    assert "no probe at" not in text  # every epoch asked for, the initialisation included, was probed
    assert "| lr |" in (out / "summary.md").read_text()
