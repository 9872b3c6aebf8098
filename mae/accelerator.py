"""The Accelerator every stage runs with: Accelerate's own, except that unwrapping a model
does not import DeepSpeed on runs that do not use it.

Accelerate's ``unwrap_model`` (also behind ``get_state_dict``) imports DeepSpeed whenever it
is installed, to check for a ``DeepSpeedEngine``: 2 to 3 s at the start of every stage
process on 2 cores. A model can only sit in such an engine once DeepSpeed has been imported,
so until then the distributed containers are unwrapped here.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_compiled_module

CONTAINERS = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


class StageAccelerator(Accelerator):
    def unwrap_model(self, model: torch.nn.Module, keep_fp32_wrapper: bool = True,
                     keep_torch_compile: bool = True) -> torch.nn.Module:  # fmt: skip
        """Accelerate's, where DeepSpeed is loaded or the case is more than DDP around a module."""
        if ("deepspeed" in sys.modules or self.distributed_type == DistributedType.FSDP or not keep_fp32_wrapper
                or is_compiled_module(model)):  # fmt: skip
            return super().unwrap_model(model, keep_fp32_wrapper, keep_torch_compile)
        while isinstance(model, CONTAINERS):
            model = model.module
        return model
