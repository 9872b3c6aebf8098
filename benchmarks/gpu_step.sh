#!/usr/bin/env bash
# MAE pretraining steps on one CUDA GPU: ViT-B/16 and ViT-L/16 at 224 px, bf16 autocast,
# fused AdamW, torch.compile off and on; img/s, the SDPA kernel that ran, and MFU against
# the GPU's dense bf16 peak. Then the data path's img/s per CPU core on the same machine.
# About 5-7 minutes on an H100-class GPU (the compiles take most of it).
#
#   bash benchmarks/gpu_step.sh                       # from the repository root
#   BATCH=64 PEAK_TFLOPS=312 bash benchmarks/gpu_step.sh   # A100, or any GPU not in the table
#   DATA_SHARDS='/data/in1k/train-{000000..000127}.tar' bash benchmarks/gpu_step.sh
#
# Settings (environment): BATCH (per step, default 128), STEPS (timed, default 20),
# MODELS (default mae_vit_base_patch16,mae_vit_large_patch16), PEAK_TFLOPS (dense bf16
# peak; taken from the table below by GPU name when unset), DATA_SHARDS (default: the
# shipped CIFAR-10 sample, RandomResizedCrop to 224; its 32 px JPEGs decode far faster
# than ImageNet photos, so pass real shards for a real figure), DATA_WORKERS (default:
# min(8, cores)).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python - <<'PY'
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mae.models import create_model
from mae.optim import adamw, param_groups

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets (no sparsity).
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "A100": 312.0,
         "L40S": 362.0, "L4": 121.0}
if not torch.cuda.is_available():
    raise SystemExit("gpu_step.sh needs a CUDA GPU")
name = torch.cuda.get_device_name()
peak = float(os.environ["PEAK_TFLOPS"]) if os.environ.get("PEAK_TFLOPS") else next(
    (v for k, v in PEAKS.items() if k in name), None)
batch, steps = int(os.environ.get("BATCH", 128)), int(os.environ.get("STEPS", 20))
models = os.environ.get("MODELS", "mae_vit_base_patch16,mae_vit_large_patch16").split(",")
print(f"{name}; torch {torch.__version__}; bf16 peak {peak or 'unknown (set PEAK_TFLOPS)'} TFLOP/s; "
      f"batch {batch}, {steps} timed steps")
torch.backends.cuda.matmul.allow_tf32 = True

SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "cudnn": "_scaled_dot_product_cudnn_attention",
            "efficient": "_scaled_dot_product_efficient_attention", "math": "_scaled_dot_product_attention_math"}


def step(model, opt, imgs):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(imgs)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


rows = []
for preset in models:
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model(preset).cuda().train()
        opt = adamw(param_groups(model, 0.05, model.no_weight_decay()), lr=1e-4, device="cuda", betas=(0.9, 0.95))
        imgs = torch.randn(batch, 3, 224, 224, device="cuda")
        if not compiled:  # FLOPs and the attention kernel, from the eager model
            with FlopCounterMode(display=False) as counter:
                step(model, opt, imgs)
            flop = counter.get_total_flops()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(model, opt, imgs)
                torch.cuda.synchronize()
            seen = {e.key for e in prof.key_averages()}
            kernel = ", ".join(k for k, op in SDPA_OPS.items() if any(op in s for s in seen)) or "none found"
        start = time.perf_counter()
        if compiled:
            model.compile()
        for _ in range(3):  # warm-up (and compile)
            step(model, opt, imgs)
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        times = []
        for _ in range(steps):
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            step(model, opt, imgs)
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        s = statistics.median(times)
        mfu = flop / s / (peak * 1e12) if peak else float("nan")
        rows.append((preset, "on" if compiled else "off", kernel, s, batch / s, flop / s / 1e12, mfu, warm,
                     torch.cuda.max_memory_allocated() / 2**30))
        print(f"{preset} compile={'on' if compiled else 'off'}: {1e3 * s:.1f} ms/step, {batch / s:.0f} img/s, "
              f"{flop / s / 1e12:.0f} TFLOP/s, MFU {100 * mfu:.1f}%, SDPA {kernel}, warm-up {warm:.0f} s")
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

print("\n| model | compile | SDPA kernel | step ms | img/s | TFLOP/s | MFU (bf16 peak) | warm-up s | peak GiB |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for p, c, k, s, ips, tf, mfu, warm, mem in rows:
    print(f"| {p} | {c} | {k} | {1e3 * s:.1f} | {ips:.0f} | {tf:.0f} | {100 * mfu:.1f}% | {warm:.0f} | {mem:.1f} |")

# the data path alone: decode + RandomResizedCrop + flip + normalise, batches of 128, no GPU
from mae.data.loader import ShardLoader
from mae.data.transforms import pretrain_transform

shards = os.environ.get("DATA_SHARDS", "shards/cifar10/train-{000000..000007}.tar")
cores = os.cpu_count() or 1
workers = int(os.environ.get("DATA_WORKERS", min(8, cores)))
loader = ShardLoader(shards, pretrain_transform(224), batch_size=128, num_workers=workers, resampled=True,
                     samples_per_epoch=128 * 8 * workers)
loader.set_epoch(0)
it, n = iter(loader), 0
next(it)  # workers started
start = time.perf_counter()
for b in it:
    n += b["image"].shape[0]
wall = time.perf_counter() - start
print(f"\ndata path: {n / wall:.0f} img/s with {workers} workers = {n / wall / workers:.0f} img/s per core "
      f"({cores} cores; shards {shards})")
PY
