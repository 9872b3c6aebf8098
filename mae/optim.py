"""Optimiser pieces shared by the stages: weight-decay groups, the lr scaling rule, the
per-step schedule and the AdamW every AdamW stage builds."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
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


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
          anchor: tuple[int, float] | None = None) -> float:
    """Linear warm-up from 0, then half-cosine down to ``min_lr``; a pure function of the step."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = cosine_progress(step, warmup_steps=warmup_steps, total_steps=total_steps, anchor=anchor)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_progress(step: int, *, warmup_steps: int, total_steps: int, anchor: tuple[int, float] | None = None) -> float:
    """How far along its cosine (0 to 1) the schedule is at ``step``, after the warm-up.

    ``anchor`` (step, progress): the step count was re-planned at that step, where the cosine
    had come that far; from there it covers the rest of the way by ``total_steps``, so the
    rate goes on without a jump."""
    if anchor is not None and step >= anchor[0]:
        s0, p0 = anchor
        return p0 + (1.0 - p0) * (step - s0) / max(1, total_steps - s0)
    return (step - warmup_steps) / max(1, total_steps - warmup_steps)


def fused_available(device: torch.device | str) -> bool:
    """Whether this torch build has the fused Adam kernel for ``device`` (CPU since torch 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return torch.device(device).type in _get_fused_kernels_supported_devices()


def adamw(groups: list[dict], lr: float, device: torch.device | str, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel for ``device``: one pass over all parameters
    instead of a dozen, and a step that a ``found_inf`` tensor cancels on the device (the
    loop's non-finite guard uses this to skip a bad step without waiting on the host)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused_available(device))
