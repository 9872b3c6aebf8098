"""The training loop every stage shares.

A stage hands over its model and optimiser (unprepared), a loader and a ``Task`` (how to get
a loss from a batch, how to evaluate, what to export at the end). ``Trainer.fit`` runs the
epochs; ``Trainer.train_one_epoch`` is one epoch, each optimiser step read top to bottom:
forward, the non-finite guard, the step's lr, backward, clip, step, then logging and the
reasons to stop. How many steps and at what rate is ``StepPlan``'s business
(``mae/step_plan.py``), questions ranks answer together are ``mae/collectives.py``'s, and
the guards that stop a run safely are ``mae/guards.py``'s. Accelerate owns devices,
precision and distribution.

Between log steps the loop never waits on the device: losses add up on it, the guard
cancels a bad step there, and the loader promises every rank the same batch count.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from tqdm import tqdm

from .checkpoint import load_model_weights, load_plain, load_training_state, resolve_resume, save_checkpoint
from .collectives import any_rank, gather_objects, max_ranks, sum_ranks
from .config import ConfigError
from .data.loader import DataConfig
from .data.plan import Position
from .data.shards import DataError
from .data.transforms import to_model_input
from .guards import NonFiniteGuard, StopSignal
from .metrics import MetricsLogger, describe_data_counts
from .optim import scaled_lr
from .precision import PRECISIONS
from .step_plan import StepPlan
from .summary import write_summary


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
    """What the loop reads batches from (``ShardLoader``): dicts of ``image`` and ``label``."""

    def set_epoch(self, epoch: int, position: Position | None = None) -> None: ...

    def batches_per_epoch(self, epoch: int) -> int: ...

    def unseen_per_epoch(self, epoch: int) -> int: ...

    def data_counts(self) -> dict[str, dict[str, int]]: ...

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

    def monitor(self, model: torch.nn.Module, epoch: int, elapsed_s: float, last: bool) -> dict[str, float]:
        """On every rank at every epoch end, after ``evaluate``: a task's own watch of the run
        (e.g. a k-NN of the features), which decides alike on every rank whether it is due.
        ``last``: the run's last epoch. The metrics returned are logged."""
        return {}

    def extra_state(self) -> dict[str, torch.nn.Module]:
        """Modules besides the model that checkpoints must carry (e.g. EMA weights)."""
        return {}

    def finish(self, model: torch.nn.Module, output_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """On the main process after the last epoch (e.g. export weights). ``state_dict`` is
        the model's complete weights (the module's own may be sharded under ZeRO-3)."""


def effective_batch(cfg: RunConfig, num_processes: int) -> int:
    return cfg.batch_size * num_processes * cfg.accum_iter


def base_lr(cfg: RunConfig, num_processes: int) -> float:
    """The one place the learning rate is derived."""
    return cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective_batch(cfg, num_processes))


@dataclass
class FitResult:
    step: int
    epoch: int
    stopped_by_signal: bool = False
    last_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochEnd:
    """How an epoch of ``train_one_epoch`` ended."""

    steps: int  # optimiser steps of the epoch done, counted from its start (resumed ones included)
    whole: bool  # every step of the epoch ran
    stop: str | None = None  # "signal" or "time" when the run must stop now
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics line


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
        self.world = accelerator.num_processes
        self.resume_from = resolve_resume(cfg.resume, self.output_dir)
        self.saved: dict[str, Any] | None = None  # the resumed checkpoint's state
        if self.resume_from is not None:
            self.saved = load_plain(self.resume_from / "state.pt")
            self._keep_effective_batch(self.saved)
            load_model_weights(self.resume_from, model, task.extra_state())
        if cfg.compile:
            # In place, so state dicts keep their names (no ``_orig_mod.``). Static shapes: a
            # partial batch gets a graph of its own, and the full batches' graph is the same
            # whatever came before, so a resumed run computes exactly what the first run did.
            model.compile(dynamic=False)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.guard = NonFiniteGuard(accelerator, self.optimizer, self.output_dir / "checkpoints")
        micro = loader.batches_per_epoch(0)
        if cfg.accum_iter > micro:
            raise ConfigError(
                f"accum_iter={cfg.accum_iter} is larger than the {micro} batches of an epoch "
                f"(batch_size={cfg.batch_size} x {self.world} process(es)): no optimiser step would ever run"
            )
        steps_per_epoch = micro // cfg.accum_iter
        self.plan = StepPlan(steps_per_epoch=steps_per_epoch, cap=cfg.max_steps or steps_per_epoch * cfg.epochs,
                             warmup_steps=round(cfg.warmup() * steps_per_epoch),
                             base_lr=base_lr(cfg, self.world), min_lr=cfg.min_lr, max_minutes=cfg.max_minutes)  # fmt: skip
        self.step = 0

    def _keep_effective_batch(self, saved: dict[str, Any]) -> None:
        """A run resumed on another number of processes keeps its effective batch (and so its
        schedule) through ``accum_iter``; when no whole ``accum_iter`` keeps it, it stops here."""
        cfg, was = self.cfg, saved.get("run")
        if was is None:  # saved before checkpoints recorded it: the same launch is assumed
            return
        target, per_step = was["effective_batch"], cfg.batch_size * self.world
        if target == per_step * cfg.accum_iter:
            return
        from accelerate.utils import DistributedType

        where = (f"resume={cfg.resume}: the checkpoint was saved by {was['world']} process(es) x batch_size "
                 f"{was['batch_size']} x accum_iter {was['accum_iter']} (effective batch {target})")  # fmt: skip
        if self.acc.distributed_type == DistributedType.DEEPSPEED and was["world"] != self.world:
            raise ConfigError(f"{where}; a DeepSpeed ZeRO checkpoint resumes only on {was['world']} process(es)")
        if target % per_step:
            works = [f"batch_size={target // (self.world * a)} accum_iter={a}" for a in range(1, 65)
                     if target % (self.world * a) == 0][:3]  # fmt: skip
            raise ConfigError(f"{where}; on {self.world} process(es) batch_size={cfg.batch_size} cannot keep it: "
                              f"set {' or '.join(works) or 'the saved launch'}")  # fmt: skip
        cfg.accum_iter = target // per_step
        self.acc.gradient_accumulation_steps = cfg.accum_iter
        self.acc.print(f"resumed on {self.world} process(es) instead of {was['world']}: accum_iter={cfg.accum_iter} "
                       f"keeps the effective batch of {target} and the lr schedule; the sample order of the rest "
                       "of this epoch differs from an uninterrupted run's, none of its samples is read twice")  # fmt: skip

    # -- the loop

    def fit(self) -> FitResult:
        cfg, acc, plan = self.cfg, self.acc, self.plan
        epoch, position = 0, None
        if self.resume_from is not None:
            state = load_training_state(acc, self.resume_from, self.optimizer, state=self.saved)
            self.step, epoch = state["step"], state["epoch"]
            position = self._position(state)
            plan.restore(state)
            acc.print(f"resumed from {self.resume_from} at epoch {epoch}, step {self.step}")
        metrics = MetricsLogger(acc, cfg, resume_step=self.step if self.resume_from is not None else None)
        acc.print(
            f"lr {plan.base_lr:.3e} = blr {cfg.blr:g} x effective batch {effective_batch(cfg, self.world)} / 256 "
            f"(batch_size {cfg.batch_size} x {self.world} process(es) x accum_iter {cfg.accum_iter})"
            if cfg.lr is None else f"lr {plan.base_lr:.3e} (set directly)"
        )  # fmt: skip
        acc.print(f"{plan.steps_per_epoch} optimiser steps per epoch, {plan.total_steps} in all, "
                  f"{plan.warmup_steps} of warm-up")  # fmt: skip
        if plan.timed and plan.plans == 0:
            acc.print(f"max_minutes={cfg.max_minutes:g}: the step count is planned from the time of the steps after "
                      f"the first {StepPlan.WARM}: at least {StepPlan.TIMED} steps and 5% of the budget, at most 10%; "
                      "planned again at half the budget, and once more with a tenth of it left")  # fmt: skip
        unseen = self.loader.unseen_per_epoch(0)
        if unseen:
            acc.print(f"warning: shards split unevenly across {self.world} ranks; about {unseen} samples "
                      "per epoch go unread (use a shard count divisible by processes x workers)")  # fmt: skip

        last: dict[str, Any] = {}
        plan.start(self.step)
        with StopSignal() as stop:
            while (self.step < plan.total_steps and (cfg.max_steps or epoch < cfg.epochs)
                   and not any_rank(acc, plan.spent())):  # fmt: skip
                end = self.train_one_epoch(epoch, position, metrics, stop)
                position, last = None, {**last, **end.last}
                counts = self._data_counts()
                metrics.log(self.step, epoch=epoch, **counts)
                if counts["skipped"] or counts["converted"]:
                    acc.print(f"epoch {epoch} data: {describe_data_counts(counts)}")
                if end.stop == "signal":  # mid-epoch: the resumed run's loader skips this epoch's first steps
                    self._save(epoch, end.steps)
                    acc.print(f"stopped by signal {stop.received}: checkpoint at step {self.step}; resume=auto continues")
                    metrics.close()
                    return FitResult(self.step, epoch, True, last)
                if end.stop == "time":
                    acc.print(f"max_minutes={cfg.max_minutes:g} spent at step {self.step} of the {plan.total_steps} planned")
                last_epoch = (self.step >= plan.total_steps or end.stop == "time"
                              or (not cfg.max_steps and epoch + 1 >= cfg.epochs))  # fmt: skip
                evaluation = self.task.evaluate(self.model, epoch) if (epoch + 1) % cfg.eval_every == 0 or last_epoch else {}
                evaluation.update(self.task.monitor(self.model, epoch, plan.elapsed(), last_epoch))
                if evaluation:
                    metrics.log(self.step, epoch=epoch, **evaluation)
                    last.update(evaluation)
                    acc.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))
                    if acc.is_main_process:
                        write_summary(self.output_dir)
                if (epoch + 1) % cfg.save_every == 0 or last_epoch:  # a cut epoch resumes where it was cut
                    self._save(epoch + 1, 0) if end.whole else self._save(epoch, end.steps)
                epoch += 1
        weights = acc.get_state_dict(self.model)  # collective: complete even when ZeRO-3 shards it
        if acc.is_main_process:
            self.task.finish(acc.unwrap_model(self.model), self.output_dir, weights)
            write_summary(self.output_dir)
        acc.wait_for_everyone()
        metrics.close()
        return FitResult(self.step, epoch, False, last)

    def train_one_epoch(self, epoch: int, position: Position | None, metrics: MetricsLogger, stop: StopSignal) -> EpochEnd:
        """One epoch, or what is left of it after ``position`` (a resumed run), up to the planned total."""
        cfg, acc, plan, accum = self.cfg, self.acc, self.plan, self.cfg.accum_iter
        done = 0 if position is None else position.batches * position.world * position.batch_size // (
            self.world * cfg.batch_size * accum)  # optimiser steps of this epoch already taken
        self.model.train()
        self.loader.set_epoch(epoch, position)  # resumed: what was read is not decoded again
        # An epoch cut short mid-accumulation must not leak gradients or shift the boundaries.
        self.optimizer.zero_grad(set_to_none=True)
        acc.step = 0
        # Only whole optimiser steps: leftover micro-batches would leak gradient into the next epoch.
        steps = min(self.loader.batches_per_epoch(epoch) // accum, plan.steps_per_epoch)
        bar = tqdm(total=steps * accum, initial=done * accum, desc=f"epoch {epoch}", mininterval=1.0,
                   disable=not (acc.is_main_process and cfg.progress), dynamic_ncols=True)  # fmt: skip
        window, end = LogWindow(acc.device), EpochEnd(done, whole=False)
        batches = self._device_batches(epoch, done * accum, steps * accum)
        for micro, batch in batches:
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss = self.task.train_step(self.model, batch)
                self.guard.note(loss)
                window.add(loss, batch["image"].shape[0])
                if acc.sync_gradients:  # before backward: under DeepSpeed the backward takes the step
                    self.guard.before_step(epoch, self.step)
                    lr = self._set_lr(plan.lr(self.step))
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.clip_grad is not None:  # DeepSpeed clips by its own config
                        acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    self.optimizer.step()
                    self.guard.after_step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.task.after_step(self.model, self.step + 1)
            bar.update(1)
            if not acc.sync_gradients:
                continue
            # -- once per optimiser step
            self.step, end.steps = self.step + 1, end.steps + 1
            planned_end = self.step >= plan.total_steps
            logged = self.step % cfg.log_every == 0 or end.steps == steps or planned_end
            may_decide = logged or self.world == 1  # ranks decide together at log steps; alone, at every step
            if plan.timed:
                note = plan.observe(self.step, may_decide=may_decide, sync=window.loss.item,
                                    any_rank=lambda f: any_rank(acc, f), slowest=lambda p: max_ranks(acc, p))  # fmt: skip
                if note:
                    acc.print(note, flush=True)
                    planned_end = self.step >= plan.total_steps  # a plan may end the run here
                    logged = logged or planned_end
            if logged:  # the only host reads of the loop: the loss window and the guard
                self.guard.check(epoch, self.step)
                end.last = self._log(metrics, epoch, lr, window)
                bar.set_postfix(loss=f"{end.last['loss']:.4f}", lr=f"{lr:.2e}")
            if may_decide:
                end.stop = "signal" if any_rank(acc, stop.received is not None) else None
                if end.stop is None and plan.budget_s is not None and any_rank(acc, plan.spent()):
                    end.stop = "time"
                    end.last = end.last if logged else self._log(metrics, epoch, lr, window)
            if end.stop or planned_end:  # the same step on every rank
                break
        bar.close()
        end.whole = end.steps == steps
        return end

    # -- pieces of the loop

    def _device_batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """Micro-batches ``start`` to ``stop`` of the epoch, on the device. The loader gives every
        rank the planned number (``ShardLoader`` refills what corrupt samples took), so ranks
        never ask each other whether someone ran out."""
        it, device = iter(self.loader), self.acc.device  # told by set_epoch to start at ``start``
        for micro in range(start, stop):
            batch = next(it, None)
            if batch is None:
                raise DataError(f"epoch {epoch}: the loader ended after {micro} of the {stop} batches it planned; "
                                "ranks would fall out of step")  # fmt: skip
            yield micro, {"image": to_model_input(batch["image"], device),
                          "label": batch["label"].to(device, non_blocking=True)}  # fmt: skip

    def _set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _log(self, metrics: MetricsLogger, epoch: int, lr: float, window: "LogWindow") -> dict[str, Any]:
        loss_sum, n, images = sum_ranks(self.acc, window.totals()).tolist()
        elapsed = time.perf_counter() - window.start
        record = {
            "epoch": epoch,
            "loss": loss_sum / max(1, n),
            "lr": lr,
            "images_per_sec": images / elapsed if elapsed > 0 else 0.0,
            "elapsed_s": round(self.plan.elapsed(), 3),  # the loop's wall clock, carried across resumes
            "images_seen": self.step * effective_batch(self.cfg, self.world),
        }
        metrics.log(self.step, **record)
        window.reset()
        return record

    def _data_counts(self) -> dict[str, Any]:
        """The epoch's skipped (dropped) and converted (kept as RGB) samples of every rank, gathered once."""
        totals: dict[str, dict[str, int]] = {"skipped": {}, "converted": {}}
        for counts in gather_objects(self.acc, self.loader.data_counts()):
            for kind, by_key in counts.items():
                for key, n in by_key.items():
                    totals[kind][key] = totals[kind].get(key, 0) + n
        record: dict[str, Any] = {"skipped": sum(totals["skipped"].values()),
                                  "converted": sum(totals["converted"].values())}  # fmt: skip
        if totals["skipped"]:
            record["skipped_by_reason"] = dict(sorted(totals["skipped"].items()))
        if totals["converted"]:
            record["converted_by_mode"] = dict(sorted(totals["converted"].items()))
        return record

    def _position(self, state: dict[str, Any]) -> Position | None:
        """Where the checkpoint stopped inside its epoch, in the saved launch's terms."""
        if not state.get("step_in_epoch"):
            return None
        was = state.get("run") or {"world": self.world, "batch_size": self.cfg.batch_size,
                                   "num_workers": self.cfg.data.num_workers, "accum_iter": self.cfg.accum_iter}  # fmt: skip
        return Position(world=was["world"], batch_size=was["batch_size"], num_workers=was["num_workers"],
                        batches=state["step_in_epoch"] * was["accum_iter"])  # fmt: skip

    def _save(self, epoch: int, step_in_epoch: int) -> None:
        """A checkpoint of the run at this step: ``epoch`` and the steps of it done."""
        self.guard.check(epoch, self.step)  # never save weights that a cancelled step stands behind
        cfg = self.cfg
        run = {"world": self.world, "batch_size": cfg.batch_size, "accum_iter": cfg.accum_iter,
               "num_workers": cfg.data.num_workers, "effective_batch": effective_batch(cfg, self.world),
               "images_seen": self.step * effective_batch(cfg, self.world)}  # fmt: skip
        state = {"step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch, "config": dataclasses.asdict(cfg),
                 "stage": getattr(cfg, "stage", None), "run": run, **self.plan.state()}  # fmt: skip
        save_checkpoint(self.acc, self.output_dir, self.step, model=self.model, optimizer=self.optimizer,
                        state=state, keep_last=cfg.keep_last, extra=self.task.extra_state())  # fmt: skip


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
