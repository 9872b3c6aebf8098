"""mixed_precision=auto asks the hardware: bf16 where it multiplies bf16 natively, fp32
elsewhere, and the stage says which at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae.engine import RunConfig
from mae.precision import native_bf16, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.mark.parametrize("flags", [{"avx2", "avx512f", "avx512_bf16"}, {"avx2", "amx_bf16", "amx_tile"}])
def test_auto_picks_bf16_on_cpus_with_native_bf16(flags):
    p = resolve_precision("auto", CPU, flags)
    assert p.mode == "bf16" and not p.warning
    assert "auto" in p.describe() and "bf16" in p.describe()


def test_auto_keeps_fp32_on_cpus_without_native_bf16():
    p = resolve_precision("auto", CPU, {"avx2", "fma", "avx512f"})  # AVX-512 alone emulates bf16
    assert p.mode == "no" and p.describe().startswith("fp32")


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_of_the_slowdown():
    p = resolve_precision("bf16", CPU, {"avx2"})
    assert p.mode == "bf16"  # the user's choice stands
    assert "20x slower" in p.warning and "mixed_precision" in p.warning
    assert not resolve_precision("bf16", CPU, {"avx512_bf16"}).warning
    assert resolve_precision("no", CPU, {"avx512_bf16"}).mode == "no"


def test_auto_keeps_fp32_under_deepspeed():
    """DeepSpeed's bf16 mode casts the weights, not the stages' fp32 inputs: auto stays fp32 there."""
    p = resolve_precision("auto", CPU, {"avx512_bf16"}, deepspeed=True)
    assert p.mode == "no" and "DeepSpeed" in p.describe()


def test_auto_is_the_default_and_bad_values_are_named():
    assert RunConfig().mixed_precision == "auto"
    with pytest.raises(ValueError, match="mixed_precision"):
        RunConfig(mixed_precision="fp8")


@pytest.mark.slow
def test_stage_says_which_precision_it_picked(tmp_path):
    native, why = native_bf16(CPU)
    cmd = [sys.executable, "-m", "pipelines.pretrain", f"output_dir={tmp_path}", "epochs=1", "warmup_epochs=0",
           "data.train=shards/cifar10/test-000000.tar", "data.val=", "data.num_workers=1", "batch_size=64",
           "model_overrides.depth=1", "progress=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{'bf16 autocast' if native else 'fp32'} (auto: {why})" in proc.stdout
