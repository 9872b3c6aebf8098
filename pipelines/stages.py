"""The stages, in one table that the entry points (``python -m pipelines.<name>``) and the
SLURM submitter (``python -m pipelines.submit <name>``) both read, so a stage is added once.

Two kinds:
- **training stages** read one dataclass config (``--config FILE`` and ``key=value``),
  run under ``accelerate launch`` on any number of processes and nodes, checkpoint and
  resume; the submitter appends ``resume=auto`` and requeues them at the time limit.
- **tools** (analysis, reconstruction) are plain command lines (argparse) that run in one
  process and finish in minutes; the submitter runs them once, on one node, and does
  not requeue them.
Entries name modules as strings, so reading the table imports neither torch nor the stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config: str | None = None  # "module:Class", the dataclass config of a training stage
    run: str | None = None  # "module:function(cfg, accelerator)" of a training stage
    cli: str | None = None  # "module" of a tool, with parser() and main(argv)

    @property
    def training(self) -> bool:
        return self.config is not None

    @property
    def module(self) -> str:
        """What ``python -m`` runs."""
        return f"pipelines.{self.name}"

    def config_class(self) -> type:
        return _load(self.config)

    def function(self) -> Callable[[Any, Any], Any]:
        return _load(self.run)

    def check_args(self, argv: list[str]) -> str | None:
        """A tool's own argument check, without running it: None, or argparse's complaint."""
        import contextlib
        import io

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                importlib.import_module(self.cli).parser().parse_intermixed_args(argv)
        except SystemExit:
            return err.getvalue().strip().splitlines()[-1]
        return None


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("pretrain", "MAE pretraining", config="mae.pretrain:PretrainConfig", run="mae.pretrain:pretrain"),
        Stage("linprobe", "linear probe and k-NN of a frozen encoder", config="mae.linprobe:LinprobeConfig",
              run="mae.linprobe:linprobe"),
        Stage("finetune", "end-to-end fine-tuning", config="mae.finetune:FinetuneConfig",
              run="mae.finetune:finetune"),
        Stage("analyze", "what an encoder learned (the ViT paper's Figure 7)", cli="pipelines.analyze"),
        Stage("reconstruct", "MAE reconstructions of image files", cli="pipelines.reconstruct"),
        Stage("summary", "the one-page picture of runs, from their metrics", cli="pipelines.summary"),
    )
}  # fmt: skip
