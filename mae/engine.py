"""The training loop every stage shares.

A stage hands over its model and optimiser (unprepared), a loader and a ``Task``
(how to get a loss from a batch, how to evaluate, what to export at the end). The loop
owns the step: gradient accumulation, the lr schedule, clipping, the non-finite-loss
guard, logging, checkpoints, resume and graceful stops on SIGTERM/SIGUSR1.
Accelerate owns devices, precision and distribution.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from tqdm import tqdm

from .checkpoint import load_model_weights, load_training_state, resolve_resume, save_checkpoint
from .config import ConfigError
from .data.pipeline import DataConfig
from .data.transforms import to_model_input
from .metrics import MetricsLogger
from .optim import lr_at, scaled_lr


@dataclass
class RunConfig:
    """Settings of the loop, common to every stage; a stage's config extends it."""

    output_dir: str = "runs/pretrain"
    epochs: int = 4
    batch_size: int = 64  # per process
    accum_iter: int = 1  # micro-batches per optimiser step
    blr: float = 1.5e-4  # base lr: lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    clip_grad: float | None = None  # max gradient norm; None for no clipping
    seed: int = 0
    resume: str = ""  # "", "auto" (latest in output_dir) or a checkpoint folder
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    # CPU runs: torch threads per process. 0 shares this node's cores among its processes;
    # `accelerate launch` alone would pin one thread (OMP_NUM_THREADS=1) and halve a 2-core run.
    cpu_threads: int = 0
    log_every: int = 10  # optimiser steps between metrics lines
    eval_every: int = 1  # epochs between evaluations (and reconstruction pictures)
    save_every: int = 1  # epochs between checkpoints; the last epoch is always saved
    keep_last: int = 2  # checkpoints kept
    progress: bool = True  # progress bar on the main process
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "accum_iter", "log_every", "eval_every", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0 (0: cores / processes on the node), got {self.cpu_threads}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("blr and lr must be positive")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive or null, got {self.clip_grad}")


class Loader(Protocol):
    """What the loop reads batches from (``ShardLoader``, or cached features)."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...

    def batches_per_epoch(self, epoch: int) -> int: ...

    def unseen_per_epoch(self, epoch: int) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class Task:
    """What a stage supplies to the loop: the loss of a batch, and optional hooks."""

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """After each optimiser step (e.g. an EMA update)."""

    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        """On every rank, every ``eval_every`` epochs; the metrics returned are logged."""
        return {}

    def extra_state(self) -> dict[str, torch.nn.Module]:
        """Modules besides the model that checkpoints must carry (e.g. EMA weights)."""
        return {}

    def finish(self, model: torch.nn.Module, output_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """On the main process after the last epoch (e.g. export weights). ``state_dict`` is
        the model's complete weights (the module's own may be sharded under ZeRO-3)."""


class NonFiniteLoss(RuntimeError):
    pass


def effective_batch(cfg: RunConfig, num_processes: int) -> int:
    return cfg.batch_size * num_processes * cfg.accum_iter


def base_lr(cfg: RunConfig, num_processes: int) -> float:
    """The one place the learning rate is derived."""
    return cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective_batch(cfg, num_processes))


class StopSignal:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the next optimiser step and returns."""

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


@dataclass
class FitResult:
    step: int
    epoch: int
    stopped_by_signal: bool = False
    last_metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Takes the model and optimiser unprepared: resumed weights go in first, then
    ``accelerator.prepare`` (which shards them under DeepSpeed), then the optimiser state."""

    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Loader,
        task: Task,
    ) -> None:
        self.cfg, self.acc, self.loader, self.task = cfg, accelerator, loader, task
        self.output_dir = Path(cfg.output_dir)
        self.resume_from = resolve_resume(cfg.resume, self.output_dir)
        if self.resume_from is not None:
            load_model_weights(self.resume_from, model, task.extra_state())
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.world = accelerator.num_processes
        micro = loader.batches_per_epoch(0)
        if cfg.accum_iter > micro:
            raise ConfigError(
                f"accum_iter={cfg.accum_iter} is larger than the {micro} batches of an epoch "
                f"(batch_size={cfg.batch_size} x {self.world} process(es)): no optimiser step would ever run"
            )
        self.steps_per_epoch = micro // cfg.accum_iter
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.base_lr = base_lr(cfg, self.world)

    # -- collectives that keep ranks in step

    def _all(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").item() == 0

    def _any(self, flag: bool) -> bool:
        return not self._all(not flag)

    def _sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        return self.acc.reduce(torch.tensor(values, device=self.acc.device, dtype=torch.float64), reduction="sum").tolist()

    # -- the loop

    def fit(self) -> FitResult:
        cfg, acc = self.cfg, self.acc
        start_step, start_epoch, skip_steps = 0, 0, 0
        resume_from = self.resume_from
        if resume_from is not None:
            state = load_training_state(acc, resume_from, self.optimizer)
            start_step, start_epoch, skip_steps = state["step"], state["epoch"], state["step_in_epoch"]
            acc.print(f"resumed from {resume_from} at epoch {start_epoch}, step {start_step}")
        metrics = MetricsLogger(self.output_dir, enabled=acc.is_main_process,
                                resume_step=start_step if resume_from is not None else None)  # fmt: skip
        acc.print(
            f"lr {self.base_lr:.3e} = blr {cfg.blr:g} x effective batch {effective_batch(cfg, self.world)} / 256 "
            f"(batch_size {cfg.batch_size} x {self.world} process(es) x accum_iter {cfg.accum_iter})"
            if cfg.lr is None else f"lr {self.base_lr:.3e} (set directly)"
        )  # fmt: skip
        acc.print(f"{self.steps_per_epoch} optimiser steps per epoch, {self.total_steps} in all, "
                  f"{self.warmup_steps} of warm-up")  # fmt: skip
        unseen = self.loader.unseen_per_epoch(0)
        if unseen:
            acc.print(f"warning: shards split unevenly across {self.world} ranks; about {unseen} samples "
                      "per epoch go unread (use a shard count divisible by processes x workers)")  # fmt: skip

        step, epoch, result = start_step, start_epoch, FitResult(start_step, start_epoch)
        with StopSignal() as stop:
            for epoch in range(start_epoch, cfg.epochs):
                first = step
                step, stopped, last = self._train_epoch(epoch, step, skip_steps if epoch == start_epoch else 0,
                                                        metrics, stop)  # fmt: skip
                result.last_metrics.update(last)
                if stopped:  # mid-epoch: the resumed run's loader skips this epoch's first steps
                    done_before = skip_steps if epoch == start_epoch else 0
                    self._save(step, epoch, done_before + step - first)
                    acc.print(f"stopped by signal {stop.received}: checkpoint at step {step}; resume=auto continues")
                    metrics.close()
                    return FitResult(step, epoch, True, result.last_metrics)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    evaluation = self.task.evaluate(self.model, epoch)
                    if evaluation:
                        metrics.log(step, epoch=epoch, **evaluation)
                        result.last_metrics.update(evaluation)
                        acc.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
                if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
                    self._save(step, epoch + 1, 0)
        weights = acc.get_state_dict(self.model)  # collective: complete even when ZeRO-3 shards it
        if acc.is_main_process:
            self.task.finish(acc.unwrap_model(self.model), self.output_dir, weights)
        acc.wait_for_everyone()
        metrics.close()
        return FitResult(step, cfg.epochs, False, result.last_metrics)

    def _train_epoch(
        self, epoch: int, step: int, skip_steps: int, metrics: MetricsLogger, stop: StopSignal
    ) -> tuple[int, bool, dict[str, Any]]:
        cfg, acc, accum = self.cfg, self.acc, self.cfg.accum_iter
        self.model.train()
        self.loader.set_epoch(epoch, skip_batches=skip_steps * accum)  # resumed: those are not decoded again
        # An epoch cut short mid-accumulation must not leak gradients or shift the boundaries.
        self.optimizer.zero_grad(set_to_none=True)
        acc.step = 0
        # Only whole optimiser steps: leftover micro-batches would leak gradient into the next epoch.
        budget = min(self.loader.batches_per_epoch(epoch) // accum, self.steps_per_epoch) * accum
        skip = skip_steps * accum
        bar = tqdm(total=budget, initial=skip, desc=f"epoch {epoch}", disable=not (acc.is_main_process and cfg.progress),
                   mininterval=1.0, dynamic_ncols=True)  # fmt: skip
        window = {"loss": 0.0, "n": 0, "images": 0, "t": time.perf_counter()}
        skipped_by_worker: dict[int, dict[str, int]] = {}
        last: dict[str, Any] = {}
        it = iter(self.loader)
        for micro in range(skip, budget):
            batch = next(it, None)
            if not self._all(batch is not None):
                acc.print(f"epoch {epoch} ended early at micro-batch {micro} of {budget}: a rank ran out of data")
                break
            skipped_by_worker[batch["worker"]] = batch["skipped"]
            images = to_model_input(batch["image"], acc.device)
            batch = dict(batch, image=images, label=batch["label"].to(acc.device, non_blocking=True))
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = self.task.train_step(self.model, batch)
                finite = bool(torch.isfinite(loss.detach()).item())
                window["all_finite"] = window.get("all_finite", True) and finite
                if acc.sync_gradients:
                    # Checked before backward: under DeepSpeed the backward of the last
                    # micro-batch also takes the optimiser step.
                    if not self._all(window.pop("all_finite")):
                        raise NonFiniteLoss(
                            f"loss is not finite at epoch {epoch}, step {step}; stopping before the optimiser "
                            f"step, no checkpoint written. Last good checkpoint: {self.output_dir / 'checkpoints'}. "
                            "Try a lower blr, clip_grad, or mixed_precision=no."
                        )
                    lr = lr_at(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps,
                               total_steps=self.total_steps, min_lr=cfg.min_lr)  # fmt: skip
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                acc.backward(loss)
                if acc.sync_gradients and cfg.clip_grad is not None:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)  # DeepSpeed clips by its config
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    self.task.after_step(self.model, step + 1)
            window["loss"] += loss.item() if finite else math.nan
            window["n"] += 1
            window["images"] += images.shape[0]
            bar.update(1)
            if not acc.sync_gradients:
                continue
            step += 1
            if step % cfg.log_every == 0 or micro + 1 == budget:
                last = self._log(metrics, step, epoch, lr, window, skipped_by_worker)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            if self._any(stop.received is not None):
                bar.close()
                return step, True, last
        bar.close()
        return step, False, last

    def _log(self, metrics: MetricsLogger, step: int, epoch: int, lr: float, window: dict,
             skipped_by_worker: dict[int, dict[str, int]]) -> dict[str, Any]:  # fmt: skip
        skipped: dict[str, int] = {}
        for counts in self._gather(skipped_by_worker):
            for reason, n in counts.items():
                skipped[reason] = skipped.get(reason, 0) + n
        loss_sum, n, images = self._sum([window["loss"], window["n"], window["images"]])
        elapsed = time.perf_counter() - window["t"]
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(1, n),
            "lr": lr,
            "images_per_sec": images / elapsed if elapsed > 0 else 0.0,
            "skipped": sum(skipped.values()),
        }
        if skipped:
            record["skipped_by_reason"] = dict(sorted(skipped.items()))
        metrics.log(step, **record)
        window.update(loss=0.0, n=0, images=0, t=time.perf_counter())
        return record

    def _gather(self, by_worker: dict[int, dict[str, int]]) -> list[dict[str, int]]:
        """Every rank's per-worker skip counts (reasons differ across ranks, so objects, not tensors)."""
        if self.world == 1:
            return list(by_worker.values())
        from accelerate.utils import gather_object

        return [counts for rank_counts in gather_object([list(by_worker.values())]) for counts in rank_counts]

    def _save(self, step: int, epoch: int, step_in_epoch: int) -> None:
        state = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": _config_dict(self.cfg)}
        save_checkpoint(self.acc, self.output_dir, step, model=self.model, optimizer=self.optimizer,
                        state=state, keep_last=self.cfg.keep_last, extra=self.task.extra_state())  # fmt: skip


def _config_dict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)
