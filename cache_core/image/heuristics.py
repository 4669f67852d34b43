"""Hand-set and static-learned reuse rules of the image diffusion literature, as `ReusePolicy` classes for the DiT
block cache. Each cites its rule and says where it differs from the paper and why.

Reuse semantics (all of them): a (block, layer) entry that is not recomputed adds its cached residual update (the
gated attention + MLP output of the step where it last ran) to the fresh residual stream, which is FORA's and ToCa's
reuse of layer outputs; a step that recomputes nothing is TeaCache's skip (x_L = fresh embedding + cached residual).
The first step always computes everything (nothing is cached).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.policy import ReusePolicy
from cache_core.registry import register_policy


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class ImagePolicy(ReusePolicy):
    modalities = ("image",)
    uses_features = False


@register_policy
class FORA(ImagePolicy):
    """FORA (Selvaraju et al. 2024): a full forward every `interval` steps; in between every layer's attention and
    MLP outputs are reused from the last full step. As in the paper, static and input-independent. Knob `interval`
    (1 = no cache)."""

    name = "fora"
    knob = "interval"
    knob_sweep = (2, 3, 4, 6)

    def __init__(self, interval: int = 3):
        self.interval = _positive_int("fora interval", interval)

    def plan(self, features: StepFeatures | None, ctx: Any) -> RefreshPlan:
        if ctx.step % self.interval == 0:
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)
        return RefreshPlan.reuse_all(ctx.batch_size, ctx.n_blocks, ctx.n_layers)


@register_policy
class ToCa(ImagePolicy):
    """ToCa (Zou et al. 2024, token-wise caching): a full step every `interval` steps; in between, each layer
    recomputes the top `ratio` of cache blocks by a score and reuses the rest. The score is ToCa's: attention
    influence (the attention mass the block received at the last layer, last step) plus cache age (steps since the
    block's entry in that layer last ran, normalised by the interval).

    Differs from the paper: selection is per block of patch tokens, not per token (the cache's unit here); the
    attention score comes from the last layer only (the one the session traces), for every layer; ToCa's spatial-
    spread term (which DuCa found to matter little next to random choice) is left out. Knob `ratio`."""

    name = "toca"
    knob = "ratio"
    knob_sweep = (0.75, 0.5, 0.35, 0.25, 0.1)

    def __init__(self, ratio: float = 0.25, interval: int = 4, age_weight: float = 1.0):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"toca ratio={ratio} must lie in [0, 1]")
        self.ratio, self.interval, self.age_weight = float(ratio), _positive_int("toca interval", interval), age_weight

    def plan(self, features: StepFeatures | None, ctx: Any) -> RefreshPlan:
        if ctx.step % self.interval == 0:
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)
        s = ctx.session
        part = ctx.partition
        attention = part.sum(s.attention_mass)[..., None]  # (B, nb, 1)
        age = part.sum((s.step_index - s.last_refresh_step).float()) / ctx.block_length  # (B, nb, L) mean age
        score = attention + self.age_weight * age / self.interval  # (B, nb, L)
        k = math.ceil(self.ratio * ctx.n_blocks)
        mask = torch.zeros_like(score, dtype=torch.bool)
        if k > 0:
            top = score.topk(k, dim=1).indices
            mask.scatter_(1, top, True)
        return RefreshPlan(torch.zeros(ctx.batch_size, ctx.n_blocks, dtype=torch.long), layer_mask=mask)


@register_policy
class TeaCache(ImagePolicy):
    """TeaCache (Liu et al. 2024): accumulate the relative L1 change of the timestep-modulated input of the first
    layer between consecutive steps, rescaled by a polynomial fitted to how much the model's output changes; while
    the sum stays below `threshold` the whole model is skipped (every layer's cached residual added to the fresh
    embedding); once it reaches the threshold the step runs in full and the sum restarts. The first and last steps
    always run. `coefficients` (highest power first, numpy.polyval order) are the fitted rescaling; None = identity.
    `fit_teacache_coefficients` fits them on a model, as TeaCache's calibration does. Per image, as in the paper
    (each row of a batch keeps its own sum). Knob `threshold`."""

    name = "teacache"
    knob = "threshold"
    knob_sweep = (0.01, 0.02, 0.03, 0.05, 0.06, 0.07, 0.08, 0.1, 0.2)

    def __init__(self, threshold: float = 0.07, coefficients: list[float] | None = None):
        if not threshold >= 0:
            raise ValueError(f"teacache threshold={threshold} must be >= 0")
        self.threshold = float(threshold)
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        self.accumulated: torch.Tensor | None = None

    def reset(self, batch_size: int) -> None:
        self.accumulated = torch.zeros(batch_size)

    def plan(self, features: StepFeatures | None, ctx: Any) -> RefreshPlan:
        if self.accumulated is None or self.accumulated.shape[0] != ctx.batch_size:
            self.reset(ctx.batch_size)
        change = ctx.session.global_input_change().float().cpu()
        if self.coefficients is not None:  # numpy.polyval order: highest power first
            top = len(self.coefficients) - 1
            change = sum(c * change ** (top - i) for i, c in enumerate(self.coefficients)).clamp(min=0)
        first_or_last = ctx.step == 0 or ctx.step == ctx.n_steps - 1
        self.accumulated += change
        run = (self.accumulated >= self.threshold) | first_or_last
        self.accumulated = torch.where(run, torch.zeros_like(self.accumulated), self.accumulated)
        start = torch.where(run[:, None], 0, ctx.n_layers).expand(-1, ctx.n_blocks).to(ctx.device)
        return RefreshPlan(start.long())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "coefficients": self.coefficients}


@torch.inference_mode()
def fit_teacache_coefficients(model: Any, labels: Any, steps: int, degree: int = 2, seed: int = 0) -> list[float]:
    """TeaCache's calibration: along uncached trajectories, fit relative output change ~ poly(relative modulated-
    input change) between consecutive steps (least squares, numpy.polyfit)."""
    import numpy as np

    from cache_core.image.session import DenoisingSession

    session = DenoisingSession(model, labels, steps, seed=seed, trace_attention=False)
    xs, ys, previous_eps = [], [], None
    while not session.done:
        change = session.global_input_change()
        result = session.step(RefreshPlan.refresh_all(session.batch_size, session.n_blocks))
        eps = result.eps
        if previous_eps is not None:
            rel = (eps - previous_eps).abs().flatten(1).mean(1) / previous_eps.abs().flatten(1).mean(1).clamp(min=1e-8)
            xs += change.cpu().tolist()
            ys += rel.cpu().tolist()
        previous_eps = eps
    return [float(c) for c in np.polyfit(np.array(xs), np.array(ys), degree)]


@register_policy
class DeepCache(ImagePolicy):
    """DeepCache-style depth reuse (Ma et al. 2024, for U-Nets): a full step every `interval` steps; in between only
    the shallow layers run (the first and the last `shallow` layers) and the deep middle reuses its cached updates.

    Differs from the paper: a DiT has no U-Net skip branch, so "shallow" is the `shallow` layers at each end of the
    stack (the analogue used by DiT ports of DeepCache); the reused deep part adds its cached residual updates to the
    fresh stream rather than replacing a feature map. Knob `interval`."""

    name = "deepcache"
    knob = "interval"
    knob_sweep = (2, 3, 4, 6)

    def __init__(self, interval: int = 3, shallow: int = 1):
        self.interval = _positive_int("deepcache interval", interval)
        self.shallow = _positive_int("deepcache shallow", shallow)

    def plan(self, features: StepFeatures | None, ctx: Any) -> RefreshPlan:
        if ctx.step % self.interval == 0:
            return RefreshPlan.refresh_all(ctx.batch_size, ctx.n_blocks)
        layers = torch.arange(ctx.n_layers)
        run = (layers < self.shallow) | (layers >= ctx.n_layers - self.shallow)
        mask = run.expand(ctx.batch_size, ctx.n_blocks, -1).clone()
        return RefreshPlan(torch.zeros(ctx.batch_size, ctx.n_blocks, dtype=torch.long), layer_mask=mask)


ROUTER_FORMAT = "blockreuse-l2c-router"


@register_policy
class LearningToCache(ImagePolicy):
    """Learning-to-Cache (Ma et al. 2024): a static router, one learned score per (denoising step, layer), input-
    independent, trained here with the model frozen (`cache_core.image.router.train_router`: MSE between the full
    output and the output mixing fresh and cached layer updates by the scores, plus an L1 pull of the scores towards
    reuse). At inference a layer runs at a step when its score is at least `threshold` (higher = reuse more); every
    block follows its layer. `router`: the router file (JSON: format, steps, n_layers, scores).

    Differs from the paper: one score per layer for attention and MLP together (the cache keeps one residual update
    per layer), and the cache it mixes with is the previous step's (L2C's choice). Knob `threshold`."""

    name = "l2c"
    knob = "threshold"
    knob_sweep = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(self, router: str | Path | None = None, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"l2c threshold={threshold} must lie in [0, 1]")
        self.threshold = float(threshold)
        from cache_core.bench import REPO_ROOT

        self.router_path = Path(router) if router is not None else REPO_ROOT / "checkpoints" / "policies" / \
            "dit_router.json"
        self.scores = read_router(self.router_path)

    def plan(self, features: StepFeatures | None, ctx: Any) -> RefreshPlan:
        steps, layers = self.scores.shape
        if (steps, layers) != (ctx.n_steps, ctx.n_layers):
            raise ValueError(f"{self.router_path}: the router was trained for {steps} steps x {layers} layers, the "
                             f"sampler runs {ctx.n_steps} x {ctx.n_layers}; train one for this setting "
                             "(python -m cache_core.image.router --steps N)")
        run = self.scores[ctx.step] >= self.threshold
        if ctx.step == 0:
            run = torch.ones_like(run)
        mask = run.expand(ctx.batch_size, ctx.n_blocks, -1).clone()
        return RefreshPlan(torch.zeros(ctx.batch_size, ctx.n_blocks, dtype=torch.long), layer_mask=mask)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "router": str(self.router_path)}


def read_router(path: str | Path) -> torch.Tensor:
    """(steps, n_layers) scores of a router file, checked."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such router file; train one with `python -m cache_core.image.router`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON router file ({err}); retrain it") from err
    if not isinstance(raw, dict) or raw.get("format") != ROUTER_FORMAT:
        raise ValueError(f"{path}: not a {ROUTER_FORMAT} file; retrain it with `python -m cache_core.image.router`")
    scores = torch.tensor(raw.get("scores", []), dtype=torch.float32)
    if scores.dim() != 2 or not bool(torch.isfinite(scores).all()) or bool(((scores < 0) | (scores > 1)).any()):
        raise ValueError(f"{path}: 'scores' must be a (steps, n_layers) table of values in [0, 1]; retrain it")
    return scores
