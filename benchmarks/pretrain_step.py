"""Training-step throughput of our MAE against HuggingFace ``ViTMAEForPreTraining``.

One step is forward (loss), backward and an AdamW update, in fp32 on the CPU. Both
models get the same configuration, the same input batch and the same masking noise, so
they do the same arithmetic; only the implementations differ. After a few warm-up
steps the timed steps alternate between the two models, round by round, so that drift
in the machine (heat, other load) falls on both alike. The report gives the median step
of each, their ratio, the median of the per-round ratios, and how many cores other
processes kept busy meanwhile (from /proc/stat): on a shared machine, times taken while
that is well above zero are inflated and should be rerun.

    python benchmarks/pretrain_step.py                      # both cases, 2 threads
    python benchmarks/pretrain_step.py --cases cifar --iters 20 --json out.json
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
    "base": Case("mae_vit_base_patch16", batch=8, iters=7),
    "cifar": Case("mae_vit_tiny_patch4_32", batch=64, iters=20),
}


@dataclass
class Result:
    """Median step time and throughput of both models for one case."""

    case: str
    preset: str
    batch: int
    img_size: int
    iters: int
    params_ours: int
    params_peer: int
    trainable_ours: int
    trainable_peer: int
    attn_ours: str
    attn_peer: str
    step_s_ours: float
    step_s_peer: float
    img_s_ours: float
    img_s_peer: float
    ratio: float  # images/s ours / images/s peer; above 1 means ours is faster
    paired_ratio: float  # median over rounds of (peer step / ours step) within the round
    other_load: float | None  # CPU cores other processes used while timing; None if unknown
    times_ours: list[float]  # every timed step, seconds, in order
    times_peer: list[float]


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


def build_models(preset: str) -> tuple[nn.Module, LossFn, nn.Module, LossFn]:
    """Ours and the peer for ``preset``, each with a ``(imgs, noise) -> loss`` function."""
    ours = create_model(preset).train()
    peer = ViTMAEForPreTraining(peer_config(ours.cfg)).train()
    impl = peer.config._attn_implementation
    if impl != "sdpa":
        raise RuntimeError(f"ViTMAE was built with {impl!r} attention, not 'sdpa'")

    def ours_loss(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return ours(imgs, noise=noise)[0]

    def peer_loss(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return peer(pixel_values=imgs, noise=noise).loss

    return ours, ours_loss, peer, peer_loss


def count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, all of them or only those that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser of both models: AdamW(lr 1e-4, betas (0.9, 0.95), weight decay 0.05)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


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


def timed_step(loss_fn: LossFn, opt: torch.optim.Optimizer, imgs: torch.Tensor, noise: torch.Tensor) -> float:
    """One forward, backward and optimiser step; returns its wall time in seconds."""
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(imgs, noise)
    loss.backward()
    opt.step()
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()}")
    return elapsed


def run_case(name: str, case: Case, iters: int, warmup: int, seed: int = 0) -> Result:
    """Warm both models up, then time ``iters`` rounds that alternate which model goes first."""
    torch.manual_seed(seed)
    ours, ours_loss, peer, peer_loss = build_models(case.preset)
    cfg = ours.cfg
    imgs = torch.randn(case.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    noise = torch.rand(case.batch, cfg.num_patches)  # the same masks for both
    runners = [(ours_loss, adamw(ours)), (peer_loss, adamw(peer))]

    for _ in range(warmup):
        for loss_fn, opt in runners:
            timed_step(loss_fn, opt, imgs, noise)
    times: list[list[float]] = [[], []]
    start = cpu_snapshot()
    for r in range(iters):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # ABBA...: neither always runs first
        for i in order:
            times[i].append(timed_step(*runners[i], imgs, noise))
    load = other_load(start, cpu_snapshot())

    step_ours, step_peer = (statistics.median(t) for t in times)
    return Result(
        case=name, preset=case.preset, batch=case.batch, img_size=cfg.img_size, iters=iters,
        params_ours=count(ours), params_peer=count(peer),
        trainable_ours=count(ours, True), trainable_peer=count(peer, True),
        attn_ours="F.scaled_dot_product_attention", attn_peer=f"{peer.config._attn_implementation} (HF)",
        step_s_ours=step_ours, step_s_peer=step_peer,
        img_s_ours=case.batch / step_ours, img_s_peer=case.batch / step_peer,
        ratio=step_peer / step_ours, paired_ratio=statistics.median(p / o for o, p in zip(*times)),
        other_load=load, times_ours=times[0], times_peer=times[1],
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
    }


def describe(r: Result) -> str:
    """A few lines on one case: parameter counts, attention, spread of the step times, load."""
    same = "equal" if r.params_ours == r.params_peer else "DIFFERENT"
    lines = [
        f"[{r.case}] {r.preset}, batch {r.batch}, {r.iters} timed steps each",
        (
            f"  params      ours {r.params_ours:,} / ViTMAE {r.params_peer:,} ({same}); "
            f"trainable {r.trainable_ours:,} / {r.trainable_peer:,}"
        ),
        f"  attention   ours {r.attn_ours} / ViTMAE {r.attn_peer}",
        (
            f"  step s      ours {min(r.times_ours):.3f}-{max(r.times_ours):.3f} / "
            f"ViTMAE {min(r.times_peer):.3f}-{max(r.times_peer):.3f} (min-max); paired ratio {r.paired_ratio:.2f}"
        ),
    ]
    if r.other_load is not None:
        lines.append(f"  other load  {r.other_load:.2f} cores busy with other processes while timing")
        if r.other_load > 0.25:
            lines.append("  warning: the machine was shared while timing; these times are inflated and noisy")
    return "\n".join(lines)


def markdown_table(results: list[Result]) -> str:
    """The results as a markdown table, one row per case."""
    rows = [
        "| case | model | batch | step ms ours | step ms ViTMAE | img/s ours | img/s ViTMAE | ours/ViTMAE |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.case} | `{r.preset}` ({r.img_size}px) | {r.batch} | {1e3 * r.step_s_ours:.0f} | "
            f"{1e3 * r.step_s_peer:.0f} | {r.img_s_ours:.1f} | {r.img_s_peer:.1f} | {r.ratio:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="cifar,base", help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per model (default: per case)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    args = ap.parse_args()

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(" ".join(f"{k}={v}" for k, v in env.items()))

    results = []
    for name in names:
        case = CASES[name]
        result = run_case(name, case, args.iters or case.iters, args.warmup)
        results.append(result)
        print(describe(result))
    print()
    print(markdown_table(results))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": [asdict(r) for r in results]}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
