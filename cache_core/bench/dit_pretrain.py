"""Pretrain the built-in DiT on the digits set (`python train.py mode=pretrain model=dit`).

DDPM's epsilon objective: per image t ~ U{0, T-1}, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, loss =
MSE(eps_theta(x_t, t, y), eps); the class is replaced by "no class" with probability `class_dropout` (so the sampler
may use classifier-free guidance). AdamW, linear warm-up then cosine decay, and an exponential moving average of the
weights (what is saved and sampled: EMA weights give markedly cleaner samples for small diffusion models). One
training run, top to bottom, in `train_dit`; a log line every `log_every` steps; the EMA model is saved every
`save_every` steps and at the end, so a stopped run keeps what it learned (continue it with `init_from`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cache_core.checkpoint import save_checkpoint
from cache_core.image.data import digits
from cache_core.models.dit import DiTConfig, DiTModel

log = logging.getLogger(__name__)


@dataclass
class DiTTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    max_minutes: float | None = 40.0
    log_every: int = 50
    save_every: int = 500
    init_from: str | None = None


def lr_at(step: int, cfg: DiTTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_loss(model: DiTModel, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                   ) -> torch.Tensor:
    cfg = model.config
    B = images.shape[0]
    t = torch.randint(0, cfg.train_timesteps, (B,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    abar = model.alphas_cumprod[t].float().view(B, 1, 1, 1)
    noisy = abar.sqrt() * images + (1 - abar).sqrt() * noise
    drop = torch.rand(B, generator=generator) < cfg.class_dropout
    labels = torch.where(drop, cfg.n_classes, labels)
    return torch.nn.functional.mse_loss(model(noisy, t, labels), noise)


def train_dit(model_cfg: DiTConfig, cfg: DiTTrainConfig, out_dir: str | Path, run: Any = None) -> dict[str, Any]:
    """Train a DiT on the digits train split and save its EMA weights to out_dir; returns the training metrics."""
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = DiTModel(model_cfg)
    model.reset_parameters()
    if cfg.init_from:
        from cache_core.checkpoint import load_model

        init = load_model(cfg.init_from)
        if not isinstance(init, DiTModel) or init.config != model_cfg:
            raise ValueError(f"init_from={cfg.init_from} is not a DiT with config {model_cfg}; make them match")
        model.load_state_dict(init.state_dict())
        log.info("initialised from %s", cfg.init_from)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    images, labels = digits("train", model_cfg.image_size)
    val_images, val_labels = digits("validation", model_cfg.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("pretraining DiT %s (%.2fM parameters) on %d digits -> %s", model_cfg, n_params / 1e6, len(images),
             out_dir)
    extra = {"pretrain": asdict(cfg), "data": "sklearn digits (8x8), train split"}
    started, step, history = time.time(), 0, []
    running = None

    def save(final: bool) -> None:
        val = validation_loss(ema, val_images, val_labels)
        history.append({"step": step, "val_loss": val, "minutes": (time.time() - started) / 60})
        save_checkpoint(ema, out_dir, extra={**extra, "step": step, "val_loss": val, "final": final})
        log.info("step %d: validation loss (EMA) %.4f; saved %s", step, val, out_dir)
        if run is not None:
            run.log({"val/loss": val}, step=step)

    model.train()
    while step < cfg.steps:
        if cfg.max_minutes and time.time() - started > cfg.max_minutes * 60:
            log.info("max_minutes=%s reached at step %d", cfg.max_minutes, step)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        loss = diffusion_loss(model, images[batch], labels[batch], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade out fast
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e (%.1f min)", step, cfg.steps, running, lr_at(step, cfg),
                     (time.time() - started) / 60)
            if run is not None:
                run.log({"train/loss": running, "train/lr": lr_at(step, cfg)}, step=step)
        if step % cfg.save_every == 0:
            save(final=False)
    if not history or history[-1]["step"] != step:
        save(final=True)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    return {"checkpoint": str(out_dir), "steps": step, "parameters": n_params, "train_minutes":
            (time.time() - started) / 60, "final_loss": running, "history": history, "checkpoint_bytes": size}


@torch.no_grad()
def validation_loss(model: DiTModel, images: torch.Tensor, labels: torch.Tensor, repeats: int = 4) -> float:
    """The epsilon MSE on the validation split with a fixed noise draw (comparable across checkpoints)."""
    generator = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [diffusion_loss(model, images, labels, generator).item() for _ in range(repeats)]
    return sum(losses) / len(losses)


def run(cfg: Any) -> dict[str, Any]:
    """`python train.py mode=pretrain experiment=dit`: the DiT per cfg.model / cfg.pretrain, then the digit classifier
    the quality metrics use, both into <pretrain.output_dir>/<pretrain.name>/."""
    from cache_core.bench import tracking
    from cache_core.image.metrics import CLASSIFIER_FILE, save_classifier, train_classifier

    p = cfg.pretrain
    out_dir = Path(p.output_dir) / p.name
    run_ = tracking.start_run(cfg.logger, "pretrain", cfg)
    try:
        result = train_dit(cfg.model.to_model_config(), p.train_config(), out_dir, run_)
        classifier, accuracy = train_classifier(cfg.model.image_size, steps=p.classifier_steps, seed=p.seed)
        save_classifier(classifier, out_dir / CLASSIFIER_FILE, accuracy)
        log.info("digit classifier: test accuracy %.4f -> %s", accuracy, out_dir / CLASSIFIER_FILE)
        result["classifier_test_accuracy"] = accuracy
        run_.summary({"classifier_test_accuracy": accuracy, "final_loss": result["final_loss"]})
        return result
    finally:
        run_.finish()


if __name__ == "__main__":  # a quick way to start the built-in recipe outside Hydra
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="checkpoints/dit")
    parser.add_argument("--steps", type=int, default=DiTTrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=DiTTrainConfig.max_minutes)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    print(train_dit(DiTConfig(), DiTTrainConfig(steps=args.steps, max_minutes=args.minutes), args.out))
