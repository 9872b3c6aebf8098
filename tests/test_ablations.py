"""The ablation study's bookkeeping (benchmarks/ablations_cifar10.py, ablation_table.py):
which runs are left, how results are appended, and the table they make. No training."""

from __future__ import annotations

import json

import pytest

from benchmarks import ablation_table as table
from benchmarks import ablations_cifar10 as study


def row(arm: str, seed: int = 0, knn: float = 50.0, linear: float = 60.0, **extra) -> dict:
    base = dict(arm=arm, seed=seed, steps=3500, minutes=10.0, knn_cls=knn, knn_avg=knn + 1, linear_cls=linear,
                linear_avg=linear + 1, machine="Some CPU, 2 cores")  # fmt: skip
    return {**base, **extra}


def test_the_grid_names_the_issues_arms_and_runs_the_headline_with_every_seed():
    names = [a.name for a in study.ARMS]
    for name in ("attention", "feedforward", "random-attention", "random-feedforward", "supervised-attention",
                 "supervised-feedforward"):  # fmt: skip
        assert name in names
    todo = study.pending(study.ARMS, [0, 1, 2], [])
    assert [s for a, s in todo if a.name == "feedforward"] == [0, 1, 2]
    assert [s for a, s in todo if a.name == "mask-grid"] == [0]
    assert len(todo) == 6 + len(study.ARMS) - 2


def test_finished_runs_are_skipped_and_new_ones_appended(tmp_path):
    path = tmp_path / "results" / "ablations.json"
    study.append_result(path, row("attention", 0))
    study.append_result(path, row("feedforward", 1))
    results = study.load_results(path)
    assert [(r["arm"], r["seed"]) for r in results] == [("attention", 0), ("feedforward", 1)]
    arms = [study.BY_NAME["attention"], study.BY_NAME["feedforward"], study.BY_NAME["random-attention"]]
    left = [(a.name, s) for a, s in study.pending(arms, [0, 1], results)]
    assert left == [("attention", 1), ("feedforward", 0), ("random-attention", 0)]
    assert not list(path.parent.glob("*.tmp"))


def test_data_folder_gives_brace_patterns_and_a_clear_error(tmp_path):
    train, test = study.shard_patterns(study.ROOT / "shards" / "cifar10")
    assert train.endswith("train-{000000..000007}.tar") and test.endswith("test-{000000..000003}.tar")
    with pytest.raises(SystemExit, match="train-index.json"):
        study.shard_patterns(tmp_path)


def test_table_shows_mean_and_sd_the_lift_and_only_differences_beyond_twice_the_spread(tmp_path):
    results = [row("attention", s, knn=50 + s, linear=60 + s) for s in (0, 1, 2)]
    results += [row("feedforward", s, knn=40 + s, linear=60.5 + s) for s in (0, 1, 2)]
    results += [row("random-attention", knn=30.0, linear=35.0, steps=0), row("mask-grid", knn=51.5, linear=61.0)]
    results += [row("equal-minutes-feedforward", step_s_attention=0.17, step_s_feedforward=0.12)]
    text = table.section(results, None)
    assert "| headline | **attention, MAE-pretrained** | 3 | 3500 | 10.00 ± 0.00 | 51.00 ± 1.00 | 52.00 ± 1.00 |" in text
    assert "+21.00 (cls)" in text  # 51 - 30
    assert "**3500 optimiser steps of 64**" in text
    assert "feedforward (k-NN cls -10.00, k-NN avg -10.00)" in text  # beyond 2 x 1.0; linear +0.5 is not
    assert "mask-grid" not in text.split("A difference counts")[1]  # +0.5 to +1.5: within
    assert "0.170 s (attention) and 0.120 s (feed-forward)" in text
    assert "--data DATA --work OUT --steps 3500" in text and str(tmp_path) not in text and "/work" not in text

    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nbefore\n\n{table.START}\nOLD-SECTION\n{table.END}\n\nafter\n")
    results_file = tmp_path / "ablations.json"
    results_file.write_text(json.dumps(results))
    table.main(["--results", str(results_file), "--table", str(md)])
    new = md.read_text()
    assert new.startswith("# Benchmarks\n\nbefore\n\n") and new.endswith("\n\nafter\n") and "OLD-SECTION" not in new
    assert new.count(table.START) == 1
