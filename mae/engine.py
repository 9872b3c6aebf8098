"""The training loop every stage shares.

A stage hands over its model and optimiser (unprepared), a loader and a ``Task``
(how to get a loss from a batch, how to evaluate, what to export at the end). The loop
owns the step: gradient accumulation, the lr schedule, clipping, the non-finite-loss
guard, logging, checkpoints, resume and graceful stops on SIGTERM/SIGUSR1.
Accelerate owns devices, precision and distribution.

Between log steps the loop never waits on the device: losses add up on it, the guard
cancels a bad step there, and the loader promises every rank the same batch count.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from tqdm import tqdm

from .checkpoint import load_model_weights, load_training_state, resolve_resume, save_checkpoint
from .config import ConfigError
from .data.pipeline import DataConfig, DataError
from .data.transforms import to_model_input
from .metrics import MetricsLogger
from .optim import lr_at, scaled_lr
from .precision import PRECISIONS


@dataclass
class RunConfig:
    """Settings of the loop, common to every stage; a stage's config extends it."""

    output_dir: str = "runs/pretrain"
    epochs: int = 4
    # Either bound ends the run and the lr schedule is planned over it: max_steps optimiser
    # steps (then epochs no longer counts), or max_minutes of wall clock from the loop's start,
    # whichever of the planned steps and epochs comes first (see ``Trainer._plan``).
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 64  # per process
    accum_iter: int = 1  # micro-batches per optimiser step
    blr: float = 1.5e-4  # base lr: lr = blr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    # None: the stage's default warm-up (DEFAULT_WARMUP epochs at its default epochs), shortened in
    # the same proportion when epochs is set lower, so a short run still fits its warm-up.
    warmup_epochs: float | None = None
    DEFAULT_WARMUP: ClassVar[float] = 1.0
    clip_grad: float | None = None  # max gradient norm; None for no clipping
    seed: int = 0
    resume: str = ""  # "", "auto" (latest in output_dir) or a checkpoint folder
    mixed_precision: str = "auto"  # "auto" (bf16 where the hardware runs it natively, else fp32), "no", "bf16", "fp16"
    compile: bool = False  # torch.compile the model (in place: weights keep their names)
    # CPU runs: torch threads per process. 0 shares this node's cores among its processes;
    # `accelerate launch` alone would pin one thread (OMP_NUM_THREADS=1) and halve a 2-core run.
    cpu_threads: int = 0
    log_every: int = 10  # optimiser steps between metrics lines
    # Accelerate's trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, clearml,
    # dvclive...; "all" (every one installed) or "none". metrics.jsonl is written either way.
    report_to: str = "tensorboard"
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
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(map(repr, PRECISIONS))}, got {self.mixed_precision!r}")
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError("blr and lr must be positive")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} is outside [0, epochs={self.epochs}]: set "
                             f"warmup_epochs to at most {self.epochs}, or leave it unset for a warm-up that fits")  # fmt: skip
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 or null, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be positive or null, got {self.max_minutes}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive or null, got {self.clip_grad}")

    def warmup(self) -> float:
        """Epochs of warm-up: ``warmup_epochs``, or the stage's default scaled down to ``epochs``."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        default_epochs = next(f.default for f in fields(self) if f.name == "epochs")
        return self.DEFAULT_WARMUP * min(1.0, self.epochs / default_epochs)


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


class NonFiniteGuard:
    """Keeps a non-finite loss out of the weights without asking the host every micro-batch.

    Each micro-batch adds "was the loss finite?" to a counter on the device. Where the
    optimiser can cancel its own step from a device tensor (torch's fused AdamW reads
    ``found_inf``, as ``GradScaler`` uses it), a step whose loss was not finite on any rank
    is cancelled on the device and the counter is read at the next log step, which
    stops the run: the weights are those of the last good step, and no checkpoint is
    written after it (``Trainer._save`` checks first). The price: up to ``log_every``
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
        if self.acc.num_processes > 1:  # a device collective: no host wait on GPUs
            found = self.acc.reduce(found, reduction="sum").clamp_(max=1.0)
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


def effective_batch(cfg: RunConfig, num_processes: int) -> int:
    return cfg.batch_size * num_processes * cfg.accum_iter


def base_lr(cfg: RunConfig, num_processes: int) -> float:
    """The one place the learning rate is derived."""
    return cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective_batch(cfg, num_processes))


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
        if cfg.compile:
            # In place, so state dicts keep their names (no ``_orig_mod.``). Static shapes: a
            # partial batch gets a graph of its own, and the full batches' graph is the same
            # whatever came before, so a resumed run computes exactly what the first run did.
            model.compile(dynamic=False)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.guard = NonFiniteGuard(accelerator, self.optimizer, self.output_dir / "checkpoints")
        self.world = accelerator.num_processes
        micro = loader.batches_per_epoch(0)
        if cfg.accum_iter > micro:
            raise ConfigError(
                f"accum_iter={cfg.accum_iter} is larger than the {micro} batches of an epoch "
                f"(batch_size={cfg.batch_size} x {self.world} process(es)): no optimiser step would ever run"
            )
        self.steps_per_epoch = micro // cfg.accum_iter
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.clock = Clock(cfg.max_minutes)
        self.warmup_steps = round(cfg.warmup() * self.steps_per_epoch)
        self.base_lr = base_lr(cfg, self.world)

    # -- collectives that keep ranks in step

    def _all(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.acc.device)
        return self.acc.reduce(t, reduction="sum").item() == 0

    def _any(self, flag: bool) -> bool:
        return not self._all(not flag)

    def _sum(self, values: torch.Tensor) -> list[float]:
        if self.world > 1:
            values = self.acc.reduce(values, reduction="sum")
        return values.tolist()

    # -- the loop

    def fit(self) -> FitResult:
        cfg, acc = self.cfg, self.acc
        start_step, start_epoch, skip_steps = 0, 0, 0
        resume_from = self.resume_from
        if resume_from is not None:
            state = load_training_state(acc, resume_from, self.optimizer)
            start_step, start_epoch, skip_steps = state["step"], state["epoch"], state["step_in_epoch"]
            self.clock.restore(state, max_steps=self.total_steps)
            if self.clock.planned:
                self.total_steps = state["total_steps"]
            acc.print(f"resumed from {resume_from} at epoch {start_epoch}, step {start_step}")
        metrics = MetricsLogger(acc, cfg, resume_step=start_step if resume_from is not None else None)
        acc.print(
            f"lr {self.base_lr:.3e} = blr {cfg.blr:g} x effective batch {effective_batch(cfg, self.world)} / 256 "
            f"(batch_size {cfg.batch_size} x {self.world} process(es) x accum_iter {cfg.accum_iter})"
            if cfg.lr is None else f"lr {self.base_lr:.3e} (set directly)"
        )  # fmt: skip
        acc.print(f"{self.steps_per_epoch} optimiser steps per epoch, {self.total_steps} in all, "
                  f"{self.warmup_steps} of warm-up")  # fmt: skip
        if self.clock.seconds is not None and not self.clock.planned:
            acc.print(f"max_minutes={cfg.max_minutes:g}: the step count is planned from the time of the steps after "
                      f"the first {Clock.WARM}: at least {Clock.TIMED} steps and 5% of the budget, at most 10%")  # fmt: skip
        unseen = self.loader.unseen_per_epoch(0)
        if unseen:
            acc.print(f"warning: shards split unevenly across {self.world} ranks; about {unseen} samples "
                      "per epoch go unread (use a shard count divisible by processes x workers)")  # fmt: skip

        step, epoch, result = start_step, start_epoch, FitResult(start_step, start_epoch)
        self.clock.start(first_step=start_step)
        with StopSignal() as stop:
            while (step < self.total_steps and (cfg.max_steps or epoch < cfg.epochs)
                   and not self._any(self.clock.spent())):  # fmt: skip
                first = step
                done_before = skip_steps if epoch == start_epoch else 0
                step, ended, last = self._train_epoch(epoch, step, done_before, metrics, stop)
                result.last_metrics.update(last)
                if last.get("skipped") or last.get("converted"):
                    acc.print(f"epoch {epoch} data: {data_counts(last)}")
                in_epoch = done_before + step - first  # optimiser steps of this epoch done
                if ended == "signal":  # mid-epoch: the resumed run's loader skips this epoch's first steps
                    self._save(step, epoch, in_epoch)
                    acc.print(f"stopped by signal {stop.received}: checkpoint at step {step}; resume=auto continues")
                    metrics.close()
                    return FitResult(step, epoch, True, result.last_metrics)
                if ended == "time":
                    acc.print(f"max_minutes={cfg.max_minutes:g} spent at step {step} of the {self.total_steps} planned")
                last_epoch = step >= self.total_steps or ended == "time" or (not cfg.max_steps and epoch + 1 >= cfg.epochs)
                if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                    evaluation = self.task.evaluate(self.model, epoch)
                    if evaluation:
                        metrics.log(step, epoch=epoch, **evaluation)
                        result.last_metrics.update(evaluation)
                        acc.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
                whole = ended is None  # not cut by max_steps or max_minutes
                if (epoch + 1) % cfg.save_every == 0 or last_epoch:  # a cut epoch resumes where it was cut
                    self._save(step, epoch + 1 if whole else epoch, 0 if whole else in_epoch)
                epoch += 1
        weights = acc.get_state_dict(self.model)  # collective: complete even when ZeRO-3 shards it
        if acc.is_main_process:
            self.task.finish(acc.unwrap_model(self.model), self.output_dir, weights)
        acc.wait_for_everyone()
        metrics.close()
        return FitResult(step, epoch, False, result.last_metrics)

    def _train_epoch(
        self, epoch: int, step: int, skip_steps: int, metrics: MetricsLogger, stop: StopSignal
    ) -> tuple[int, str | None, dict[str, Any]]:
        """Returns the step reached, why the epoch ended early ("signal", "time", "steps": the
        planned total came first; None: it did not) and the last metrics line."""
        cfg, acc, accum = self.cfg, self.acc, self.cfg.accum_iter
        self.model.train()
        self.loader.set_epoch(epoch, skip_batches=skip_steps * accum)  # resumed: those are not decoded again
        # An epoch cut short mid-accumulation must not leak gradients or shift the boundaries.
        self.optimizer.zero_grad(set_to_none=True)
        acc.step = 0
        # Only whole optimiser steps: leftover micro-batches would leak gradient into the next epoch.
        whole = min(self.loader.batches_per_epoch(epoch) // accum, self.steps_per_epoch)
        budget = min(whole, skip_steps + self.total_steps - step) * accum
        skip = skip_steps * accum
        bar = tqdm(total=budget, initial=skip, desc=f"epoch {epoch}", disable=not (acc.is_main_process and cfg.progress),
                   mininterval=1.0, dynamic_ncols=True)  # fmt: skip
        window = LogWindow(acc.device)
        counts_by_worker: dict[int, dict[str, dict[str, int]]] = {}
        last: dict[str, Any] = {}
        for micro, batch in self._micro_batches(epoch, budget, skip, counts_by_worker):
            with acc.accumulate(self.model):
                loss = self._forward(batch, window)
                if acc.sync_gradients:  # before backward: under DeepSpeed it takes the optimiser step
                    lr = self._before_step(epoch, step)
                acc.backward(loss)
                if acc.sync_gradients:
                    self._optimizer_step(step)
            bar.update(1)
            if not acc.sync_gradients:
                continue
            # -- once per optimiser step
            step += 1
            if self.clock.seconds is not None and not self.clock.planned:
                self._plan(step, window)  # may shorten the run to fewer steps than this epoch holds
            planned_end = step >= self.total_steps
            logged = step % cfg.log_every == 0 or micro + 1 == budget or planned_end
            if logged:  # the only host reads of the loop: the loss window and the guard
                self.guard.check(epoch, step)
                last = self._log(metrics, step, epoch, lr, window, counts_by_worker)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            # ranks agree on a stop at log steps; alone, every step is free to look
            if (logged or self.world == 1) and self._any(stop.received is not None):
                bar.close()
                return step, "signal", last
            if self.clock.seconds is not None and (logged or self.world == 1) and self._any(self.clock.spent()):
                if not logged:
                    last = self._log(metrics, step, epoch, lr, window, counts_by_worker)
                bar.close()
                return step, "time", last
            if planned_end:  # the same step on every rank
                bar.close()
                return step, ("steps" if micro + 1 < whole * accum else None), last
        bar.close()
        return step, None, last  # a budget cut short by the planned total ends at ``planned_end`` above

    def _plan(self, step: int, window: "LogWindow") -> None:
        """max_minutes: time this process's steps after the first WARM (compilation, caches) until
        TIMED steps and a twentieth of the budget, or a tenth, have passed; then fix the step count that fits in
        the rest of the budget at the slowest rank's pace and plan the lr over it. Fixed once
        and saved in checkpoints, so a resumed run follows the same schedule."""
        clock = self.clock
        if step - clock.first_step < Clock.WARM:
            return
        if step - clock.first_step == Clock.WARM:
            window.loss.item()  # a host read: whatever the device still had queued is done
            clock.mark, clock.mark_step = time.perf_counter(), step
            return
        if self.world > 1 and step % self.cfg.log_every:  # ranks decide together, at log steps only
            return
        timed = step - clock.mark_step
        seconds = time.perf_counter() - clock.mark
        # long enough for the loader's prefetched batches to run out: a loader-bound run is
        # fast only while they last, and a plan from that pace would outrun the budget
        enough = seconds >= clock.seconds / 10 or (timed >= Clock.TIMED and seconds >= clock.seconds / 20)
        if self.world > 1:  # every rank plans at the same step
            enough = self._any(enough)
        if not enough:
            return
        window.loss.item()
        pace = torch.tensor([(time.perf_counter() - clock.mark) / timed], device=self.acc.device)
        if self.world > 1:
            pace = self.acc.reduce(pace, reduction="max")
        per_step = max(float(pace.item()), 1e-9)
        fits = step + int(max(0.0, clock.seconds - clock.elapsed()) / per_step)
        previous, self.total_steps = self.total_steps, max(step, min(self.total_steps, fits))
        clock.planned = True
        self.acc.print(f"max_minutes={self.cfg.max_minutes:g}: {per_step:.3f} s per step over steps {clock.mark_step + 1}-"
                       f"{step} -> {self.total_steps} optimiser steps planned ({self.total_steps / self.steps_per_epoch:.1f} "
                       "epochs" + (", capped by epochs/max_steps" if self.total_steps == previous else "") + ")",
                       flush=True)  # fmt: skip

    # -- per micro-batch

    def _micro_batches(self, epoch: int, budget: int, skip: int,
                       counts_by_worker: dict[int, dict[str, dict[str, int]]]) -> Iterator[tuple[int, dict[str, Any]]]:  # fmt: skip
        """Micro-batches ``skip`` to ``budget`` of the epoch, on the device. The loader gives every
        rank the planned number (``ShardLoader`` refills what corrupt samples took), so ranks
        never ask each other whether someone ran out."""
        it = iter(self.loader)  # told by set_epoch to start at ``skip``, without decoding what it skips
        for micro in range(skip, budget):
            batch = next(it, None)
            if batch is None:
                raise DataError(f"epoch {epoch}: the loader ended after {micro} of the {budget} batches it planned; "
                                "ranks would fall out of step")  # fmt: skip
            counts_by_worker[batch["worker"]] = {"skipped": batch["skipped"], "converted": batch["converted"]}
            yield micro, self._to_device(batch)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.acc.device
        return dict(batch, image=to_model_input(batch["image"], device),
                    label=batch["label"].to(device, non_blocking=True))  # fmt: skip

    def _forward(self, batch: dict[str, Any], window: "LogWindow") -> torch.Tensor:
        with self.acc.autocast():
            loss = self.task.train_step(self.model, batch)
        self.guard.note(loss)
        window.add(loss, batch["image"].shape[0])
        return loss

    # -- per optimiser step

    def _before_step(self, epoch: int, step: int) -> float:
        """The non-finite guard and this step's learning rate; returns the rate."""
        self.guard.before_step(epoch, step)
        lr = lr_at(step, base_lr=self.base_lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                   min_lr=self.cfg.min_lr)  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _optimizer_step(self, step: int) -> None:
        if self.cfg.clip_grad is not None:
            self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)  # DeepSpeed clips by its config
        self.optimizer.step()
        self.guard.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_step(self.model, step + 1)

    def _log(self, metrics: MetricsLogger, step: int, epoch: int, lr: float, window: "LogWindow",
             counts_by_worker: dict[int, dict[str, dict[str, int]]]) -> dict[str, Any]:  # fmt: skip
        totals: dict[str, dict[str, int]] = {"skipped": {}, "converted": {}}
        for counts in self._gather(counts_by_worker):
            for kind, by_key in counts.items():
                for key, n in by_key.items():
                    totals[kind][key] = totals[kind].get(key, 0) + n
        skipped, converted = totals["skipped"], totals["converted"]
        loss_sum, n, images = self._sum(window.totals())
        elapsed = time.perf_counter() - window.start
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(1, n),
            "lr": lr,
            "images_per_sec": images / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": round(self.clock.elapsed(), 3),  # the loop's wall clock, carried across resumes
            "skipped": sum(skipped.values()),  # dropped
            "converted": sum(converted.values()),  # kept, converted to RGB
        }
        if skipped:
            record["skipped_by_reason"] = dict(sorted(skipped.items()))
        if converted:
            record["converted_by_mode"] = dict(sorted(converted.items()))
        metrics.log(step, **record)
        window.reset()
        return record

    def _gather(self, by_worker: dict[int, dict[str, dict[str, int]]]) -> list[dict[str, dict[str, int]]]:
        """Every rank's per-worker counts (reasons differ across ranks, so objects, not tensors)."""
        if self.world == 1:
            return list(by_worker.values())
        from accelerate.utils import gather_object

        return [counts for rank_counts in gather_object([list(by_worker.values())]) for counts in rank_counts]

    def _save(self, step: int, epoch: int, step_in_epoch: int) -> None:
        self.guard.check(epoch, step)  # never save weights that a cancelled step stands behind
        state = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": _config_dict(self.cfg),
                 "total_steps": self.total_steps, **self.clock.state()}  # fmt: skip
        save_checkpoint(self.acc, self.output_dir, step, model=self.model, optimizer=self.optimizer,
                        state=state, keep_last=self.cfg.keep_last, extra=self.task.extra_state())  # fmt: skip


def data_counts(record: dict[str, Any]) -> str:
    """The epoch's skipped samples (dropped) and converted ones (kept as RGB), in words."""
    def part(total: int, by: dict[str, int]) -> str:
        return f"{total}" + (f" ({', '.join(f'{k} {n}' for k, n in by.items())})" if by else "")

    return (f"skipped {part(record.get('skipped', 0), record.get('skipped_by_reason', {}))}, "
            f"converted to RGB {part(record.get('converted', 0), record.get('converted_by_mode', {}))}")  # fmt: skip


class Clock:
    """The loop's wall clock and, under ``max_minutes``, its budget. Elapsed time and whether the
    step count was planned travel in checkpoints, so a resumed run spends what is left."""

    WARM, TIMED = 10, 40  # steps not timed (compilation, caches), then at least this many timed to plan

    def __init__(self, max_minutes: float | None) -> None:
        self.seconds = None if max_minutes is None else max_minutes * 60.0
        self.planned, self.before, self.first_step = False, 0.0, 0
        self.origin = self.mark = time.perf_counter()
        self.mark_step = 0

    def start(self, first_step: int) -> None:
        self.first_step, self.origin = first_step, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.origin

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def state(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed(), "planned": self.planned}

    def restore(self, state: dict[str, Any], max_steps: int) -> None:
        self.before = float(state.get("elapsed_s", 0.0))
        # a plan made under another bound (or none) is not this run's plan
        self.planned = bool(state.get("planned")) and self.seconds is not None and state["total_steps"] <= max_steps


class LogWindow:
    """Sums since the last log line; the loss stays on the device until the line is written."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss.detach()
        self.micro += 1
        self.images += images

    def totals(self) -> torch.Tensor:
        """[loss sum, micro-batches, images], float64 on the device (one tensor to reduce)."""
        counts = torch.tensor([self.micro, self.images], dtype=torch.float64).to(self.loss.device, non_blocking=True)
        return torch.cat([self.loss.view(1), counts])

    def reset(self) -> None:
        self.loss.zero_()
        self.micro, self.images, self.start = 0, 0, time.perf_counter()


def _config_dict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)
