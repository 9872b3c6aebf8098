"""Training-step throughput of our MAE against HuggingFace ``ViTMAEForPreTraining``,
eager and under ``torch.compile``, in fp32 and (ours) bf16 autocast, on the CPU.

One step is forward (loss), backward and a fused AdamW update. Every model gets the same
configuration, the same input batch and the same masking noise, so they do the same
arithmetic; only the implementations differ. After warm-up steps (which compile the
compiled variants) the timed steps go round the variants, the order rotated each round,
so that drift in the machine falls on all alike. The report gives each variant's median
step, img/s, the GFLOP/s of our arithmetic (torch's FlopCounterMode), that rate as a
share of the machine's fp32 GEMM ceiling measured first in the same run (best of
``torch.mm`` and oneDNN on 4096 x 4096), the ratios, and how many cores other processes
kept busy meanwhile (from /proc/stat): times taken while that is well above zero are
inflated and should be rerun.

    python benchmarks/pretrain_step.py                      # both cases, every variant, 2 threads
    python benchmarks/pretrain_step.py --cases cifar --variants ours_compiled,hf,hf_compiled --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from mae.models import MAEConfig, create_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One benchmark setting: a preset, its batch size and default number of timed steps."""

    preset: str
    batch: int
    iters: int


CASES: dict[str, Case] = {
    "base": Case("mae_vit_base_patch16", batch=8, iters=5),
    "cifar": Case("mae_vit_tiny_patch4_32", batch=64, iters=15),
}


@dataclass
class Variant:
    """One way to run a step: whose model, compiled or not, in which precision."""

    name: str
    model: nn.Module
    loss: LossFn
    opt: torch.optim.Optimizer
    bf16: bool = False


@dataclass
class Result:
    """Median step times of every variant for one case, and the arithmetic rate of ours."""

    case: str
    preset: str
    batch: int
    img_size: int
    iters: int
    params_ours: int
    params_peer: int
    gflop_per_step: float  # forward + backward of our model, counted by torch's FlopCounterMode
    step_s: dict[str, float]  # median per variant
    img_s: dict[str, float]
    other_load: float | None  # CPU cores other processes used while timing; None if unknown
    times: dict[str, list[float]]  # every timed step, seconds, in order


# ------------------------------------------------------------------------- the models


def peer_config(cfg: MAEConfig) -> ViTMAEConfig:
    """The ``ViTMAEConfig`` that describes the same network as ``cfg``, with SDPA attention."""
    return ViTMAEConfig(
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_chans,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        qkv_bias=True,
        layer_norm_eps=1e-6,  # as our blocks; HF's default is 1e-12 (same cost either way)
        hidden_act="gelu",  # exact GELU, as nn.GELU in ours
        attn_implementation="sdpa",
    )


def peer_model(cfg: MAEConfig) -> ViTMAEForPreTraining:
    """HF's ``ViTMAEForPreTraining`` for ``cfg``'s network, initialised as HF's own code intends.

    In transformers 5.x ``post_init`` skips ``ViTMAEEmbeddings.initialize_weights`` (the patch
    projection is already marked initialised) and zeroes the decoder's position table, so both
    frozen sin-cos tables stay zero: a model without position information, whose MAE loss
    stalls near the plateau of predicting the mean patch. Rerunning HF's two initialisers gives
    the sin-cos tables, the Xavier patch projection and the 0.02-normal tokens of the official
    code. Step time is the same either way; what a model learns is not.
    """
    model = ViTMAEForPreTraining(peer_config(cfg))
    embeddings, decoder = model.vit.embeddings, model.decoder
    if not embeddings.position_embeddings.any() or not decoder.decoder_pos_embed.any():
        embeddings.patch_embeddings.projection._is_hf_initialized = False
        with torch.no_grad():
            embeddings.initialize_weights()
            decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    return model.train()


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Both sides' optimiser: fused AdamW(lr 1e-4, betas (0.9, 0.95), wd 0.05). Fused is what
    the project's stages build and what HF's Trainer picks by default (adamw_torch_fused)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def build_variants(preset: str, names: list[str]) -> tuple[list[Variant], nn.Module, nn.Module]:
    """The requested variants; every model starts from the same seed, so compiled and eager
    copies of one implementation hold equal weights."""
    variants = []
    ours_ref = peer_ref = None
    for name in names:
        torch.manual_seed(0)
        if name.startswith("ours"):
            model = create_model(preset).train()
            ours_ref = ours_ref or model

            def loss(imgs: torch.Tensor, noise: torch.Tensor, m: nn.Module = model) -> torch.Tensor:
                return m(imgs, noise=noise)[0]
        else:
            model = peer_model(create_model(preset).cfg)
            if model.config._attn_implementation != "sdpa":
                raise RuntimeError(f"ViTMAE was built with {model.config._attn_implementation!r} attention, not sdpa")
            peer_ref = peer_ref or model

            def loss(imgs: torch.Tensor, noise: torch.Tensor, m: nn.Module = model) -> torch.Tensor:
                return m(pixel_values=imgs, noise=noise).loss
        opt = adamw(model)
        if "compiled" in name:
            model.compile(dynamic=False)
        variants.append(Variant(name, model, loss, opt, bf16="bf16" in name))
    return variants, ours_ref, peer_ref


VARIANTS = {
    "ours": "this project, eager, fp32",
    "ours_compiled": "this project, torch.compile, fp32",
    "ours_bf16": "this project, eager, bf16 autocast",
    "ours_compiled_bf16": "this project, torch.compile, bf16 autocast",
    "hf": "HF ViTMAEForPreTraining, eager, fp32",
    "hf_compiled": "HF ViTMAEForPreTraining, torch.compile, fp32",
}


# --------------------------------------------------------------------------- timing


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s the whole host was busy, CPU s of this process); None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            jiffies = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


def other_load(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Mean number of cores that processes other than this one kept busy between two snapshots."""
    if start is None or end is None:
        return None
    (w0, b0, o0), (w1, b1, o1) = start, end
    return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


def timed_step(v: Variant, imgs: torch.Tensor, noise: torch.Tensor) -> float:
    """One forward, backward and optimiser step; returns its wall time in seconds."""
    start = time.perf_counter()
    v.opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.bf16):
        loss = v.loss(imgs, noise)
    loss.backward()
    v.opt.step()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"{v.name}: loss is {loss.item()}")
    return elapsed


def step_gflop(model: nn.Module, imgs: torch.Tensor, noise: torch.Tensor) -> float:
    """GFLOP of one forward and backward pass (matmuls and attention), by torch's counter
    (on the plain ``F.linear`` path: the counter does not know the oneDNN op)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.backends.mkldnn.flags(enabled=False):
        model(imgs, noise=noise)[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def gemm_ceiling(n: int = 4096, reps: int = 3) -> dict[str, float]:
    """fp32 GFLOP/s of an n x n x n product by torch.mm (MKL here) and by oneDNN; best of reps."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    runs = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        runs["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    out = {}
    for name, fn in runs.items():
        fn()
        best = min(_time(fn) for _ in range(reps))
        out[name] = 2 * n**3 / best / 1e9
    return out


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name: str, case: Case, variants: list[str], iters: int, warmup: int) -> Result:
    """Warm every variant up (compiling the compiled ones), then time ``iters`` rounds, each
    running every variant once, the order rotated round by round."""
    runners, ours, peer = build_variants(case.preset, variants)
    cfg = create_model(case.preset).cfg
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(case.batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    noise = torch.rand(case.batch, cfg.num_patches, generator=g)  # the same masks for all
    for v in runners:
        for _ in range(warmup):
            timed_step(v, imgs, noise)
    gflop = step_gflop(create_model(case.preset).train(), imgs, noise)
    times: dict[str, list[float]] = {v.name: [] for v in runners}
    start = cpu_snapshot()
    for r in range(iters):
        for i in range(len(runners)):
            v = runners[(i + r) % len(runners)]
            times[v.name].append(timed_step(v, imgs, noise))
    load = other_load(start, cpu_snapshot())
    step_s = {k: statistics.median(t) for k, t in times.items()}
    return Result(
        case=name, preset=case.preset, batch=case.batch, img_size=cfg.img_size, iters=iters,
        params_ours=count(ours) if ours is not None else 0, params_peer=count(peer) if peer is not None else 0,
        gflop_per_step=gflop, step_s=step_s, img_s={k: case.batch / s for k, s in step_s.items()},
        other_load=load, times=times,
    )  # fmt: skip


# -------------------------------------------------------------------------- reporting


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict[str, str | int | float]:
    """What the numbers were measured on, with the 1-minute load average when it starts."""
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_1min": round(os.getloadavg()[0], 2),
        "commit": _commit(),
    }


def _commit() -> str:
    """The checkout's commit, with "+dirty" when files differ from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def describe(r: Result, ceiling: float) -> str:
    """A few lines on one case: the variants' step times, our arithmetic rate, the load."""
    lines = [f"[{r.case}] {r.preset}, batch {r.batch}, {r.iters} timed steps each; params ours {r.params_ours:,}"
             f" / ViTMAE {r.params_peer:,}; {r.gflop_per_step:.1f} GFLOP per step (forward + backward)"]
    for name, t in r.times.items():
        rate = r.gflop_per_step / r.step_s[name]
        lines.append(f"  {name:20s} {1e3 * r.step_s[name]:8.1f} ms  {r.img_s[name]:8.1f} img/s  "
                     f"{rate:6.1f} GFLOP/s ({100 * rate / ceiling:.0f}% of the fp32 GEMM ceiling)  "
                     f"min-max {1e3 * min(t):.0f}-{1e3 * max(t):.0f} ms")  # fmt: skip
    for ours, peer in RATIOS:
        if ours in r.img_s and peer in r.img_s:
            lines.append(f"  {ours} / {peer}: {r.img_s[ours] / r.img_s[peer]:.2f}x")
    if r.other_load is not None:
        lines.append(f"  other load  {r.other_load:.2f} cores busy with other processes while timing")
        if r.other_load > 0.25:
            lines.append("  warning: the machine was shared while timing; these times are inflated and noisy")
    return "\n".join(lines)


# (ours, peer) pairs reported as ratios of img/s; above 1 means ours is faster
RATIOS = [("ours", "hf"), ("ours_compiled", "hf"), ("ours_compiled", "hf_compiled"), ("ours_bf16", "hf"),
          ("ours_compiled_bf16", "hf")]


def markdown_table(results: list[Result], ceiling: float) -> str:
    """One row per case and variant: img/s, GFLOP/s, share of the GEMM ceiling, ratio to HF eager."""
    rows = ["| case | variant | step ms | img/s | GFLOP/s | of fp32 GEMM ceiling | / HF eager | / HF compiled |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        for name in r.step_s:
            rate = r.gflop_per_step / r.step_s[name]
            vs = [f"{r.img_s[name] / r.img_s[p]:.2f}" if p in r.img_s else "" for p in ("hf", "hf_compiled")]
            rows.append(f"| {r.case} | {name} | {1e3 * r.step_s[name]:.0f} | {r.img_s[name]:.1f} | {rate:.1f} | "
                        f"{100 * rate / ceiling:.0f}% | {vs[0]} | {vs[1]} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cifar,base", help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per variant (default: per case)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compiles)")
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    args = ap.parse_args()

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in CASES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown case(s) or variant(s) {', '.join(unknown)}")
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    gemm = gemm_ceiling()
    ceiling = max(gemm.values())
    print("fp32 GEMM 4096^3: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in gemm.items()) + f"; ceiling {ceiling:.1f}")

    results = []
    for name in names:
        case = CASES[name]
        result = run_case(name, case, variants, args.iters or case.iters, args.warmup)
        results.append(result)
        print(describe(result, ceiling))
    print()
    print(markdown_table(results, ceiling))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "gemm_gflops": gemm, "results": [asdict(r) for r in results]}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
