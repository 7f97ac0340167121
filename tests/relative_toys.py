"""Small parameters and a small task shared by the relative rule's and ES's tests."""

from __future__ import annotations

import torch

from learned_opt.tasks.base import Task
from learned_opt.tasks.families import MLPClassificationFamily


def small_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A 4×3 matrix and a zero bias."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.zeros(3))]


def small_task() -> Task:
    """A two-layer ReLU MLP on 3-class blobs (64 examples): seconds to run a population on."""
    family = MLPClassificationFamily(dataset="blobs", dim=4, classes=3, width=8, depth=2, activation="relu",
                                     n_train=64, batch_size=16)
    return family.sample(3)
