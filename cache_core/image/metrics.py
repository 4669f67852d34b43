"""Quality of cached samples: against the uncached sample from the same noise (PSNR, SSIM) and against the data
(a digit classifier trained here: accuracy of the samples as their conditioning class, and the Frechet distance
between sample and test-set features in the classifier's penultimate space).

The last one is computed like FID but in a small digit classifier's 64-d feature space, not Inception's: call it
"Frechet classifier distance" (FCD), never FID; its values are comparable only with each other. PSNR and SSIM come
from torchmetrics (SSIM with a 3x3 Gaussian window: the images are 8x8, too small for the usual 11x11), the Frechet
distance from torchmetrics' FID with the classifier as its feature extractor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cache_core.image.data import N_CLASSES, digits

CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_FORMAT = "blockreuse-digit-classifier"


class DigitClassifier(nn.Module):
    """MLP over the flattened image: features (penultimate, 64-d) -> class logits."""

    def __init__(self, image_size: int = 8, hidden: int = 128, features: int = 64):
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(),
                                  nn.Linear(hidden, features), nn.ReLU())
        self.head = nn.Linear(features, N_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(image_size: int = 8, steps: int = 1500, seed: int = 0, noise_std: float = 0.1
                     ) -> tuple[DigitClassifier, float]:
    """Train on the train split (light Gaussian-noise augmentation, so that slightly noisy samples are judged by
    their shape); returns the classifier and its test-split accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits("train", image_size)
    model = DigitClassifier(image_size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (128,), generator=generator)
        x = images[batch] + noise_std * torch.randn(images[batch].shape, generator=generator)
        loss = F.cross_entropy(model(x), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test_images, test_labels = digits("test", image_size)
    with torch.no_grad():
        accuracy = float((model(test_images).argmax(-1) == test_labels).float().mean())
    return model, accuracy


def save_classifier(model: DigitClassifier, path: str | Path, test_accuracy: float) -> Path:
    path = Path(path)
    meta = {"format": CLASSIFIER_FORMAT, "image_size": str(model.image_size), "test_accuracy": f"{test_accuracy:.4f}"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
    return path


def load_classifier(path: str | Path) -> DigitClassifier:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no digit classifier; `python train.py mode=pretrain model=dit` trains and saves one "
                         "beside the DiT")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types on a corrupt file
        raise ValueError(f"{path}: cannot read the classifier ({err}); the file is corrupt: retrain it") from err
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a {CLASSIFIER_FORMAT} file")
    model = DigitClassifier(int(meta["image_size"]))
    model.load_state_dict(tensors)
    return model.eval()


def classifier_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((classifier(images.cpu()).argmax(-1) == labels.cpu()).float().mean())


def frechet_classifier_distance(classifier: DigitClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Frechet distance between the Gaussians of sample and reference features (torchmetrics' FID computation with
    the digit classifier's feature extractor): FCD, not FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier.features(x).double()

    size = classifier.image_size
    metric = FrechetInceptionDistance(feature=Features(), input_img_size=(1, size, size))
    metric.update(reference.cpu().float(), real=True)
    metric.update(images.cpu().float(), real=False)
    return float(metric.compute())


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR (dB) per image against the reference, both in [-1, 1]; identical images give inf (capped at 100)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    value = peak_signal_noise_ratio(images.float().cpu(), reference.float().cpu(), data_range=(-1.0, 1.0),
                                    reduction="none", dim=(1, 2, 3))
    return value.clamp(max=100.0)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM per image against the reference (3x3 Gaussian window, data range 2)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images.float().cpu(), reference.float().cpu(), kernel_size=3,
                                               sigma=0.5, data_range=2.0, reduction="none")


def describe_classifier(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(Path(path), framework="pt") as f:
        return json.loads(json.dumps(f.metadata() or {}))
