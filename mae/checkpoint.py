"""Checkpoints that resume exactly and never run code when loaded.

Layout of ``<output_dir>/checkpoints/ckpt-<step>/``:
    model.safetensors     full model weights (and <name>.safetensors for extra modules, e.g. EMA)
    state.pt              optimiser, step, epoch, config (plain tensors and numbers)
    rng-rank<r>.pt        each rank's RNG states
A checkpoint is written to ``ckpt-<step>.tmp`` and renamed when every file is complete,
so a killed job never leaves a half checkpoint where a good one was, and resume ignores
anything still named ``.tmp``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


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


def _fsync_write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        modules = {"model": accelerator.unwrap_model(model), **(extra or {})}
        for name, module in modules.items():
            weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            _fsync_write(tmp / f"{name}.safetensors", lambda p, w=weights: save_file(w, str(p)))
        payload = dict(state, optimizer=optimizer.state_dict())
        if accelerator.scaler is not None:
            payload["scaler"] = accelerator.scaler.state_dict()
        _fsync_write(tmp / "state.pt", lambda p: torch.save(payload, p))
    accelerator.wait_for_everyone()
    _fsync_write(tmp / f"rng-rank{accelerator.process_index}.pt", lambda p: torch.save(capture_rng(), p))
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


def load_checkpoint(
    accelerator: Any,
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore weights, optimiser, scaler and this rank's RNG; returns the saved state."""
    path = Path(path)
    modules = {"model": accelerator.unwrap_model(model), **(extra or {})}
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")), strict=True)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state.pop("scaler"))
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if rng_file.exists():  # absent when resuming on more ranks than saved: seeds then differ
        restore_rng(torch.load(rng_file, map_location="cpu", weights_only=True))
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
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return sd
