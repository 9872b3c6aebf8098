"""The fine-tuning stage: a timm ViT initialised from the encoder (or from scratch), trained
end to end with the MAE paper's recipe (He et al. 2021, appendix A.3), all from timm's
pieces: layer-wise lr decay, Mixup/CutMix, label smoothing, RandAugment, random erasing,
drop path and optional EMA of the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3

from .data.loader import make_loaders
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .downstream import DownstreamConfig, setup
from .engine import FitResult, Trainer, base_lr
from .evaluation import ClassificationTask
from .files import write_atomic
from .optim import adamw


@dataclass
class FinetuneConfig(DownstreamConfig):
    """Defaults: the encoder of ``runs/pretrain`` on the shipped 5,000-image sample, about 5
    minutes on 2 CPU cores. A recipe for 5,000 32-px images and 3 epochs, not ImageNet's:
    no Mixup/CutMix, RandAugment, random erasing, label smoothing or drop path (they regularise
    long runs on large sets, and slow a short one down), crops of 35-100% of the image, a
    higher lr (1e-3 at batch 32) with milder layer decay, the cls token. The paper's ViT-B recipe (100 epochs,
    5 warm-up, blr 5e-4 at batch 1024, layer decay 0.65, drop path 0.1, Mixup 0.8 / CutMix 1.0,
    smoothing 0.1, RandAugment, erasing 0.25, average pooling) is
    ``pipelines/configs/finetune_vit_base_in1k.yaml``."""

    stage: ClassVar[str] = "finetune"  # recorded in config.yaml and checkpoints (a name of pipelines.stages)
    output_dir: str = "runs/finetune"
    img_size: int | None = None  # fine-tune at another resolution; position embeddings are interpolated
    drop_path: float = 0.0
    layer_decay: float = 0.85  # lr of block i scaled by layer_decay^(depth + 1 - i)
    epochs: int = 3
    batch_size: int = 32
    blr: float = 8e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    DEFAULT_WARMUP: ClassVar[float] = 0.5
    mixup: float = 0.0  # Mixup alpha; 0 turns it off
    cutmix: float = 0.0  # CutMix alpha; 0 turns it off
    smoothing: float = 0.0
    auto_augment: str = ""  # RandAugment policy, e.g. "rand-m9-mstd0.5-inc1"; "" for none
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # RandomResizedCrop's area range
    reprob: float = 0.0  # random erasing probability
    ema: bool = False  # keep an exponential moving average of the weights and evaluate it too
    ema_decay: float = 0.9999

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")


def optimizer_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's layer-decay groups (each with an ``lr_scale`` the loop applies); no decay on
    norms, biases, position embeddings and tokens."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


class FinetuneTask(ClassificationTask):
    def __init__(self, cfg: FinetuneConfig, accelerator: Any, val: Any, num_classes: int, model: nn.Module,
                 img_size: int) -> None:  # fmt: skip
        super().__init__(accelerator, val, (3, img_size, img_size))
        self.cfg = cfg
        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                           num_classes=num_classes) if mixing else None  # fmt: skip
        if mixing:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
        self.best_path = Path(cfg.output_dir) / "best.json"
        self.best = json.loads(self.best_path.read_text())["top1"] if cfg.resume and self.best_path.exists() else -1.0

    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        if self.mixup is not None:
            if len(x) % 2:  # timm's Mixup pairs samples: drop one from an odd final batch
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        return self.criterion(model(x).float(), y)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.acc.unwrap_model(model), step=step)

    def extra_state(self) -> dict[str, nn.Module]:
        return {"ema": self.ema} if self.ema is not None else {}

    def evaluate(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if self.val is None:
            return {}
        net = self.acc.unwrap_model(model)
        metrics = self.score(net)
        if self.ema is not None:
            metrics.update({f"{k}_ema": v for k, v in self.score(self.ema.module).items()})
        if self.acc.is_main_process and metrics["top1"] > self.best:
            self.best = metrics["top1"]
            _save_weights(net.state_dict(), Path(self.cfg.output_dir) / "best.safetensors")
            write_atomic(self.best_path, json.dumps({"epoch": epoch, **metrics}) + "\n")
        self.results = dict(metrics, best_top1=self.best)
        return metrics

    def finish(self, model: nn.Module, output_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        _save_weights(state_dict, output_dir / "model.safetensors")
        self.write_results(output_dir)


def _save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(path, lambda p: save_file(tensors, str(p)))


def train_transform(cfg: FinetuneConfig, img_size: int) -> Any:
    """timm's ImageNet training transform as the MAE recipe configures it."""
    return create_transform(input_size=img_size, is_training=True, scale=tuple(cfg.crop_scale),
                            auto_augment=cfg.auto_augment or None, interpolation="bicubic", re_prob=cfg.reprob,
                            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip


def finetune(cfg: FinetuneConfig, accelerator: Any) -> FitResult:
    from accelerate.utils import set_seed

    classes, model, size = setup(cfg, "fine-tuning", head=True, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    rank, world = accelerator.process_index, accelerator.num_processes
    train, val = make_loaders(cfg.data, train_transform(cfg, size), eval_transform(size), batch_size=cfg.batch_size,
                              seed=cfg.seed, rank=rank, world_size=world, cache_dir=cfg.output_dir)  # fmt: skip
    optimizer = adamw(optimizer_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr(cfg, world),
                      device=accelerator.device)  # fmt: skip
    model = model.to(accelerator.device)
    task = FinetuneTask(cfg, accelerator, val, len(classes), model, size)
    set_seed(cfg.seed + rank)
    return Trainer(cfg, accelerator, model, optimizer, train, task).fit()
