"""One image, step by step: the DDIM sampler with the block cache, shared by `sample_images` and the environment.

A `DenoisingSession` holds the noisy images x_t, the class labels, the block cache and the bookkeeping the features
read. Its `step(plan)` runs one denoising step: the DiT's partial forward under the plan (`ImageBlockCache.
recompute_mask`), then DDIM's deterministic update (eta = 0, x_0 clipped to [-1, 1] and eps re-derived from it, as
diffusers' DDIMScheduler with clip_sample does). With every block refreshed the step is exactly the uncached
sampler's (`ddim_reference`). The timesteps are DDIM's "leading" spacing: (S - 1 - i) * (T // S), ending at t = 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cache_core.accounting import GenerationStats, StepRecord
from cache_core.cache import RefreshPlan
from cache_core.features import StepFeatures
from cache_core.image.cache import ImageBlockCache
from cache_core.models.dit import DiTModel, modulate


def ddim_timesteps(train_timesteps: int, steps: int) -> torch.Tensor:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps={steps!r} must be an integer in [1, train_timesteps={train_timesteps}]")
    return (torch.arange(steps - 1, -1, -1) * (train_timesteps // steps)).long()


def ddim_update(model: DiTModel, x: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    abar = model.alphas_cumprod[t].to(x.dtype)
    abar_prev = model.alphas_cumprod[t_prev].to(x.dtype) if t_prev >= 0 else torch.ones((), dtype=x.dtype)
    x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def initial_noise(model: DiTModel, batch_size: int, seed: int | None) -> torch.Tensor:
    cfg = model.config
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    shape = (batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    return torch.randn(shape, generator=generator).to(model.device, model.dtype)


def check_labels(model: DiTModel, labels: Any) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    n = model.config.n_classes
    if labels.dim() != 1 or labels.numel() == 0 or labels.dtype in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"labels must be a non-empty 1-D sequence of class ids, got shape {tuple(labels.shape)} "
                         f"dtype {labels.dtype}")
    if bool(((labels < 0) | (labels > n)).any()):
        raise ValueError(f"class labels must lie in [0, {n}] ({n} = no class), got {labels.tolist()}")
    return labels.long().to(model.device)


@torch.inference_mode()
def ddim_reference(model: DiTModel, labels: Any, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """The uncached DDIM sampler over the plain forward: what the cached session must equal with every block
    refreshed (the always-refresh test)."""
    labels = check_labels(model, labels)
    timesteps = ddim_timesteps(model.config.train_timesteps, steps).tolist()
    x = noise.clone()
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = model(x, tt, labels)
        x = ddim_update(model, x, eps, t, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    return x


@dataclass
class ImageStepResult:
    record: StepRecord
    eps: torch.Tensor  # (B, C, H, W) the step's (cached) noise prediction
    recompute: torch.Tensor  # (B, N, n_layers) what ran
    trace: dict[str, Any] = field(repr=False)


@dataclass
class ImageShadow:
    """A full forward of the current x_t next to the cache: the oracle's and the reward's reference."""

    eps: torch.Tensor  # (B, C, H, W)
    drift: torch.Tensor  # (B, n_blocks, n_layers) ||cached - fresh update|| / ||fresh update|| (inf: never computed)


class DenoisingSession:
    def __init__(self, model: DiTModel, labels: Any, steps: int = 25, block_size: int = 8, seed: int | None = 0,
                 noise: torch.Tensor | None = None, trace_attention: bool = True):
        if model.modality != "image":
            raise TypeError(f"{type(model).__name__} is not an image diffusion model; text models decode with "
                            "cache_core.generate")
        self.model = model
        self.labels = check_labels(model, labels)
        cfg = model.config
        B = self.labels.shape[0]
        self.timesteps = ddim_timesteps(cfg.train_timesteps, steps).tolist()
        self.n_steps = steps
        if noise is None:
            noise = initial_noise(model, B, seed)
        elif tuple(noise.shape) != (B, cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({B}, {cfg.channels}, "
                             f"{cfg.image_size}, {cfg.image_size})")
        self.x = noise.to(model.device, model.dtype).clone()
        self.cache = ImageBlockCache(model, B, block_size)
        self.trace_attention = trace_attention
        N, L, dev = cfg.n_tokens, cfg.n_layers, model.device
        self.step_index = 0
        self.last_refresh_step = torch.full((B, N, L), -1, dtype=torch.long, device=dev)
        self.reused_last_step = torch.zeros(B, N, L, dtype=torch.bool, device=dev)
        self.update_drift = torch.zeros(B, N, device=dev)
        self.attention_mass = torch.zeros(B, N, device=dev)
        self.previous_attention_mass = torch.zeros(B, N, device=dev)
        self._input_at_refresh: torch.Tensor | None = None  # (B, N, d) layer-0 modulated input when layer 0 last ran
        self._previous_input: torch.Tensor | None = None  # the same, last step
        self._input: tuple[int, torch.Tensor] | None = None  # this step's (step index, input), computed once
        self._shadow: ImageShadow | None = None
        self.stats = GenerationStats()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def n_blocks(self) -> int:
        return self.cache.n_blocks

    @property
    def n_layers(self) -> int:
        return self.model.config.n_layers

    @property
    def done(self) -> bool:
        return self.step_index >= self.n_steps

    @property
    def timestep(self) -> int:
        return self.timesteps[min(self.step_index, self.n_steps - 1)]

    @property
    def timestep_fraction(self) -> float:
        return self.timestep / self.model.config.train_timesteps

    @property
    def noise_level(self) -> float:
        return float((1 - self.model.alphas_cumprod[self.timestep]).sqrt())

    @property
    def images(self) -> torch.Tensor:
        """(B, C, H, W) the current images (the samples, in [-1, 1], once done)."""
        return self.x.clamp(-1, 1)

    def _t(self) -> torch.Tensor:
        return torch.full((self.batch_size,), self.timestep, dtype=torch.long, device=self.device)

    def never_computed(self) -> torch.Tensor:
        """(B, N, n_layers) entries with nothing cached."""
        return ~torch.stack(self.cache.computed, dim=-1)

    def modulated_input(self) -> torch.Tensor:
        """(B, N, d) this step's layer-0 input after adaLN modulation (TeaCache's signal), computed once per step."""
        if self._input is None or self._input[0] != self.step_index:
            with torch.inference_mode():
                c = self.model.conditioning(self._t(), self.labels)
                layer = self.model.layers[0]
                mod = layer.modulation(c)
                h = modulate(layer.norm1(self.model.tokens(self.x)), mod[0], mod[1])
            self._input = (self.step_index, h)
        return self._input[1]

    def block_input_change(self) -> torch.Tensor:
        """(B, n_blocks) relative L1 change of each block's modulated input since its layer 0 last ran (1 if never)."""
        h = self.modulated_input()
        if self._input_at_refresh is None:
            return torch.ones(self.batch_size, self.n_blocks, device=self.device)
        diff = self.cache.partition.sum((h - self._input_at_refresh).abs().mean(-1))
        ref = self.cache.partition.sum(self._input_at_refresh.abs().mean(-1))
        return (diff / ref.clamp(min=1e-8)).clamp(0, 1).float()

    def global_input_change(self) -> torch.Tensor:
        """(B,) relative L1 change of the modulated input since the last step (1 at the first step)."""
        h = self.modulated_input()
        if self._previous_input is None:
            return torch.ones(self.batch_size, device=self.device)
        diff = (h - self._previous_input).abs().flatten(1).mean(1)
        return (diff / self._previous_input.abs().flatten(1).mean(1).clamp(min=1e-8)).float()

    def features(self, budget: float | None = None) -> StepFeatures:
        from cache_core.image.features import compute_features

        return compute_features(self, budget)

    def shadow_forward(self) -> ImageShadow:
        """Full forward of the current x_t (cached per step): fresh eps and the cache's drift per block and layer."""
        if self._shadow is None:
            with torch.inference_mode():
                eps, _, _, updates = self.model(self.x, self._t(), self.labels, return_state=True)
            part = self.cache.partition
            drift = []
            for layer, fresh in enumerate(updates):
                err = part.sum((self.cache.updates[layer] - fresh).float().pow(2).sum(-1))
                ref = part.sum(fresh.float().pow(2).sum(-1))
                d = (err / ref.clamp(min=1e-12)).sqrt()
                never = part.any(~self.cache.computed[layer])
                drift.append(torch.where(never, float("inf"), d))
            self._shadow = ImageShadow(eps, torch.stack(drift, dim=-1))
        return self._shadow

    # ----------------------------------------------------------------------------------------------------------
    def step(self, plan: RefreshPlan) -> ImageStepResult:
        if self.done:
            raise RuntimeError("the sample is complete; start a new session")
        t0 = time.perf_counter()
        recompute = self.cache.recompute_mask(plan)
        h = self.modulated_input()
        with torch.inference_mode():
            eps, trace = self.model.forward_partial(self.x, self._t(), self.labels, self.cache, recompute,
                                                    trace_attention=self.trace_attention)
            i = self.step_index
            t_prev = self.timesteps[i + 1] if i + 1 < self.n_steps else -1
            self.x = ddim_update(self.model, self.x, eps, self.timestep, t_prev)
        self._update_bookkeeping(recompute, trace, h)
        wall = time.perf_counter() - t0
        model, B, N, L = self.model, self.batch_size, self.cache.n_tokens, self.n_layers
        counts = trace["active_counts"].double()
        flops = sum(float(model.layer_flops(counts[layer], float(N)).sum()) for layer in range(L))
        overhead = model.step_overhead_flops(B)
        full = float(L * model.layer_flops(float(N), float(N)) * B)
        record = StepRecord(step=self.step_index, decoding_block=0, flops=flops + overhead, full_flops=full + overhead,
                            positions_x_layers=int(trace["active_counts"].sum()), cache_bytes=self.cache.nbytes(),
                            wall_s=wall, committed=0)
        self.stats.record(record)
        self._shadow = None
        self.step_index += 1
        return ImageStepResult(record, eps, recompute, trace)

    def _update_bookkeeping(self, recompute: torch.Tensor, trace: dict[str, Any], h: torch.Tensor) -> None:
        self.last_refresh_step = torch.where(recompute, self.step_index, self.last_refresh_step)
        self.reused_last_step = ~recompute
        drift = trace["update_drift"]
        self.update_drift = torch.where(torch.isnan(drift), self.update_drift, drift)
        if trace["attention"] is not None:
            self.previous_attention_mass = self.attention_mass
            self.attention_mass = trace["attention"].float()
        ran0 = recompute[:, :, 0, None]
        self._input_at_refresh = h.clone() if self._input_at_refresh is None else torch.where(
            ran0, h, self._input_at_refresh)
        self._previous_input = h


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) ||a - b|| / ||b|| per row."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp(min=1e-12)

