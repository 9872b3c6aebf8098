"""Checkpoints that resume exactly and never run code when loaded.

Layout of ``<output_dir>/checkpoints/ckpt-<step>/``:
    model.safetensors     full model weights (and <name>.safetensors for extra modules, e.g. EMA)
    state.pt              optimiser, step, epoch, config (plain tensors and numbers)
    optimizer-rank<r>.pt  under DeepSpeed ZeRO, each rank's part of the optimiser state
    rng-rank<r>.pt        each rank's RNG states
A checkpoint is written to ``ckpt-<step>.tmp`` (each file by ``files.write_atomic``) and
renamed when every file is complete, so a killed job never leaves a half checkpoint where a
good one was, and resume ignores anything still named ``.tmp``.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from .files import TMP_SUFFIX, write_atomic

PREFIX = "ckpt-"
SAFE_FORMATS = ("safetensors, or torch.save of plain tensors, numbers, strings, lists and dicts "
                "(what torch.load(weights_only=True) reads)")  # fmt: skip


class CheckpointError(ValueError):
    """A torch file the project refuses to load (it holds pickled objects) or cannot read."""


def load_plain(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: a file holding other pickled Python objects is refused
    with one line saying so, instead of torch's traceback advising to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled Python objects ({found.group(1)}) that could run "
                f"code when loaded. Accepted: {SAFE_FORMATS}"
            ) from err
        reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        raise CheckpointError(f"{path}: not a readable torch file ({reason.group(1) if reason else 'unpickling failed'}). "
                              f"Accepted: {SAFE_FORMATS}") from err  # fmt: skip


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def find_latest(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``""`` -> None; ``"auto"`` -> latest in output_dir (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    path = Path(resume)
    if path.is_dir() and not (path / "state.pt").exists():
        latest = find_latest(path)  # a run folder
        if latest is None:
            raise FileNotFoundError(f"resume={resume}: no checkpoint in that folder")
        return latest
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"resume={resume}: not a checkpoint folder (no state.pt)")
    return path


def capture_rng() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_is_sharded(accelerator: Any) -> bool:
    """Under DeepSpeed ZeRO each rank holds its own part of the optimiser state."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 2,
    extra: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    final = checkpoints_dir(output_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    weights = accelerator.get_state_dict(model)  # collective under ZeRO-3: gathers the shards
    sharded = optimizer_is_sharded(accelerator)
    if accelerator.is_main_process:
        tensors = {"model": weights, **{k: m.state_dict() for k, m in (extra or {}).items()}}
        for name, sd in tensors.items():
            plain = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
            write_atomic(tmp / f"{name}.safetensors", lambda p, w=plain: save_file(w, str(p)))
        payload = dict(state, optimizer_sharded=sharded)
        if not sharded:
            payload["optimizer"] = optimizer.state_dict()
        if accelerator.scaler is not None:
            payload["scaler"] = accelerator.scaler.state_dict()
        write_atomic(tmp / "state.pt", lambda p: torch.save(payload, p))
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    write_atomic(tmp / f"rng-rank{rank}.pt", lambda p: torch.save(capture_rng(), p))
    if sharded:
        write_atomic(tmp / f"optimizer-rank{rank}.pt", lambda p: torch.save(optimizer.state_dict(), p))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again: swap, never leave neither
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_model_weights(path: str | Path, model: torch.nn.Module, extra: dict[str, torch.nn.Module] | None = None) -> None:
    """Before ``accelerator.prepare``: the weights go into the plain modules, which DeepSpeed
    then partitions as usual."""
    path = Path(path)
    for name, module in {"model": model, **(extra or {})}.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")), strict=True)


def _zero_safe_globals() -> list:
    """The few plain-data classes a DeepSpeed ZeRO optimiser state holds besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_training_state(accelerator: Any, path: str | Path, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """After ``accelerator.prepare``: optimiser (this rank's part under ZeRO), scaler and this
    rank's RNG. Returns step, epoch and the rest of the saved state (``state``: the folder's
    ``state.pt`` when the caller has read it already)."""
    path = Path(path)
    state = dict(load_plain(path / "state.pt") if state is None else state)
    if state.get("optimizer_sharded", False) != optimizer_is_sharded(accelerator):
        raise ValueError(f"{path} was saved {'with' if state.get('optimizer_sharded') else 'without'} DeepSpeed: "
                         "resume it under the same kind of launch")  # fmt: skip
    if "optimizer" in state:
        optimizer.load_state_dict(state.pop("optimizer"))
    else:
        shard = path / f"optimizer-rank{accelerator.process_index}.pt"
        if not shard.exists():
            raise FileNotFoundError(f"{shard} missing: resume a ZeRO checkpoint on as many processes as saved it")
        with torch.serialization.safe_globals(_zero_safe_globals()):
            optimizer_state = load_plain(shard)
        # ZeRO's optimiser takes one entry per data-parallel rank and reads its own; the
        # fp32 master weights come from the file, not from the (possibly 16-bit) model.
        parts = [optimizer_state if r == accelerator.process_index else None for r in range(accelerator.num_processes)]
        zero = getattr(optimizer, "optimizer", optimizer)
        zero.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state.pop("scaler"))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved: seeds then differ
        restore_rng(load_plain(rng_file))
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only``), e.g. a released
    MAE checkpoint ``{'model': ...}``; a checkpoint folder gives its model.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = load_plain(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return sd
