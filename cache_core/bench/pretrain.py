"""Pretrain the built-in diffusion LM on the synthetic task suite (masked-diffusion SFT objective, Lightning).

Objective (LLaDA SFT): the prompt is always visible; per example t ~ U(eps, 1) and every generation-region token
(answer + EOS filling up to GEN_LENGTH) is masked with probability t; loss = sum over masked positions of CE / t,
divided by the number of generation tokens. Prompts of different lengths are LEFT-padded with PAD, hidden by
`key_mask`, and get rotary positions starting at 0 on their first real token, so the layout of a prompt + canvas
does not depend on the batch it sits in.

Part of the built-in bench (`cache_core.bench`), which the engine never imports. Its checks decode through the
engine's one generate loop (no cache). Entry point: `run(cfg)`, called by `train.py mode=pretrain`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from cache_core.bench.tasks import BLOCK_LENGTH, GEN_LENGTH, Example, TaskSuite, score
from cache_core.checkpoint import save_checkpoint
from cache_core.generate import generate
from cache_core.models import LLaDAModel, ModelConfig
from cache_core.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# --- batches ----------------------------------------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, key_mask, positions), each (B, P): prompts left-padded to the longest, positions 0 at the first real
    token (padding gets position 0 too; it is never attended to)."""
    if not prompts:
        raise ValueError("need at least one prompt")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    key_mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        key_mask[i, P - len(p):] = True
    pad = (~key_mask).sum(1, keepdim=True)
    positions = (torch.arange(P)[None, :] - pad).clamp(min=0)
    return ids, key_mask, positions


def answer_targets(answer_ids: list[int], eos_id: int, gen_length: int = GEN_LENGTH) -> list[int]:
    """The generation region an example should end up as: its answer, then EOS up to gen_length."""
    if len(answer_ids) >= gen_length:
        raise ValueError(f"answer of {len(answer_ids)} tokens leaves no room for EOS in gen_length={gen_length}")
    return list(answer_ids) + [eos_id] * (gen_length - len(answer_ids))


def collate(examples: Sequence[Example], tok: Tokenizer, gen_length: int = GEN_LENGTH) -> dict[str, torch.Tensor]:
    """Batch of canvases: left-padded prompt, then gen_length target tokens (answer + EOS) to be noised."""
    prompt_ids, key_mask, positions = left_pad([tok.encode(e.prompt) for e in examples], tok.pad_token_id)
    targets = torch.tensor([answer_targets(tok.encode(e.answer), tok.eos_token_id, gen_length) for e in examples])
    B, P = prompt_ids.shape
    gen_positions = positions[:, -1:] + 1 + torch.arange(gen_length)[None, :]
    return {
        "input_ids": torch.cat([prompt_ids, targets], 1),
        "key_mask": torch.cat([key_mask, torch.ones(B, gen_length, dtype=torch.bool)], 1),
        "positions": torch.cat([positions, gen_positions], 1),
        "targets": targets,
    }


class TrainStream(IterableDataset):
    """Endless training examples drawn on the fly from the train split (never validation/test instances)."""

    def __init__(self, suite: TaskSuite, stream: int):
        self.suite = suite
        self.stream = stream

    def __iter__(self) -> Iterator[Example]:
        info = torch.utils.data.get_worker_info()
        # One stream per worker, so workers never repeat each other's examples.
        stream = self.stream * 1000 + (info.id if info is not None else 0)
        return self.suite.iterate("train", stream=stream)


class TaskDataModule(L.LightningDataModule):
    def __init__(self, suite: TaskSuite, tok: Tokenizer, batch_size: int, stream: int, num_workers: int = 0,
                 gen_length: int = GEN_LENGTH):
        super().__init__()
        self.suite, self.tok = suite, tok
        self.batch_size, self.stream, self.num_workers = batch_size, stream, num_workers
        self.gen_length = gen_length

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TrainStream(self.suite, self.stream), batch_size=self.batch_size,
                          collate_fn=lambda ex: collate(ex, self.tok, self.gen_length), num_workers=self.num_workers)


# --- objective --------------------------------------------------------------------------------------------------

def noise_mask(t: torch.Tensor, gen_length: int, semi_ar_fraction: float = 0.0,
               answer_lengths: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, gen_length) bool: which generation tokens are masked.

    LLaDA's forward process masks each token with probability t. A `semi_ar_fraction` of the rows instead get the
    state semi-autoregressive, low-confidence decoding visits on these tasks: a clean prefix and a fully masked
    suffix, cut at a uniform point of the answer (0..answer length, so EOS filling is not over-sampled). Why: under
    i.i.d. masking the previous token of a masked answer token is itself masked half the time, so the model spends
    its budget on "k tokens back" rules the decoder never needs; with a clean prefix the token after the cut has its
    predecessor in view, which is the one rule each answer step applies.
    """
    B = t.shape[0]
    masked = torch.rand(B, gen_length, generator=generator) < t
    if semi_ar_fraction > 0:
        if answer_lengths is None:
            limit = torch.full((B,), gen_length - 1)
        else:
            limit = answer_lengths.cpu().clamp(0, gen_length - 1)
        cut = (torch.rand(B, generator=generator) * (limit + 1).float()).long()
        suffix = torch.arange(gen_length)[None, :] >= cut[:, None]
        semi = torch.rand(B, generator=generator) < semi_ar_fraction
        masked = torch.where(semi[:, None], suffix, masked)
    return masked


def diffusion_loss(model: LLaDAModel, batch: dict[str, torch.Tensor], mask_id: int, eps: float = 1e-3,
                   generator: torch.Generator | None = None, semi_ar_fraction: float = 0.0,
                   weighting: str = "elbo", eos_id: int | None = None) -> torch.Tensor:
    """Masked-diffusion SFT loss of one batch (see module docstring and `noise_mask`).

    weighting: "elbo" = LLaDA's sum of CE / t over masked tokens per generation token (a likelihood bound);
    "mean" = plain mean CE over the masked tokens. The 1/t weights (up to 1/eps) let a few lightly masked rows dominate
    the gradient; the mean is the lower-variance choice when the goal is argmax decoding on a small CPU budget.
    """
    if weighting not in ("elbo", "mean"):
        raise ValueError(f"unknown loss weighting {weighting!r}; expected 'elbo' or 'mean'")
    ids, targets = batch["input_ids"], batch["targets"]
    B, G = targets.shape
    # Noise is drawn on the CPU (the generator's device, the same draws whatever the accelerator), then moved.
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator)
    lengths = None if eos_id is None else (targets != eos_id).sum(1)
    masked = noise_mask(t, G, semi_ar_fraction, lengths, generator).to(targets.device)
    t = t.to(targets.device)
    noisy = ids.clone()
    noisy[:, -G:] = torch.where(masked, torch.full_like(targets, mask_id), targets)
    logits = model(noisy, key_mask=batch["key_mask"], positions=batch["positions"])[:, -G:]
    ce = F.cross_entropy(logits[masked], targets[masked], reduction="none")
    if weighting == "mean":
        return ce.mean() if ce.numel() else logits.sum() * 0.0
    return (ce / t.expand(B, G)[masked]).sum() / (B * G)


class DiffusionLM(L.LightningModule):
    def __init__(self, model_cfg: ModelConfig, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 min_lr_ratio: float = 0.1, eps: float = 1e-3, max_seconds: float | None = None,
                 semi_ar_fraction: float = 0.0, loss_weighting: str = "elbo", eos_id: int | None = None):
        super().__init__()
        self.eos_id = eos_id
        self.semi_ar_fraction, self.loss_weighting = semi_ar_fraction, loss_weighting
        self.model = LLaDAModel(model_cfg)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.max_steps, self.min_lr_ratio, self.eps = max_steps, min_lr_ratio, eps
        self.max_seconds = max_seconds
        self.started: float | None = None

    def on_train_start(self) -> None:
        self.started = time.time()

    def progress(self, step: int) -> float:
        """Fraction of the budget used: steps or wall-clock, whichever runs out first (the CPU may be shared)."""
        frac = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        if self.max_seconds and self.started is not None:
            frac = max(frac, (time.time() - self.started) / self.max_seconds)
        return min(1.0, max(0.0, frac))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = diffusion_loss(self.model, batch, self.model.config.mask_token_id, self.eps,
                              semi_ar_fraction=self.semi_ar_fraction, weighting=self.loss_weighting,
                              eos_id=self.eos_id)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        # No weight decay on norms and embeddings (1-D weights and the token table).
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "wte" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "wte" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.98))

        def schedule(step: int) -> float:
            # Linear warmup, then cosine decay to min_lr_ratio at max_steps (or at max_minutes if that comes first).
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            frac = self.progress(step)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# --- evaluation -------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: LLaDAModel, tok: Tokenizer, examples: list[Example], gen_length: int = GEN_LENGTH,
             block_length: int = BLOCK_LENGTH, steps: int | None = GEN_LENGTH, batch_size: int = 32,
             threshold: float | None = None) -> dict[str, float]:
    """Exact match (no cache) per task and overall ('all'); threshold: Fast-dLLM parallel decoding (steps None)."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    chars, n_chars = 0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        prompts = [tok.encode(e.prompt) for e in chunk]
        tokens = generate(model, prompts, gen_length=gen_length, block_length=block_length, steps=steps,
                          threshold=threshold).tokens
        for e, row in zip(chunk, tokens.tolist()):
            text = tok.decode(row)
            hits.setdefault(e.task, []).append(score(text, e))
            # Per-character accuracy: progress is visible (and comparable) long before whole answers match.
            chars += sum(a == b for a, b in zip(text, e.answer))
            n_chars += len(e.answer)
    model.train(was_training)
    result = {task: sum(h) / len(h) for task, h in sorted(hits.items())}
    result["all"] = sum(sum(h) for h in hits.values()) / max(1, len(examples))
    result["char_accuracy"] = chars / max(1, n_chars)
    return result


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


class ProgressAndEval(L.Callback):
    """Log lines every `log_every` steps; every `eval_every` steps exact match on held-out validation examples,
    saving the best model so far to the checkpoint directory (a killed run still leaves its best checkpoint)."""

    def __init__(self, tok: Tokenizer, val: list[Example], pcfg: Any, out_dir: Path, extra: dict[str, Any],
                 decode: dict[str, Any] | None = None):
        self.tok, self.val, self.pcfg, self.out_dir, self.extra = tok, val, pcfg, out_dir, extra
        # The validation decode: the generation group's canvas and block, pcfg.eval_steps steps, no cache.
        self.decode = decode or {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "steps": pcfg.eval_steps}
        self.best = -1.0
        self.best_key: tuple[float, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_step = 0
        self.history: list[dict[str, Any]] = []
        self.started = time.time()
        self.loss_sum, self.loss_n = 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DiffusionLM, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.loss_sum += float(outputs["loss"])
        self.loss_n += 1
        step = trainer.global_step
        if step % self.pcfg.log_every == 0:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            elapsed = time.time() - self.started
            log.info("step %d/%d loss %.4f lr %.2e %.1fs elapsed (%.2fs/step)", step, trainer.max_steps,
                     self.loss_sum / self.loss_n, lr, elapsed, elapsed / step)
            self.loss_sum, self.loss_n = 0.0, 0
        if self.pcfg.eval_every and step % self.pcfg.eval_every == 0:
            self.run_eval(pl_module.model, step, trainer)

    def run_eval(self, model: LLaDAModel, step: int, trainer: L.Trainer | None = None) -> None:
        if not self.val:
            return
        t0 = time.time()
        metrics = evaluate(model, self.tok, self.val, **self.decode)
        self.history.append({"step": step, **metrics})
        log.info("eval step %d: %s (%.0fs)", step, _fmt(metrics), time.time() - t0)
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
        # Best = exact match, ties broken by character accuracy, then by the later step.
        key = (metrics["all"], metrics["char_accuracy"])
        if self.best_key is None or key >= self.best_key:
            self.best_key = key
            self.best, self.best_step = metrics["all"], step
            self.best_state = copy.deepcopy(model.state_dict())
            save_checkpoint(model, self.out_dir, tokenizer=self.tok,
                            extra={**self.extra, "step": step, "validation_exact_match": metrics})


# --- entry point ------------------------------------------------------------------------------------------------

def run(cfg: Any) -> dict[str, Any]:
    """Train the built-in model per cfg.model / cfg.task / cfg.pretrain (cfg: policies.config.RootConfig); write
    <pretrain.output_dir>/<pretrain.name>/; return metrics."""
    from cache_core.bench import tracking

    if getattr(cfg.model, "family", None) == "dit":  # experiment=dit: the image family's recipe
        from cache_core.bench.dit_pretrain import run as run_image

        return run_image(cfg)
    pcfg, tcfg = cfg.pretrain, cfg.task
    L.seed_everything(pcfg.seed, workers=True, verbose=False)
    tok = Tokenizer()
    suite = TaskSuite(list(tcfg.tasks), seed=tcfg.seed)
    model_cfg = cfg.model.to_model_config(tok)
    out_dir = Path(pcfg.output_dir) / pcfg.name
    val = suite.split("validation", pcfg.eval_examples)
    # The canvas and decoding block come from the generation group (generation=long: 256 positions, blocks of 32).
    gen_length, block_length = int(cfg.generation.gen_length), int(cfg.generation.block_length)
    decode = {"gen_length": gen_length, "block_length": block_length, "steps": pcfg.eval_steps}
    extra = {"task": {"tasks": list(tcfg.tasks), "seed": tcfg.seed, "gen_length": gen_length,
                      "block_length": block_length},
             "pretrain": asdict(pcfg)}

    module = DiffusionLM(model_cfg, lr=pcfg.lr, weight_decay=pcfg.weight_decay, warmup_steps=pcfg.warmup_steps,
                         max_steps=pcfg.steps, min_lr_ratio=pcfg.min_lr_ratio, eps=pcfg.eps,
                         max_seconds=pcfg.max_minutes * 60 if pcfg.max_minutes else None,
                         semi_ar_fraction=pcfg.semi_ar_fraction, loss_weighting=pcfg.loss_weighting,
                         eos_id=tok.eos_token_id)
    if pcfg.init_from:
        # Continue from a saved checkpoint (same architecture), e.g. to train a stopped run further.
        from cache_core.checkpoint import load_model

        init = load_model(pcfg.init_from)
        if init.config != model_cfg:
            raise ValueError(f"pretrain.init_from={pcfg.init_from} has config {init.config}, but the model group asks "
                             f"for {model_cfg}; make them match")
        module.model.load_state_dict(init.state_dict())
        log.info("initialised from %s", pcfg.init_from)
    n_params = sum(p.numel() for p in module.model.parameters())
    log.info("pretraining %s: %s, %.2fM parameters -> %s", pcfg.name, model_cfg, n_params / 1e6, out_dir)
    callback = ProgressAndEval(tok, val, pcfg, out_dir, extra, decode)
    data = TaskDataModule(suite, tok, pcfg.batch_size, stream=pcfg.seed, gen_length=gen_length)
    logger = tracking.lightning_logger(cfg.logger, "pretrain", cfg)
    try:
        trainer = L.Trainer(
            max_steps=pcfg.steps, max_time=({"minutes": float(pcfg.max_minutes)} if pcfg.max_minutes else None),
            accelerator=pcfg.accelerator, devices=1, logger=logger if logger else False, enable_checkpointing=False,
            enable_progress_bar=pcfg.progress_bar, enable_model_summary=False,
            gradient_clip_val=pcfg.grad_clip, callbacks=[callback], num_sanity_val_steps=0,
            log_every_n_steps=pcfg.log_every, default_root_dir=str(out_dir.parent),
        )
        started = time.time()
        trainer.fit(module, datamodule=data)
        train_seconds = time.time() - started
        model = module.model
        step = trainer.global_step
        # Final validation unless the last step was just evaluated; then keep the best model seen.
        if not callback.history or callback.history[-1]["step"] != step:
            callback.run_eval(model, step, trainer)
        if callback.best_state is not None:
            model.load_state_dict(callback.best_state)
        test = suite.split("test", pcfg.test_examples)
        t0 = time.time()
        test_metrics = evaluate(model, tok, test, **decode) if test else {}
        log.info("test exact match (%d examples, best step %d): %s (%.0fs)", len(test), callback.best_step,
                 _fmt(test_metrics), time.time() - t0)
        # Parallel decoding too when asked (the long regime must hold its exact match under both schedules).
        threshold_metrics = {}
        if test and pcfg.test_threshold is not None:
            threshold_metrics = evaluate(model, tok, test, gen_length=gen_length, block_length=block_length,
                                         steps=None, threshold=pcfg.test_threshold)
            log.info("test exact match, threshold %.2f decoding: %s", pcfg.test_threshold, _fmt(threshold_metrics))
        result = {
            "checkpoint": str(out_dir), "steps": step, "best_step": callback.best_step, "train_seconds": train_seconds,
            "parameters": n_params, "validation_exact_match": callback.history[-1] if callback.history else {},
            "best_validation_exact_match": callback.best, "test_exact_match": test_metrics,
            "test_exact_match_threshold": threshold_metrics,
            "test_examples": len(test), "history": callback.history,
        }
        save_checkpoint(model, out_dir, tokenizer=tok, extra={**extra, **{k: v for k, v in result.items()
                                                                             if k != "checkpoint"}})
        size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
        result["checkpoint_bytes"] = size
        run = tracking.Run.of_lightning(logger)
        run.summary({f"test/{k}": v for k, v in test_metrics.items()})
        run.log_artifact(sorted(out_dir.iterdir()), f"model-{pcfg.name}", metadata={"test_exact_match": test_metrics})
        log.info("saved %s (%.1f MB)", out_dir, size / 1e6)
        return result
    finally:
        tracking.finish_lightning(logger)
