"""The linear-probe stage: a frozen encoder, a BatchNorm and a linear head on top
(He et al. 2021, appendix A.2), plus a k-NN measure of the same frozen features."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import trunc_normal_
from timm.optim import Lars

from .data.features import CachedFeatures
from .data.loader import ShardLoader, make_loaders
from .data.transforms import eval_transform, probe_transform
from .downstream import DownstreamConfig, setup
from .collectives import gather_all
from .engine import FitResult, Trainer, base_lr, effective_batch
from .evaluation import ClassificationTask, extract_features, knn_classify, topk_correct
from .files import write_atomic
from .guards import NonFiniteLoss
from .metrics import MetricsLogger
from .optim import lr_at
from .summary import write_summary


@dataclass
class LinprobeConfig(DownstreamConfig):
    """Defaults: the encoder of ``runs/pretrain`` on the shipped labelled sample, about a
    minute on CPU (features cached). The paper's recipe (ViT-B, ImageNet: 90 epochs, 10
    warm-up, blr 0.1 at batch 16384, augmented) is ``pipelines/configs/linprobe_vit_base_in1k.yaml``."""

    stage: ClassVar[str] = "linprobe"  # recorded in config.yaml and checkpoints (a name of pipelines.stages)
    output_dir: str = "runs/linprobe"
    epochs: int = 90
    batch_size: int = 256
    # LARS moves a weight matrix by lr x 0.001 x |w| per step whatever the gradient, so the
    # paper's rate (blr 0.1 at batch 16384, lr 6.4) is what a small batch needs too.
    blr: float = 6.4
    weight_decay: float = 0.0
    DEFAULT_WARMUP: ClassVar[float] = 10.0
    augment: bool = True  # RandomResizedCrop + flip while training; off means the eval transform
    cached_features: bool = True  # encode once, train the head on stored features (no augmentation)
    knn: bool = True  # also report k-NN accuracy of the frozen features
    knn_k: int = 20
    knn_temperature: float = 0.07

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ValueError("knn_k must be >= 1 and knn_temperature > 0")


class ProbeHead(nn.Sequential):
    """BatchNorm without affine parameters, then a linear classifier initialised with std 0.01."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class LinearProbe(nn.Module):
    """A frozen encoder (kept in eval mode even when the probe trains) and a trainable head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = ProbeHead(encoder.num_features, num_classes)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(x)  # pooled by the encoder's global_pool, head removed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).float())


def lars_for(head: nn.Module, lr: float, weight_decay: float) -> Lars:
    """LARS as the official probe uses it: trust-ratio scaling on weight matrices, none on biases."""
    matrices = [p for p in head.parameters() if p.ndim > 1]
    vectors = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{"params": matrices, "always_adapt": True, "weight_decay": weight_decay},
                 {"params": vectors, "always_adapt": False, "weight_decay": 0.0}],
                lr=lr, momentum=0.9)  # fmt: skip


class ProbeTask(ClassificationTask):
    def __init__(self, accelerator: Any, val: Any, extra: dict[str, float], pad_shape: tuple[int, ...]) -> None:
        super().__init__(accelerator, val, pad_shape)
        self.results.update(extra)  # the k-NN measures, taken before training

    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]).float(), batch["label"])

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self.val is None:
            return {}
        metrics = self.score(self.acc.unwrap_model(model))
        self.results.update(metrics)
        return metrics

    def finish(self, model: nn.Module, output_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        head = {k.removeprefix("head."): v for k, v in state_dict.items() if not k.startswith("encoder.")}
        tensors = {k: v.contiguous().cpu() for k, v in head.items()}
        write_atomic(output_dir / "head.safetensors", lambda p: save_file(tensors, str(p)))
        self.write_results(output_dir)


def linprobe(cfg: LinprobeConfig, accelerator: Any) -> FitResult:
    classes, encoder, size = setup(cfg, "the probe", head=False)
    probe = LinearProbe(encoder, len(classes)).to(accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    augment = cfg.augment and not cfg.cached_features
    train_tf = probe_transform(size) if augment else eval_transform(size)
    train, val = make_loaders(cfg.data, train_tf, eval_transform(size), batch_size=cfg.batch_size, seed=cfg.seed,
                              rank=rank, world_size=world, cache_dir=cfg.output_dir)  # fmt: skip
    extra: dict[str, float] = {}
    features = None
    if cfg.cached_features or cfg.knn:
        features = _encode(probe, cfg, accelerator, train if not augment else None, val, size)
        if cfg.knn and features["val"] is not None:
            bank, queries = features["train"], features["val"]
            extra = knn_classify(*(gather_all(t, accelerator) for t in (*bank, *queries)), num_classes=len(classes),
                                 k=cfg.knn_k, temperature=cfg.knn_temperature)  # fmt: skip
            accelerator.print("k-NN: " + ", ".join(f"{k} {v:.2f}" for k, v in extra.items()))
    optimizer = lars_for(probe.head, base_lr(cfg, world), cfg.weight_decay)
    if cfg.cached_features:
        train_set = CachedFeatures(*(gather_all(t, accelerator).to(accelerator.device) for t in features["train"]),
                                  batch_size=effective_batch(cfg, world), seed=cfg.seed, shuffle=cfg.data.shuffle)  # fmt: skip
        val_set = [gather_all(t, accelerator).to(accelerator.device) for t in features["val"]] if val else None
        task = ProbeTask(accelerator, None, extra, (train_set.features.shape[1],))
        return fit_head_on_features(cfg, accelerator, probe.head, optimizer, train_set, val_set, task)
    task = ProbeTask(accelerator, val, extra, (3, size, size))
    return Trainer(cfg, accelerator, probe, optimizer, train, task).fit()


def fit_head_on_features(
    cfg: LinprobeConfig, accelerator: Any, head: ProbeHead, optimizer: torch.optim.Optimizer, train: CachedFeatures,
    val: list[torch.Tensor] | None, task: ProbeTask,
) -> FitResult:  # fmt: skip
    """The cached probe's own small loop, not the stages' ``Trainer``: at memory speed, a
    ``Trainer`` step per batch would cost more than the step itself. The features sit on the
    device; each epoch is one shuffled copy cut into batch views; each batch is one optimiser
    step (``batch_size`` x processes x ``accum_iter`` features) under ``lr_at``'s schedule, as
    the on-the-fly probe has it; the mean loss is read, checked for being finite and logged
    every ``log_every`` steps and at each epoch's end; evaluation is one matmul over the
    validation features. Every rank holds all ranks' features (tens of MB) and trains the same
    head on the same batches, so nothing is exchanged. What ``Trainer`` does and this does not:
    checkpoints and resume, max_steps/max_minutes, gradient clipping, stop signals. It takes
    seconds, so it reruns instead."""
    if cfg.resume:
        accelerator.print(f"resume={cfg.resume}: the cached probe retrains its head from the features (seconds)")
    if cfg.max_steps is not None or cfg.max_minutes is not None:
        accelerator.print("max_steps/max_minutes do not apply to the cached probe: its head trains all "
                          f"{cfg.epochs} epochs (seconds); cached_features=false trains through the loop that has them")  # fmt: skip
    head.to(accelerator.device).train()
    steps_per_epoch = train.batches_per_epoch
    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup() * steps_per_epoch)
    lr0, batch = base_lr(cfg, accelerator.num_processes), train.batch_size
    metrics = MetricsLogger(accelerator, cfg)
    accelerator.print(f"cached probe: {len(train.features)} features x {cfg.epochs} epochs, {steps_per_epoch} steps "
                      f"of {batch} per epoch, lr {lr0:.3e}")  # fmt: skip
    loss_sum, seen, start, step = torch.zeros((), device=accelerator.device), 0, time.perf_counter(), 0
    origin = start
    for epoch in range(cfg.epochs):
        features, labels = train.shuffled(epoch)
        for i in range(steps_per_epoch):
            lr = lr_at(step, base_lr=lr0, warmup_steps=warmup, total_steps=total, min_lr=cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(head(features[i * batch : (i + 1) * batch]), labels[i * batch : (i + 1) * batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step, seen = step + 1, seen + 1
            if step % cfg.log_every == 0 or i + 1 == steps_per_epoch:
                mean = loss_sum.item() / seen
                if not math.isfinite(mean):
                    raise NonFiniteLoss(f"loss is not finite in the cached probe at epoch {epoch}, step {step}; "
                                        "try a lower blr")  # fmt: skip
                elapsed = time.perf_counter() - start
                metrics.log(step, epoch=epoch, loss=mean, lr=lr, images_per_sec=seen * batch / elapsed, skipped=0,
                            elapsed_s=round(time.perf_counter() - origin, 3), images_seen=step * batch)  # fmt: skip
                loss_sum.zero_()
                seen, start = 0, time.perf_counter()
        if val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            scores = score_features(head, *val)
            task.results.update(scores)
            metrics.log(step, epoch=epoch, **scores)
            accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    if accelerator.is_main_process:
        task.finish(head, Path(cfg.output_dir), head.state_dict())
        write_summary(cfg.output_dir)
    metrics.close()
    return FitResult(step, cfg.epochs, False, dict(task.results))


@torch.no_grad()
def score_features(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 / top5 in percent and mean cross-entropy of ``head`` on all of ``features`` at once."""
    head.eval()
    logits = head(features).float()
    head.train()
    c1, c5 = topk_correct(logits, labels)
    n = max(1, len(labels))
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "val_loss": F.cross_entropy(logits, labels).item()}


def _encode(probe: LinearProbe, cfg: LinprobeConfig, accelerator: Any, train: ShardLoader | None,
            val: ShardLoader | None, size: int) -> dict[str, Any]:  # fmt: skip
    """This rank's frozen features of the training set (eval transform) and of the validation set."""
    if train is None:  # the training loader augments: encode with a plain one
        train, _ = make_loaders(cfg.data, eval_transform(size), eval_transform(size), batch_size=cfg.batch_size,
                                seed=cfg.seed, rank=accelerator.process_index,
                                world_size=accelerator.num_processes, cache_dir=cfg.output_dir)  # fmt: skip
    train.set_epoch(0)
    pad = (3, size, size)
    out: dict[str, Any] = {"train": extract_features(probe.features, train, accelerator, pad), "val": None}
    if val is not None:
        val.set_epoch(0)
        out["val"] = extract_features(probe.features, val, accelerator, pad)
    return out
