"""Measures of a trained encoder or classifier: top-k accuracy, k-NN on frozen features,
feature extraction across ranks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .collectives import all_ranks, sum_ranks
from .data.transforms import to_model_input
from .engine import Task
from .files import write_atomic


def lockstep(batches: Iterable[dict[str, Any]], accelerator: Any, pad_shape: tuple[int, ...]) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, real) until every rank has run out; a rank that runs out early gets padding
    batches, so all ranks make the same forward calls (ZeRO-3 gathers weights collectively)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if all_ranks(accelerator, batch is None):
            return
        if batch is None:
            yield {"image": torch.zeros(1, *pad_shape), "label": torch.zeros(1, dtype=torch.long)}, False
        else:
            yield batch, True


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many of the batch have their label among the top k, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [N, kmax]
    hits = top == labels.unsqueeze(1)
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate_classifier(
    forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict[str, Any]], accelerator: Any,
    pad_shape: tuple[int, ...],
) -> dict[str, float]:  # fmt: skip
    """top1 / top5 in percent and mean cross-entropy over all ranks' batches."""
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for batch, real in lockstep(batches, accelerator, pad_shape):
        x = to_model_input(batch["image"], accelerator.device)
        y = batch["label"].to(accelerator.device)
        with accelerator.autocast():
            logits = forward(x).float()
        if not real:
            continue
        c1, c5 = topk_correct(logits, y)
        correct1, correct5, total = correct1 + c1, correct5 + c5, total + len(y)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
    sums = torch.tensor([correct1, correct5, total, loss_sum], dtype=torch.float64, device=accelerator.device)
    c1, c5, n, loss = sum_ranks(accelerator, sums).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "val_loss": loss / n}


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[dict[str, Any]], accelerator: Any,
    pad_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This rank's features [N, D] (float32, CPU) and labels [N], in reading order."""
    feats, labels = [], []
    for batch, real in lockstep(batches, accelerator, pad_shape):
        with accelerator.autocast():
            f = features(to_model_input(batch["image"], accelerator.device))
        if not real:
            continue
        feats.append(f.float().cpu())
        labels.append(batch["label"])
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted k-NN on cosine similarity (Wu et al. 2018, as DINO evaluates): each of the
    k nearest training samples votes for its class with weight exp(similarity / T)."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [n, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, train_labels[idx], weights)
        c1, c5 = topk_correct(votes, test_labels[start : start + chunk])
        correct1, correct5 = correct1 + c1, correct5 + c5
    n = max(1, test_feats.shape[0])
    return {"knn_top1": 100.0 * correct1 / n, "knn_top5": 100.0 * correct5 / n}


class ClassificationTask(Task):
    """What the probe and fine-tune stages share: top-1/top-5 on the validation shards and
    a ``results.json`` at the end."""

    def __init__(self, accelerator: Any, val: Any, pad_shape: tuple[int, ...]) -> None:
        self.acc, self.val, self.pad_shape = accelerator, val, pad_shape
        self.results: dict[str, float] = {}

    def score(self, net: torch.nn.Module) -> dict[str, float]:
        """``net`` in eval mode over the whole validation set (every rank takes part)."""
        was_training = net.training
        net.eval()
        self.val.set_epoch(0)
        metrics = evaluate_classifier(net, self.val, self.acc, self.pad_shape)
        net.train(was_training)
        return metrics

    def write_results(self, output_dir: Path) -> None:
        write_atomic(output_dir / "results.json", json.dumps(self.results, indent=1) + "\n")
        print("results: " + ", ".join(f"{k} {v:.2f}" for k, v in self.results.items()))
