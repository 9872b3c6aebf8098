"""Optimiser pieces shared by the stages: weight-decay groups, the lr scaling rule and
the per-step schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch.nn as nn


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017), as the MAE recipes state their rates."""
    return blr * effective_batch / 256


def param_groups(model: nn.Module, weight_decay: float, no_decay: Iterable[str] = ()) -> list[dict]:
    """Two groups: decayed weight matrices, and undecayed norms, biases and the named
    parameters (position embeddings and tokens). Frozen parameters are left out."""
    skip = set(no_decay)
    decay, undecayed = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (undecayed if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0, then half-cosine down to ``min_lr``; a pure function of the step."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
