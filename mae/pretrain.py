"""The pretraining stage: masked-image modelling of a ViT encoder on unlabelled shards."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from .collectives import sum_ranks
from .data.loader import ShardLoader, make_loaders
from .data.transforms import eval_transform, pretrain_transform, to_model_input
from .evaluation import lockstep
from .hf import init_from_hf
from .engine import FitResult, RunConfig, Task, Trainer
from .files import write_atomic
from .models.mae_vit import PRESETS, MaskedAutoencoderViT, encoder_only, model_config
from .models.masking import check_sampling, mask_noise
from .monitor import KnnMonitor, MonitorConfig, check_monitor, monitor_shards
from .optim import adamw, param_groups
from .sources import ENCODER_FILE
from .visualize import reconstruct, save_reconstructions


@dataclass
class PretrainConfig(RunConfig):
    """Defaults: the CIFAR-scale model on the shipped sample shards, a few minutes on CPU.
    ``pipelines/configs/mae_vit_base_in1k.yaml`` holds the paper's ImageNet recipe."""

    stage: ClassVar[str] = "pretrain"  # recorded in config.yaml and checkpoints (a name of pipelines.stages)
    output_dir: str = "runs/pretrain"
    model: str = "mae_vit_tiny_patch4_32"  # a preset of mae.models
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any MAEConfig field
    mask_ratio: float = 0.75
    mask_sampling: str = "random"  # "random", "block" (BEiT) or "grid" (one patch per 2 x 2 cell); mae.models.masking
    norm_pix_loss: bool = True
    blr: float = 1.5e-3  # higher than the paper's 1.5e-4 (effective batch 4096) for short small-batch runs
    epochs: int = 4
    num_vis: int = 8  # validation images in each reconstruction picture
    # start from a transformers ViTMAE (a local folder or hf-hub:<repo id>): encoder and decoder
    # weights; the model's shape keys must match it (mae.hf.init_from_hf says which do not)
    init_from: str = ""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # a k-NN of the encoder during the run (mae.monitor)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in PRESETS:
            raise ValueError(f"model: unknown preset {self.model!r}; choose one of {', '.join(PRESETS)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        try:  # the model settings are checked now, not when the model is built
            model = model_config(asdict(self))
        except (TypeError, ValueError) as err:
            raise ValueError(f"model_overrides: {err}") from err
        check_sampling(self.mask_sampling, model.grid_size, self.mask_ratio)
        check_monitor(self.monitor, self.max_minutes)


def build_model(cfg: PretrainConfig) -> MaskedAutoencoderViT:
    model = MaskedAutoencoderViT(model_config(asdict(cfg)))
    if cfg.init_from:
        init_from_hf(model, cfg.init_from)
    return model


def save_encoder(model: MaskedAutoencoderViT, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The encoder alone in timm names, with what timm needs to rebuild it in the metadata.
    ``state_dict``: the complete weights when the module's own are sharded (ZeRO-3)."""
    c = model.cfg
    meta = {"timm_name": c.timm_model, "timm_kwargs": json.dumps(c.timm_kwargs()), "format": "pt"}
    sd = model.encoder_state_dict() if state_dict is None else encoder_only(state_dict)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    return write_atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


class PretrainTask(Task):
    """MAE's loss for the loop; evaluation = masked loss on validation shards (fixed masks)
    and a reconstruction picture."""

    def __init__(self, cfg: PretrainConfig, accelerator: Any, val: ShardLoader | None) -> None:
        self.cfg, self.acc, self.val = cfg, accelerator, val
        self._grid = model_config(asdict(cfg)).grid_size
        self._vis: torch.Tensor | None = None
        self.knn: KnnMonitor | None = None
        if monitor_shards(cfg.monitor, cfg.data):  # read and checked now: bad monitor data stops the run before it trains
            self.knn = KnnMonitor(cfg, accelerator, model_config(asdict(cfg)).img_size)
            accelerator.print(self.knn.describe())

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"]
        noise = None  # random sampling: the model draws its own noise
        if self.cfg.mask_sampling != "random":
            noise = mask_noise(self.cfg.mask_sampling, images.shape[0], self._grid, self.cfg.mask_ratio, device=images.device)
        loss, _, _ = model(images, noise=noise)
        return loss

    def _noise(self, n: int, index: int) -> torch.Tensor:
        """The fixed masks of evaluation batch ``index`` (-1: the pictures), by the run's sampling."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + index)
        return mask_noise(self.cfg.mask_sampling, n, self._grid, self.cfg.mask_ratio, generator=g).to(self.acc.device)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, epoch: int) -> dict[str, float]:
        if self.val is None:
            return {}
        net: MaskedAutoencoderViT = self.acc.unwrap_model(model)
        net.eval()
        size = net.cfg.img_size
        total, count = 0.0, 0
        self.val.set_epoch(0)
        for i, (batch, real) in enumerate(lockstep(self.val, self.acc, (3, size, size))):
            images = to_model_input(batch["image"], self.acc.device)
            if self._vis is None and real:
                self._vis = images[: self.cfg.num_vis].clone()
            with self.acc.autocast():
                loss, _, _ = net(images, noise=self._noise(images.shape[0], i))
            if real:
                total += loss.item() * images.shape[0]
                count += images.shape[0]
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.acc.device)
        total, count = sum_ranks(self.acc, sums).tolist()
        # every rank reconstructs (collective forwards under ZeRO-3); the main process draws
        vis = self._vis if self._vis is not None else torch.zeros(1, 3, size, size, device=self.acc.device)
        with self.acc.autocast():
            pictures = reconstruct(net, vis, self._noise(vis.shape[0], -1))
        if self.acc.is_main_process and self._vis is not None:
            save_reconstructions(pictures, Path(self.cfg.output_dir) / "reconstructions" / f"epoch-{epoch:04d}.png")
        net.train()
        return {"val_loss": total / max(1.0, count)}

    def monitor(self, model: torch.nn.Module, epoch: int, elapsed_s: float, last: bool) -> dict[str, float]:
        if self.knn is None or not self.knn.due(epoch, elapsed_s, last):
            return {}
        return self.knn(model)

    def finish(self, model: torch.nn.Module, output_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        save_encoder(model, output_dir / ENCODER_FILE, state_dict)


def pretrain(cfg: PretrainConfig, accelerator: Any) -> FitResult:
    """Build model, data and optimiser for ``cfg`` and run the loop."""
    return build_trainer(cfg, accelerator).fit()


def build_trainer(cfg: PretrainConfig, accelerator: Any) -> Trainer:
    """Everything of a pretraining run, ready to ``fit()``."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg)
    size = model.cfg.img_size
    rank, world = accelerator.process_index, accelerator.num_processes
    train, val = make_loaders(cfg.data, pretrain_transform(size), eval_transform(size), batch_size=cfg.batch_size,
                              seed=cfg.seed, rank=rank, world_size=world, cache_dir=cfg.output_dir)  # fmt: skip
    optimizer = adamw(param_groups(model, cfg.weight_decay, model.no_weight_decay()), lr=0.0,
                      device=accelerator.device, betas=(0.9, 0.95))  # fmt: skip
    set_seed(cfg.seed + rank)  # masks differ across ranks, as their images do
    return Trainer(cfg, accelerator, model, optimizer, train, PretrainTask(cfg, accelerator, val))
