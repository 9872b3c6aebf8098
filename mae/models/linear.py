"""Linear layers whose fp32 products on CPU go through oneDNN.

On the AMD EPYC this project is measured on, torch's fp32 ``mm`` (MKL) runs at about
half the rate of oneDNN's fp32 GEMM (BENCHMARKS.md measures both on 4096 x 4096), for the
same IEEE fp32 arithmetic. ``linear`` takes the oneDNN path for fp32 CPU tensors outside
autocast, forward and backward, and is ``F.linear`` everywhere else: GPUs, bf16 autocast
(which reaches oneDNN already), builds without oneDNN and
``torch.backends.mkldnn.flags(enabled=False)``. Weights and names are ``nn.Linear``'s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A matrix oneDNN reads in place: row-major or a transposed row-major one (the backward's
    ``grad.t()``, ``x.t()``). Copying those two to row-major first cost a sixth of the CIFAR
    preset's compiled step, and oneDNN's own handling of the transposed layout is faster."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


@torch.library.custom_op("mae::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) by oneDNN; an opaque op, so torch.compile calls it as is."""
    return torch.ops.mkldnn._linear_pointwise(_plain(x), _plain(weight), bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _save(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    grad_x = _onednn_linear(grad, weight.t(), None) if need_x else None  # [M, N] @ [N, K]
    grad_w = _onednn_linear(grad.t(), x.t(), None) if need_w else None  # [N, M] @ [M, K]
    grad_b = grad.sum(0) if need_b and ctx.has_bias else None
    return grad_x, grad_w, grad_b


_onednn_linear.register_autograd(_backward, setup_context=_save)


ONEDNN_BUILT = torch.backends.mkldnn.is_available()  # read once: torch.compile will not trace the call


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        ONEDNN_BUILT and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
    )  # fmt: skip


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, by oneDNN for fp32 on CPU."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    out = _onednn_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` in ``model`` (timm's included) computes by ``linear`` from now on;
    a change of class only, so parameters, names and state dicts stay as they are."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return model
