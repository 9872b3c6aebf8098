"""What every stage entry point does: parse ``--config FILE`` and ``key=value``, merge
them over the stage's defaults, save the resolved config into the run folder, start
Accelerate and call the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mae.checkpoint import CheckpointError
from mae.config import ConfigError, describe, load_config, save_config
from mae.data.shards import DataError
from mae.guards import NonFiniteLoss
from mae.metrics import tracker_names
from mae.precision import Precision, resolve_precision
from pipelines.stages import STAGES


# Stopped by SIGTERM/SIGUSR1 after writing a checkpoint: "try again later" (sysexits'
# EX_TEMPFAIL); a job script requeues on it and resume=auto continues.
EXIT_STOPPED = 75


def make_accelerator(cfg: Any) -> tuple[Any, Precision]:
    """Accelerate from the launcher's environment, with the stage's precision (``auto``
    resolved for the device this process gets), accumulation, clipping and trackers
    (``report_to``: a ConfigError when unknown or not installed); under DeepSpeed
    these and the micro-batch go into DeepSpeed's config, so every launch config reaches
    the same code path. Imported here so that ``--help`` and config errors answer without
    loading Accelerate."""
    log_with = tracker_names(cfg.report_to)
    import torch
    from accelerate import PartialState
    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    from mae.accelerator import StageAccelerator

    plugin = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if not torch.cuda.is_available():
            # Accelerate names a backend only for accelerators; without one, DeepSpeed's
            # group would go unseen (one process each). CPU runs use gloo.
            PartialState(backend="gloo")
        plugin = DeepSpeedPlugin(gradient_accumulation_steps=cfg.accum_iter)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        plugin.deepspeed_config["gradient_clipping"] = cfg.clip_grad or 0.0  # 0: DeepSpeed does not clip
    # The device precision is resolved for. This call sets up the process group that the
    # Accelerator then reuses: ``cpu`` as Accelerate reads it, else each CPU process of a
    # multi-process launch would form a group of its own.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_precision(cfg.mixed_precision, state.device, deepspeed=plugin is not None)
    accelerator = StageAccelerator(mixed_precision=precision.mode, gradient_accumulation_steps=cfg.accum_iter,
                                   deepspeed_plugin=plugin, log_with=log_with, project_dir=cfg.output_dir)  # fmt: skip
    if plugin is not None:
        plugin.deepspeed_config["train_batch_size"] = cfg.batch_size * cfg.accum_iter * accelerator.num_processes
    return accelerator, precision


def set_cpu_threads(cfg: Any, accelerator: Any) -> str:
    """On CPU, give each process its share of this node's cores (or ``cpu_threads``):
    ``accelerate launch`` sets OMP_NUM_THREADS=1 unless told otherwise. Returns the
    note for the start-up line."""
    import torch

    if accelerator.device.type != "cpu":
        return ""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // local_processes))
    return f" ({torch.get_num_threads()} threads)"


def run_stage(name: str, argv: list[str] | None, *, doc: str) -> int:
    """The entry point of the training stage ``name`` of ``pipelines.stages.STAGES``."""
    entry = STAGES[name]
    config_cls, stage, prog = entry.config_class(), entry.function(), entry.module
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys (key=value, dotted for nested):\n" + "\n".join(describe(config_cls)),
    )  # fmt: skip
    parser.add_argument("--config", help="YAML file of settings (applied over the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings applied last")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
        accelerator, precision = make_accelerator(cfg)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2

    threads = set_cpu_threads(cfg, accelerator)
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    accelerator.print(f"{prog}: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
                      f"on {accelerator.device}{threads}, {precision.describe()}, output in {cfg.output_dir}")
    if precision.warning:
        accelerator.print(f"{prog}: warning: {precision.warning}")
    try:
        result = stage(cfg, accelerator)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    finally:
        accelerator.end_training()
    if getattr(result, "stopped_by_signal", False):
        return EXIT_STOPPED
    return 0
