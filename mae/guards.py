"""What stops a run safely: a loss that is not finite, and a stop signal from the scheduler.

Both act at an optimiser step, never in the middle of one, so what the run saves afterwards
is a state it really reached.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch

from .collectives import sum_ranks


class NonFiniteLoss(RuntimeError):
    pass


class NonFiniteGuard:
    """Keeps a non-finite loss out of the weights without asking the host every micro-batch.

    Each micro-batch adds "was the loss finite?" to a counter on the device. Where the
    optimiser can cancel its own step from a device tensor (torch's fused AdamW reads
    ``found_inf``, as ``GradScaler`` uses it), a step whose loss was not finite on any rank
    is cancelled on the device and the counter is read at the next log step, which
    stops the run: the weights are those of the last good step, and no checkpoint is
    written after it (the loop's save checks first). The price: up to ``log_every``
    cancelled steps run before the stop. Other optimisers (LARS, DeepSpeed's, fp16 with
    its scaler) are checked on the host once per optimiser step, before it.
    """

    def __init__(self, accelerator: Any, optimizer: torch.optim.Optimizer, checkpoints: Path) -> None:
        from accelerate.utils import DistributedType

        self.acc, self.checkpoints = accelerator, checkpoints
        self.base = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
        self.on_device = (
            isinstance(self.base, torch.optim.Optimizer) and getattr(self.base, "_step_supports_amp_scaling", False)
            and accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
        )  # fmt: skip
        self.bad = torch.zeros((), device=accelerator.device)  # non-finite losses since the last step
        self.cancelled = torch.zeros((), device=accelerator.device)  # steps cancelled since the last check

    def note(self, loss: torch.Tensor) -> None:
        self.bad += torch.isfinite(loss.detach()).logical_not()

    def before_step(self, epoch: int, step: int) -> None:
        """Before the backward of the step's last micro-batch (DeepSpeed steps inside it)."""
        found = (self.bad > 0).float()
        self.bad.zero_()
        found = sum_ranks(self.acc, found).clamp_(max=1.0)  # a device collective: no host wait on GPUs
        if not self.on_device:
            if found.item():
                raise self._error(f"at epoch {epoch}, step {step}; stopping before the optimiser step")
            return
        self.base.grad_scale, self.base.found_inf = None, found
        self.cancelled += found

    def after_step(self) -> None:
        if self.on_device:
            del self.base.grad_scale, self.base.found_inf

    def check(self, epoch: int, step: int) -> None:
        """On every rank at once (a log step, before a save): raise if a step was cancelled."""
        if self.on_device and self.cancelled.item():
            raise self._error(f"in {int(self.cancelled.item())} optimiser step(s) of epoch {epoch} up to step {step}; "
                              "they were cancelled (weights unchanged) and the run stops")  # fmt: skip

    def _error(self, where: str) -> NonFiniteLoss:
        return NonFiniteLoss(f"loss is not finite {where}, no checkpoint written. Last good checkpoint: "
                             f"{self.checkpoints}. Try a lower blr, clip_grad, or mixed_precision=no.")  # fmt: skip


class StopSignal:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the next optimiser step (the next
    log step when several ranks must agree on it) and returns."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
