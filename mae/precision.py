"""Which precision a run computes in: ``mixed_precision=auto`` asks the hardware.

bf16 autocast pays off only where the matrix units take bf16 natively: CUDA GPUs that
support it, and CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates bf16 GEMMs and a
step runs many times slower than in fp32 (20x measured on an AVX2 EPYC, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # as /proc/cpuinfo names them


@dataclass(frozen=True)
class Precision:
    """The resolved mode (an Accelerate ``mixed_precision`` value), why, and a warning if any."""

    mode: str
    reason: str
    warning: str = ""

    def describe(self) -> str:
        return {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[self.mode] + f" ({self.reason})"


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports; empty where there is no /proc/cpuinfo."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 natively, and the evidence."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{torch.cuda.get_device_name(device)} {'has' if ok else 'lacks'} native bf16"
    if device.type == "cpu":
        found = sorted(set(NATIVE_BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
        return bool(found), f"CPU with {', '.join(found)}" if found else "CPU without AVX512-BF16 or AMX"
    return False, f"{device.type}: native bf16 not known"


def resolve_precision(
    requested: str, device: torch.device, flags: set[str] | None = None, deepspeed: bool = False
) -> Precision:
    """``auto`` -> bf16 where the hardware runs it natively, fp32 otherwise (and under
    DeepSpeed, whose bf16 mode turns the weights to bf16 but leaves the stages' fp32
    inputs uncast); an explicit ``bf16`` on a CPU without native support stays, with a
    warning about its cost."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native, why = native_bf16(device, flags)
    if requested == "auto" and deepspeed:
        return Precision("no", "auto: fp32 under DeepSpeed")
    if requested == "auto":
        return Precision("bf16" if native else "no", f"auto: {why}")
    if requested == "bf16" and device.type == "cpu" and not native:
        return Precision("bf16", "set", f"mixed_precision=bf16 on a {why}: torch emulates bf16 GEMMs here, expect "
                                        "a step about 20x slower than fp32 (mixed_precision=no or auto avoids it)")  # fmt: skip
    return Precision(requested, "set")
