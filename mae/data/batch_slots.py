"""Handing uint8 batches from loader workers to the training process through shared memory
allocated once per epoch.

PyTorch's DataLoader moves each batch a worker returns into a fresh shared-memory segment:
one segment per batch, whose pages are faulted in anew every time. For a 64 x 3 x 224 x 224
uint8 batch that costs the worker about 7 ms, a tenth of its time on 500 x 375 photos
(BENCHMARKS.md, "Data path"). Here the training process maps the memory once, before the
workers start; each worker stacks its batches into slots of its own and sends only the
slot's number; the training process copies the batch out and frees the slot.

A worker has at most ``prefetch_factor`` batches in flight (the DataLoader asks for no more)
and may be stacking one more, so ``prefetch_factor + 1`` slots per worker never make it wait
on the training process. Each worker fills its slots in turn and the training process
receives one worker's batches in the order they were made, so a counting semaphore of free
slots per worker is the whole protocol; its acquire and release are also the memory
barriers that keep a slot's pixels from being overwritten while they are copied out.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

SHM = "/dev/shm"


@dataclass(frozen=True)
class SlotRef:
    """What a worker sends instead of a batch's pixels: where they are, and how many."""

    worker: int
    slot: int
    count: int


class BatchSlots:
    """``workers`` x ``slots`` batch buffers of uint8 [batch_size, 3, size, size] in shared memory."""

    def __init__(self, workers: int, slots: int, batch_size: int, size: int) -> None:
        self.images = torch.empty((workers, slots, batch_size, 3, size, size), dtype=torch.uint8).share_memory_()
        self.free = [multiprocessing.Semaphore(slots) for _ in range(workers)]
        self.slots = slots
        self._next = 0  # the next slot this worker process fills; each worker has its own copy

    @staticmethod
    def fit(workers: int, slots: int, batch_size: int, size: int) -> bool:
        """Whether the slots take at most half of the free shared memory. They stay mapped for
        the whole epoch, and containers often give /dev/shm only 64 MiB; where they do not
        fit, batches go PyTorch's own way."""
        try:
            st = os.statvfs(SHM)
        except OSError:
            return False
        return workers * slots * batch_size * 3 * size * size <= st.f_bavail * st.f_frsize // 2

    def put(self, images: list[torch.Tensor]) -> SlotRef:
        """In a worker: stack ``images`` into this worker's next slot once the training process freed it."""
        worker = get_worker_info().id
        slot = self._next
        self._next = (slot + 1) % self.slots
        self.free[worker].acquire()
        torch.stack(images, out=self.images[worker, slot, : len(images)])
        return SlotRef(worker, slot, len(images))

    def take(self, ref: SlotRef, pin: bool = False) -> torch.Tensor:
        """In the training process: the batch as a tensor of its own, and the slot freed."""
        view = self.images[ref.worker, ref.slot, : ref.count]
        out = torch.empty(view.shape, dtype=view.dtype, pin_memory=pin)
        out.copy_(view)
        self.free[ref.worker].release()
        return out
