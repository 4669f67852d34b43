"""Train the Learning-to-Cache static router (Ma et al. 2024) of the built-in DiT: the learned-static baseline.

For every denoising step i >= 1 of the sampler's schedule and every layer l, one score beta[i, l] = sigmoid(theta)
in [0, 1]. With the DiT frozen, along uncached trajectories (validation-split classes, seeded noise), the step-i
forward mixes each layer's fresh residual update with the update it had at step i - 1:
    x_{l+1} = x_l + beta[i, l] * f_l(x_l) + (1 - beta[i, l]) * delta_l^{i-1}
and the loss is MSE(mixed noise prediction, uncached noise prediction) + l1 * mean(beta): L2C's objective, which
pulls scores towards reuse where the output does not need the layer. `LearningToCache(threshold)` turns the scores
into a schedule (layer l runs at step i when beta >= threshold). The first step always runs in full.

    python -m cache_core.image.router --steps 25 --out checkpoints/policies/dit_router.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from cache_core.image.heuristics import ROUTER_FORMAT
from cache_core.image.session import ddim_timesteps, ddim_update, initial_noise
from cache_core.models.dit import DiTModel

log = logging.getLogger(__name__)


def _trajectory(model: DiTModel, labels: torch.Tensor, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per step of an uncached trajectory: x_t, t, the eps prediction and every layer's residual update."""
    timesteps = ddim_timesteps(model.config.train_timesteps, steps).tolist()
    x = initial_noise(model, labels.shape[0], seed)
    out = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            eps, _, _, updates = model(x, tt, labels, return_state=True)
            out.append({"x": x, "t": tt, "eps": eps, "updates": updates})
            x = ddim_update(model, x, eps, t, timesteps[i + 1] if i + 1 < steps else -1)
    return out


def _mixed_eps(model: DiTModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, beta: torch.Tensor,
               cached: list[torch.Tensor]) -> torch.Tensor:
    c = model.conditioning(t, labels)
    h = model.tokens(x)
    for layer_index, layer in enumerate(model.layers):
        mod = layer.modulation(c)
        q, k, v = layer.qkv_of(h, mod)
        fresh = layer.update(h, q, k, v, mod)
        h = h + beta[layer_index] * fresh + (1 - beta[layer_index]) * cached[layer_index]
    return model.head(h, c)


def train_router(model: DiTModel, steps: int = 25, n_images: int = 32, iterations: int = 40, l1: float = 0.001,
                 lr: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """The router's scores (steps, n_layers) and its training record."""
    from cache_core.image.data import class_labels

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labels = class_labels(n_images, seed)
    started = time.time()
    trajectory = _trajectory(model, labels, steps, seed)
    L = model.config.n_layers
    scores = torch.ones(steps, L)
    losses = []
    for i in range(1, steps):
        theta = torch.full((L,), 2.0, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=lr)
        now, before = trajectory[i], trajectory[i - 1]
        for _ in range(iterations):
            beta = torch.sigmoid(theta)
            eps = _mixed_eps(model, now["x"], now["t"], labels, beta, before["updates"])
            loss = torch.nn.functional.mse_loss(eps, now["eps"]) + l1 * beta.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores[i] = torch.sigmoid(theta.detach())
        losses.append(float(loss.detach()))
        if i % 5 == 0:
            log.info("router step %d/%d: loss %.4f, mean score %.3f", i, steps - 1, losses[-1],
                     float(scores[i].mean()))
    return {"format": ROUTER_FORMAT, "steps": steps, "n_layers": L, "scores": scores.tolist(),
            "training": {"n_images": n_images, "iterations": iterations, "l1": l1, "lr": lr, "seed": seed,
                         "final_losses": losses, "seconds": time.time() - started}}


def save_router(router: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(router, indent=1) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    from cache_core.bench import REPO_ROOT
    from cache_core.checkpoint import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "checkpoints" / "dit"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=str(REPO_ROOT / "checkpoints" / "policies" / "dit_router.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(save_router(train_router(load_model(args.model), steps=args.steps), args.out))
