"""Checkpoints and metrics written and read back in this process (the fast tier; the real
runs that resume from them are in test_train.py): the state comes back exactly, resume finds
the newest complete checkpoint, and a resumed run's metrics drop what it will log again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from mae.checkpoint import (
    checkpoints_dir, find_latest, list_checkpoints, load_model_weights, load_training_state, resolve_resume,
    save_checkpoint,
)  # fmt: skip
from mae.metrics import MetricsLogger, read_metrics
from mae.pretrain import PretrainConfig


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # later tests build their own


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_restores_weights_optimiser_state_and_rng(accelerator, tmp_path: Path) -> None:
    model, optimizer = trained(0)
    random.seed(7)
    path = save_checkpoint(accelerator, tmp_path, 5, model=model, optimizer=optimizer, state={"step": 5, "epoch": 1})
    expected_draw = random.random(), torch.rand(3)
    fresh, fresh_optimizer = trained(1)
    load_model_weights(path, fresh)
    state = load_training_state(accelerator, path, fresh_optimizer)
    assert (state["step"], state["epoch"]) == (5, 1)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k]["exp_avg"], restored[k]["exp_avg"]) for k in saved)
    draw = random.random(), torch.rand(3)
    assert draw[0] == expected_draw[0] and torch.equal(draw[1], expected_draw[1])  # the RNG goes on as saved


def test_resume_takes_the_newest_complete_checkpoint_and_keeps_the_last_two(accelerator, tmp_path: Path) -> None:
    model, optimizer = trained(0)
    for step in (1, 2, 3):
        newest = save_checkpoint(accelerator, tmp_path, step, model=model, optimizer=optimizer, state={"step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002", "ckpt-00000003"]
    (checkpoints_dir(tmp_path) / "ckpt-00000009.tmp").mkdir()  # a save the kill cut short
    assert find_latest(tmp_path) == newest == resolve_resume("auto", tmp_path)
    assert resolve_resume(str(tmp_path), "elsewhere") == newest  # a run folder given by name
    with pytest.raises(FileNotFoundError, match="no checkpoint in that folder"):
        resolve_resume(str(tmp_path / "checkpoints"), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_resumed_metrics_drop_the_steps_logged_after_the_checkpoint(accelerator, tmp_path: Path) -> None:
    cfg = PretrainConfig(output_dir=str(tmp_path), report_to="none")
    first = MetricsLogger(accelerator, cfg)
    for step in range(1, 6):
        first.log(step, loss=torch.tensor(step / 2))
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # the line the kill cut
    resumed = MetricsLogger(accelerator, cfg, resume_step=3)
    resumed.log(4, loss=0.25)
    resumed.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 0.25)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 4, "loss": 0.25}
