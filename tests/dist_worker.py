"""Run under ``accelerate launch`` by tests/test_distributed.py: each rank writes what it saw.

    step-equivalence OUT BATCH   three optimiser steps on fixed images and masks, rank r
                                 taking its slice; parameters and reduced losses written
    stage OUT key=value ...      a real pretraining run, then parameters and one epoch's
                                 image fingerprints of this rank written
    traced OUT NAME STOP key=value ...
                                 a real pretraining run without augmentation (centre crops, so
                                 an image is known by its pixels) that records the fingerprint of
                                 every image it trains on, by optimiser step, and stops itself
                                 with SIGUSR1 after step STOP (0: runs to the end)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import save_file

from mae.config import load_config
from mae.data.loader import ShardLoader
from mae.data.transforms import eval_transform
from mae.models import MAEConfig, MaskedAutoencoderViT
from mae.pretrain import PretrainConfig, build_trainer
from pipelines.launch import make_accelerator

SMALL = MAEConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                  decoder_depth=1, decoder_num_heads=4)  # fmt: skip


def dump_params(model: torch.nn.Module, out: Path, acc: Accelerator) -> None:
    params = {k: v.detach().contiguous().cpu() for k, v in acc.unwrap_model(model).state_dict().items()}
    save_file(params, str(out / f"params-w{acc.num_processes}-r{acc.process_index}.safetensors"))


def step_equivalence(out: Path, batch: int) -> None:
    acc = Accelerator()
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(SMALL)
    # plain SGD: Adam would turn float-noise gradients (the key bias's, zero in theory) into full steps
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        images = torch.randn(2 * batch, 3, 32, 32, generator=g)  # the same global batch for every world size
        noise = torch.rand(2 * batch, SMALL.num_patches, generator=g)
        per_rank = 2 * batch // acc.num_processes
        mine = slice(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)
        loss, _, _ = model(images[mine], noise=noise[mine])
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(acc.reduce(loss.detach(), reduction="mean").item())
    dump_params(model, out, acc)
    if acc.is_main_process:
        (out / f"losses-w{acc.num_processes}.json").write_text(json.dumps(losses))


def stage(out: Path, overrides: list[str]) -> None:
    cfg = load_config(PretrainConfig, None, [f"output_dir={out / 'run'}", *overrides])
    acc, _ = make_accelerator(cfg)  # as the stage makes it: precision and trackers included
    trainer = build_trainer(cfg, acc)
    result = trainer.fit()
    dump_params(trainer.model, out, acc)
    # which images this rank reads in one epoch, as fingerprints (no augmentation)
    loader = ShardLoader(cfg.data.train, eval_transform(32), batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                         rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed)  # fmt: skip
    loader.set_epoch(0)
    prints = [hashlib.sha1(img.numpy().tobytes()).hexdigest() for b in loader for img in b["image"]]
    everyone = gather_object([prints])
    if acc.is_main_process:
        (out / f"stage-w{acc.num_processes}.json").write_text(json.dumps(
            {"world_size": acc.num_processes, "step": result.step, "prints": everyone}))  # fmt: skip
    acc.end_training()


def traced(out: Path, name: str, stop: int, overrides: list[str]) -> None:
    import mae.pretrain

    mae.pretrain.pretrain_transform = lambda size, **_: eval_transform(size)  # images known by their pixels
    cfg = load_config(PretrainConfig, None, [f"output_dir={out / 'run'}", *overrides])
    acc, _ = make_accelerator(cfg)
    trainer = build_trainer(cfg, acc)
    seen: list[tuple[int, str]] = []
    train_step, after_step = trainer.task.train_step, trainer.task.after_step

    def recording(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        seen.extend((trainer.step, hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest()) for img in batch["image"])
        return train_step(model, batch)

    def stopping(model: torch.nn.Module, step: int) -> None:
        after_step(model, step)
        if step == stop:
            os.kill(os.getpid(), signal.SIGUSR1)  # as a scheduler's warning would

    trainer.task.train_step, trainer.task.after_step = recording, stopping
    result = trainer.fit()
    everyone = gather_object([seen])
    if acc.is_main_process:
        (out / f"{name}.json").write_text(json.dumps({"world_size": acc.num_processes, "step": result.step,
                                                      "stopped": result.stopped_by_signal, "seen": everyone}))  # fmt: skip
    acc.end_training()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "step-equivalence":
        step_equivalence(out, int(sys.argv[3]))
    elif mode == "traced":
        traced(out, sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    else:
        stage(out, sys.argv[3:])
