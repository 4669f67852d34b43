"""The built-in image set: scikit-learn's bundled handwritten digits (no download), as 8x8 images in [-1, 1].

Why digits: the set ships inside scikit-learn (1,797 8x8 grey-level images of 10 classes), so every machine has it;
its classes make "is the sample recognisable" measurable with a small classifier trained here; and at its native
8x8 with 1x1 patches it gives 64 patch tokens, the canvas length of the built-in text model, at a cost that trains on
two CPU cores (16x16 with 2x2 patches is the same token count; `image_size=16` upsamples bilinearly).
Procedurally drawn shapes were the alternative; digits have real intra-class variety, which makes the sampler's
per-image cache decisions matter.

Splits are fixed by a seeded, class-stratified permutation: train 70%, validation 10%, test 20%.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 8
N_CLASSES = 10
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(digits.target, dtype=torch.long)


def split_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Class-stratified indices of one split (the same for every caller with the same seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.cumsum([int(round(f * len(idx))) for f in SPLIT_FRACTIONS])[:-1]
        chosen.append(np.split(idx, cuts)[SPLITS.index(split)])
    return np.sort(np.concatenate(chosen))


def digits(split: str, image_size: int = IMAGE_SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 1, S, S) in [-1, 1], labels (n,)) of one split."""
    images, labels = _digits(image_size)
    idx = torch.as_tensor(split_indices(labels.numpy(), split, seed))
    return images[idx], labels[idx]


def class_labels(n: int, seed: int = 0) -> torch.Tensor:
    """n conditioning classes for sampling: each class equally often (round robin), in a seeded order."""
    if n < 1:
        raise ValueError(f"need at least one label, got n={n}")
    labels = torch.arange(n) % N_CLASSES
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
