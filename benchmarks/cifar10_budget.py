"""More learned per CPU-minute (issue 12): the project's CIFAR-10 recipe against HuggingFace's
ViTMAE trained the official way, each given the same wall-clock budget for pretraining on
this machine, then evaluated the same way.

    export MAE_DATASETS=DATASETS   # holds cifar10/{train,test}.tar.gz (benchmarks/datasets.py)
    python benchmarks/cifar10_budget.py --minutes 40 --data DATA --work OUT/budget
    python benchmarks/cifar10_budget.py --minutes 10 --seed 1 --arms project --work OUT/budget-s1
    python benchmarks/cifar10_budget.py --minutes 10 --arms project --set mask_ratio=0.5 --work OUT/budget-m05

peer      ``ViTMAEForPreTraining`` with the CIFAR preset's shape (ViT-Tiny encoder, 192 wide, 12
          deep, 3 heads, 4 px patches at 32 px; decoder 128 x 2, 4 heads; norm-pix loss; mask
          0.75), fixed, not tuned: torchvision ImageFolder + DataLoader (1 worker, batch 128,
          shuffle, drop_last), RandomResizedCrop(32, 0.2-1, bicubic) + flip + CIFAR mean/std,
          AdamW (0.9, 0.95), weight decay 0.05 on weight matrices only (none on norms, biases,
          cls and mask tokens), lr 1.5e-3, linear warm-up over 5% of the steps the budget
          allows, cosine to 0, fp32, 2 threads. The step count is estimated from the running
          mean step time and frozen at step 50; training stops when the budget is spent.
project   ``accelerate launch -m pipelines.pretrain --config pipelines/configs/mae_vit_tiny_cifar10.yaml``
          on shards of the same 50,000 images, ``max_minutes`` = the budget.
random    the preset's encoder at initialisation: the floor.

Evaluation, the same for every arm: frozen features of the 50,000 train and 10,000 test
images at their native 32 px (no resize or crop), each arm normalised as it trained, under
bf16 autocast where the CPU multiplies bf16 natively (fp32 otherwise); the
final LayerNorm's tokens, cls token and the mean of the patch tokens (HF's ViTMAE shuffles
patches even at mask ratio 0; neither feature depends on that order). k-NN (k 20, cosine,
T 0.07) and the project's cached linear probe (BatchNorm without affine + linear, LARS, 90
epochs, batch 256, lr 6.4, 10 warm-up epochs) on each. The budget counts each arm's
training loop from its first batch request to its last step; start-up and evaluation are
timed apart. Results: ``benchmarks/results/cifar10_budget.json`` and ``cifar10_budget.png``
(loss against minutes) unless ``--results`` says elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.datasets import require  # noqa: E402
from benchmarks.pretrain_step import cpu_name, peer_config, peer_model  # noqa: E402
from mae.files import write_atomic  # noqa: E402
from mae.models.mae_vit import preset_config  # noqa: E402
from mae.optim import lr_at, param_groups  # noqa: E402
from mae.precision import cpu_flags  # noqa: E402

CIFAR = "cifar10/{part}.tar.gz"  # under $MAE_DATASETS
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PRESET = "mae_vit_tiny_patch4_32"
RECIPE = ROOT / "pipelines" / "configs" / "mae_vit_tiny_cifar10.yaml"


def machine() -> str:
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return f"{cpu_name()}, {os.cpu_count()} cores, {' '.join(simd)}, torch {torch.__version__}"


# -- data


def extract(work: Path) -> Path:
    """The CIFAR-10 JPEG class folders, train/ and test/, under ``work``/images."""
    images = work / "images"
    for part in ("train", "test"):
        if not (images / part).is_dir():
            images.mkdir(parents=True, exist_ok=True)
            with tarfile.open(require(CIFAR.format(part=part), "the CIFAR-10 race")) as tar:
                tar.extractall(images, filter="data")
    return images


def shards(images: Path, data: Path) -> tuple[str, str]:
    """Shuffled shards of the same images for the project arm (built once)."""
    for part, prefix in (("train", "train"), ("test", "val")):
        if not (data / f"{prefix}-index.json").exists():
            subprocess.run([sys.executable, "-m", "shards", "build", str(images / part), str(data), "--prefix", prefix,
                            "--samples-per-shard", "1250", "--shuffle"], cwd=ROOT, check=True)  # fmt: skip
    n = len(list(data.glob("train-*.tar")))
    return f"{data}/train-{{000000..{n - 1:06d}}}.tar", str(data)


def pixels(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder as uint8 [N, 3, 32, 32], with its labels (decoded once for all arms)."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder))
    images = torch.empty(len(ds), 3, 32, 32, dtype=torch.uint8)
    for i, (path, _) in enumerate(ds.samples):
        with Image.open(path) as img:
            images[i] = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)
    return images, torch.tensor(ds.targets)


# -- the peer arm


def train_peer(images: Path, minutes: float, seed: int, out: Path, peak: float = 1.5e-3) -> dict:
    """HF ViTMAE, trained as the official code trains, until ``minutes`` are spent."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    torch.manual_seed(seed)
    model = peer_model(preset_config(PRESET))
    tf = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])  # fmt: skip
    loader = DataLoader(datasets.ImageFolder(str(images / "train"), tf), batch_size=128, shuffle=True, num_workers=1,
                        drop_last=True, persistent_workers=True)  # fmt: skip
    tokens = [n for n, _ in model.named_parameters() if n.endswith(("cls_token", "mask_token"))]
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, tokens), lr=0.0, betas=(0.9, 0.95))
    budget = minutes * 60.0
    curve, step, total, warmup = [], 0, None, 1
    start = time.perf_counter()
    while not done(step, total, time.perf_counter() - start, budget):
        for x, _ in loader:
            elapsed = time.perf_counter() - start
            if done(step, total, elapsed, budget):
                break
            if total is None and step:  # estimated from the running mean step time, frozen at step 50
                estimate = max(1, int(budget / (elapsed / step)))
                warmup = max(1, round(0.05 * estimate))
                total = estimate if step == 50 else None
            lr = lr_at(step, base_lr=peak, warmup_steps=warmup, total_steps=total or 10**9)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(pixel_values=x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 20 == 0:
                curve.append({"step": step, "elapsed_s": time.perf_counter() - start, "loss": loss.item()})
    spent = time.perf_counter() - start
    print(f"peer: {step} steps ({step * 128} images) in {spent:.0f} s, planned {total}, last loss {curve[-1]['loss'] if curve else float('nan'):.4f}",
          flush=True)  # fmt: skip
    write_atomic(out / "peer_encoder.pt", lambda p: torch.save(model.vit.state_dict(), p))
    return {"images_seen": step * 128, "steps": step, "train_s": spent, "curve": curve}


def done(step: int, total: int | None, elapsed: float, budget: float) -> bool:
    return elapsed >= budget or (total is not None and step >= total)


class PeerFeatures(nn.Module):
    """HF ViTMAE's encoder at mask ratio 0: final-normed tokens (patch order shuffled)."""

    def __init__(self, state: Path) -> None:
        super().__init__()
        from transformers import ViTMAEModel

        config = peer_config(preset_config(PRESET))
        config.mask_ratio = 0.0
        self.vit = ViTMAEModel(config)
        self.vit.load_state_dict(torch.load(state, weights_only=True))
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).last_hidden_state


# -- the project arm


def train_project(shard_train: str, minutes: float, seed: int, out: Path, overrides: list[str]) -> dict:
    run = out / "project"
    cmd = ["accelerate", "launch", "-m", "pipelines.pretrain", "--config", str(RECIPE), f"output_dir={run}",
           f"data.train={shard_train}", "data.val=", f"max_minutes={minutes:g}", f"seed={seed}", "progress=false", *overrides]  # fmt: skip
    print("project:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env=dict(os.environ, ACCELERATE_USE_CPU="true"))
    wall = time.perf_counter() - start
    from mae.metrics import read_metrics

    records = [m for m in read_metrics(run) if "loss" in m]
    batch = yaml.safe_load((run / "config.yaml").read_text())["batch_size"]
    steps = records[-1]["step"]
    print(f"project: {steps} steps ({steps * batch} images), loop {records[-1]['elapsed_s']:.0f} s, process {wall:.0f} s",
          flush=True)  # fmt: skip
    curve = [{"step": m["step"], "elapsed_s": m["elapsed_s"], "loss": m["loss"]} for m in records]
    return {"images_seen": steps * batch, "steps": steps, "train_s": records[-1]["elapsed_s"], "process_s": wall,
            "curve": curve}  # fmt: skip


class ProjectFeatures(nn.Module):
    """The exported encoder in timm: final-normed tokens."""

    def __init__(self, encoder: Path) -> None:
        super().__init__()
        from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from mae.encoder import create_vit

        self.vit = create_vit("auto", str(encoder), num_classes=0, global_pool="token")
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)


def random_encoder(out: Path, seed: int) -> Path:
    """The preset's encoder as MAE initialises it, exported as the stage exports a trained one."""
    from mae.models.mae_vit import MaskedAutoencoderViT
    from mae.pretrain import save_encoder

    torch.manual_seed(seed)
    return save_encoder(MaskedAutoencoderViT(preset_config(PRESET)), out / "random_encoder.safetensors")


# -- the evaluation


@torch.inference_mode()
def features(net: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Under bf16 autocast where the CPU multiplies bf16 natively (every arm alike), else fp32."""
    from mae.precision import native_bf16

    net.eval()
    bf16 = native_bf16(torch.device("cpu"))[0]
    mean = torch.tensor(net.mean).view(1, 3, 1, 1)
    std = torch.tensor(net.std).view(1, 3, 1, 1)
    cls, avg = [], []
    for chunk in images.split(1000):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = net((chunk.float() / 255 - mean) / std).float()
        cls.append(tokens[:, 0])
        avg.append(tokens[:, 1:].mean(1))
    return {"cls": torch.cat(cls), "avg": torch.cat(avg)}


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 out: Path) -> float:  # fmt: skip
    """The project's cached probe (``mae.linprobe.fit_head_on_features``) with its defaults."""
    from accelerate import Accelerator

    from mae.data.features import FeatureLoader
    from mae.engine import base_lr
    from mae.linprobe import LinprobeConfig, ProbeHead, ProbeTask, fit_head_on_features, lars_for

    out.mkdir(parents=True, exist_ok=True)
    cfg = LinprobeConfig(output_dir=str(out), progress=False, report_to="none", log_every=1000, eval_every=1000)
    acc = Accelerator(cpu=True)
    head = ProbeHead(train.shape[1], 10)
    loader = FeatureLoader(train, train_labels, batch_size=cfg.batch_size, seed=cfg.seed)
    result = fit_head_on_features(cfg, acc, head, lars_for(head, base_lr(cfg, 1), cfg.weight_decay), loader,
                                  [test, test_labels], ProbeTask(acc, None, {}, (train.shape[1],)))  # fmt: skip
    return result.last_metrics["top1"]


def evaluate(net: nn.Module, data: dict, out: Path) -> dict[str, float]:
    from mae.evaluation import knn_classify

    start = time.perf_counter()
    train, test = features(net, data["train"][0]), features(net, data["test"][0])
    scores = {}
    for pool in ("cls", "avg"):
        knn = knn_classify(train[pool], data["train"][1], test[pool], data["test"][1], num_classes=10, k=20,
                           temperature=0.07)  # fmt: skip
        scores[f"knn_{pool}"] = round(knn["knn_top1"], 2)
        scores[f"linear_{pool}"] = round(linear_probe(train[pool], data["train"][1], test[pool], data["test"][1],
                                                      out / f"probe_{pool}"), 2)  # fmt: skip
    scores["eval_s"] = round(time.perf_counter() - start, 1)
    print("  " + ", ".join(f"{k} {v}" for k, v in scores.items()), flush=True)
    return scores


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, colour in (("project", "tab:blue"), ("peer", "tab:orange")):
        curve = results.get(arm, {}).get("curve")
        if curve:
            ax.plot([c["elapsed_s"] / 60 for c in curve], [c["loss"] for c in curve], color=colour, label=arm, lw=1)
    ax.set(xlabel="minutes of training", ylabel="training loss (norm-pix MSE, masked patches)",
           title=f"CIFAR-10, {results['minutes']:g} min on {results['machine'].split(',')[0]}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=40.0, help="pretraining budget per arm")
    ap.add_argument("--arms", default="peer,project,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cifar10_budget")
    ap.add_argument("--data", type=Path, default=None, help="shard folder (built from the JPEGs when empty)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                    help="folder for cifar10_budget.json and .png")  # fmt: skip
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the project's recipe, to try one before changing the yaml")
    ap.add_argument("--eval-images", type=int, default=0, help="smoke runs: evaluate on about this many images per split")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    images = extract(args.work)
    shard_train, _ = shards(images, args.data or args.work / "shards")
    results: dict = {"minutes": args.minutes, "machine": machine(), "seed": args.seed, "recipe": RECIPE.read_text(),
                     "recipe_overrides": args.set}  # fmt: skip
    trained = {}
    if "peer" in arms:
        trained["peer"] = train_peer(images, args.minutes, args.seed, args.work)
    if "project" in arms:
        trained["project"] = train_project(shard_train, args.minutes, args.seed, args.work, args.set)
    print("decoding the evaluation images", flush=True)
    data = {"train": pixels(images / "train"), "test": pixels(images / "test")}
    if args.eval_images:  # a smoke run of the script: a spread-out subset, numbers meaningless
        data = {k: (x[:: len(x) // args.eval_images], y[:: len(y) // args.eval_images]) for k, (x, y) in data.items()}
    for arm in ("project", "peer", "random"):
        if arm not in arms:
            continue
        print(f"evaluating {arm}", flush=True)
        net = {"peer": lambda: PeerFeatures(args.work / "peer_encoder.pt"),
               "project": lambda: ProjectFeatures(args.work / "project" / "encoder.safetensors"),
               "random": lambda: ProjectFeatures(random_encoder(args.work, args.seed))}[arm]()  # fmt: skip
        results[arm] = {**evaluate(net, data, args.work / arm), **trained.get(arm, {})}
    args.results.mkdir(parents=True, exist_ok=True)
    write_atomic(args.results / "cifar10_budget.json", json.dumps(results, indent=1) + "\n")
    plot(results, args.results / "cifar10_budget.png")
    for arm in ("project", "peer", "random"):
        if arm in results:
            r = results[arm]
            best_knn, best_lin = max(r["knn_cls"], r["knn_avg"]), max(r["linear_cls"], r["linear_avg"])
            print(f"{arm:8s} k-NN {best_knn:.2f} linear {best_lin:.2f} (images seen {r.get('images_seen', 0)})")
    if "peer" in results and "project" in results:
        p, q = results["project"], results["peer"]
        for name in ("knn", "linear"):
            gap = max(p[f"{name}_cls"], p[f"{name}_avg"]) - max(q[f"{name}_cls"], q[f"{name}_avg"])
            print(f"project - peer, {name}: {gap:+.2f} points (target +5)")


if __name__ == "__main__":
    main()
